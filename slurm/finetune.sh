#!/bin/bash
# Fine-tuning of a pre-trained backbone (or, with WEIGHTS unset, the from-scratch baseline with
# the same recipe), 1 node x 4 GPUs. Best-on-validation checkpoint and the test report in OUT.
#   DATA=/path/to/cifar10 WEIGHTS=out/simclr_resnet18_cifar10/checkpoint.pth sbatch slurm/finetune.sh --val_split 5000
#   DATA=/path/to/cifar10 OUT=out/ft_scratch sbatch slurm/finetune.sh --arch resnet18 --val_split 5000  # baseline
#   WEIGHTS=dino_deitsmall16_pretrain.pth DATA=/datasets/imagenet OUT=out/ft_vits16 sbatch slurm/finetune.sh \
#       --arch vit_small --patch_size 16 --layer_decay 0.75 --mixup 0.8 --cutmix 1.0 --epochs 200
# Extra flags go to finetune.py; a requeued job resumes from <OUT>/checkpoint.pth.
#SBATCH --job-name=finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120
DATA="${DATA:?set DATA to the dataset folder that holds train/ and test/ (e.g. DATA=/path/to/cifar10)}"
OUT="${OUT:-out/finetune}"
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh" finetune.py --pretrained_weights "${WEIGHTS:-}" \
    --dataset imagefolder --data_path "$DATA" --output_dir "$OUT" \
    --num_workers "${SLURM_CPUS_PER_TASK:-10}" \
    --checkpoint_every_minutes 20 "$@"
