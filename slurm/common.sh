# Sourced by every slurm/*.sh job after its #SBATCH header: one task per GPU, rendezvous on the
# first node, requeue on preemption. `source slurm/common.sh script.py --flag ...` runs
# `srun python script.py --flag ...` on every task. The scripts read SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID (core/dist.py), and auto-resume from <output_dir>/checkpoint.pth (eval_linear.py:
# checkpoint.pth.tar, as DINO), so a requeued
# job simply continues. Submit from the repository root.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
[ -f .venv/bin/activate ] && source .venv/bin/activate
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes x $SLURM_NTASKS_PER_NODE tasks, master $MASTER_ADDR:$MASTER_PORT"
echo "command: python $*"

# #SBATCH --signal=B:USR1@180 sends USR1 to this shell 3 minutes before the time limit (or on
# preemption, where the cluster is set up so): put the job back in the queue.
requeue() {
    echo "caught USR1: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1
srun --kill-on-bad-exit=1 python "$@" &
wait $!  # returns early when USR1 arrives, so the trap runs at once
wait $! 2>/dev/null || true
