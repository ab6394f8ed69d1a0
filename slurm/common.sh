# Sourced by every slurm/*.sh job after its #SBATCH header: one task per GPU, rendezvous on the
# first node, checkpoint and requeue on preemption or at the time limit (below).
# `source slurm/common.sh script.py --flag ...` runs `srun python script.py --flag ...` on every
# task. The scripts read SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (core/dist.py), and
# auto-resume from <output_dir>/checkpoint.pth (eval_linear.py: checkpoint.pth.tar, as DINO), so
# a requeued job simply continues. Submit from the repository root.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
[ -f .venv/bin/activate ] && source .venv/bin/activate
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes x $SLURM_NTASKS_PER_NODE tasks, master $MASTER_ADDR:$MASTER_PORT"
echo "command: python $*"

# Preemption and the time limit: the training scripts ask for `#SBATCH --signal=USR1@120` and
# `#SBATCH --requeue`. Without a "B:" prefix SLURM sends USR1, 120 s before the time limit, to
# the processes of the job steps: the python tasks below, which is where it is needed
# (--signal=B:USR1 reaches only this batch shell; the tasks would learn of it from the SIGTERM
# of the kill, 30 s before the SIGKILL). Every task finishes its step, rank 0 writes
# checkpoint.pth and runs `scontrol requeue $SLURM_JOB_ID`, and all exit 0 (core/preempt.py);
# the requeued job runs this script again and continues where it stopped. A preemption sends
# SIGTERM to the tasks: the same, without the requeue call (SLURM requeues preempted jobs
# itself under PreemptMode=REQUEUE). --checkpoint_every_minutes 20 bounds what a node failure,
# which sends nothing, can cost.
srun --kill-on-bad-exit=1 python "$@"
