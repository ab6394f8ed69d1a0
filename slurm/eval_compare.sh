#!/bin/bash
# Pretrained versus random init in one job (eval_compare.py): k-NN, linear and MLP probes, a probe
# of every layer and a ladder of fine-tuning variants, each for the checkpoint and for the same
# architecture at random init, in one table: $OUT/compare.md, compare.json and compare.png.
# One task on one node: eval_compare.py starts every evaluation itself, one after the other, each
# with torchrun over the node's GPUs (--nproc_per_node, default: the GPUs of the job).
#   DATA=/path/to/cifar10 WEIGHTS=out/rotation_vit512/checkpoint.pth OUT=out/ladder \
#       sbatch slurm/eval_compare.sh --evals all --finetune_variants head last1 last2 all
#                                                   # the RotNet ViT recipe's table
#   DATA=/path/to/cifar10 WEIGHTS=out/simclr_resnet18_cifar10/checkpoint.pth OUT=out/compare_simclr \
#       sbatch slurm/eval_compare.sh --evals linear finetune --linear_epochs 30 \
#       --finetune_epochs 10 --finetune_args "--val_split 5000"   # SimCLR: pretrained vs scratch
# Extra flags go to eval_compare.py (the last value of a repeated flag wins). Submitted again with
# the same flags, the job runs the list again; each linear/MLP probe and fine-tuning run
# continues from the checkpoint in its own folder under $OUT.
#SBATCH --job-name=eval_compare
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=40
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
DATA="${DATA:?set DATA to the dataset folder that holds train/ and test/ (e.g. DATA=/path/to/cifar10)}"
WEIGHTS="${WEIGHTS:?set WEIGHTS=path/to/checkpoint.pth}"
OUT="${OUT:-out/compare}"
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh" eval_compare.py --pretrained_weights "$WEIGHTS" \
    --dataset imagefolder --data_path "$DATA" --output_dir "$OUT" \
    --nproc_per_node "${SLURM_GPUS_ON_NODE:-4}" "$@"
