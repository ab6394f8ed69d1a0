#!/bin/bash
# Rotation prediction (RotNet) ViT-S/16 at 160px on ImageNet, 2 nodes x 4 GPUs.
#   DATA=/datasets/imagenet sbatch slurm/rotation_pretrain.sh
#   DATA=/datasets/imagenet OUT=out/rot_rn50 sbatch slurm/rotation_pretrain.sh --arch resnet50 --crop_size 224
#   DATA=/datasets/imagenet OUT=out/rotation_vit512 sbatch slurm/rotation_pretrain.sh \
#       --embed_dim 512 --depth 8 --num_heads 8       # the RotNet ViT recipe: width 512, 8 blocks, 8 heads
# AdamW betas (0.9, 0.95), lr 1.5e-4 per 256 images and weight decay 0.05 are the method's recipe.
# Extra flags go to train_ssl.py; a requeued job resumes from $OUT/checkpoint.pth.
#SBATCH --job-name=rotation_pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120
DATA="${DATA:?set DATA=path/to/imagenet (an ImageFolder root with train/)}"
OUT="${OUT:-out/rotation_vits16}"
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh" train_ssl.py --method rotation --arch vit_small \
    --patch_size 16 --crop_size 160 --dataset imagefolder --data_path "$DATA" --output_dir "$OUT" \
    --epochs 100 --batch_size_per_gpu 128 --num_workers "${SLURM_CPUS_PER_TASK:-10}" \
    --checkpoint_every_minutes 20 "$@"
