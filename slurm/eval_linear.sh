#!/bin/bash
# Linear probe of a frozen pre-trained backbone (DINO's eval_linear), 1 node x 4 GPUs.
#   DATA=/path/to/cifar10 WEIGHTS=out/dino_vits16/checkpoint.pth sbatch slurm/eval_linear.sh
#   WEIGHTS=dino_deitsmall16_pretrain.pth DATA=/datasets/imagenet OUT=out/linear_vits16 \
#       sbatch slurm/eval_linear.sh --arch vit_small --patch_size 16 --n_last_blocks 4
#   DATA=... WEIGHTS=... sbatch slurm/eval_linear.sh --cached_features true --probe_layers true   # minutes
# Extra flags go to eval_linear.py; a requeued job resumes from <OUT>/checkpoint.pth.tar.
#SBATCH --job-name=eval_linear
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=10
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120
DATA="${DATA:?set DATA to the dataset folder that holds train/ and test/ (e.g. DATA=/path/to/cifar10)}"
WEIGHTS="${WEIGHTS:?set WEIGHTS=path/to/checkpoint.pth}"
OUT="${OUT:-out/linear}"
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh" eval_linear.py --pretrained_weights "$WEIGHTS" \
    --dataset imagefolder --data_path "$DATA" --output_dir "$OUT" \
    --num_workers "${SLURM_CPUS_PER_TASK:-10}" \
    --checkpoint_every_minutes 20 "$@"
