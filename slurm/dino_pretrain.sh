#!/bin/bash
# DINO ViT-S/16 pre-training on ImageNet, the recipe of facebookresearch/dino's README (100 epochs,
# 8 GPUs x 64 images, all other flags at their defaults: 69.3% k-NN, 74.0% linear reported there).
# 2 nodes x 4 GPUs here, the same global batch of 512.
#   DATA=/datasets/imagenet sbatch slurm/dino_pretrain.sh              # needs $DATA/train/<class>/
#   DATA=/datasets/imagenet sbatch slurm/dino_pretrain.sh --epochs 300 --teacher_temp 0.07 \
#       --warmup_teacher_temp_epochs 30 --norm_last_layer false        # "boosted": 73.3 / 76.0
#   DATA=/datasets/imagenet OUT=out/dino_rn50 sbatch slurm/dino_pretrain.sh --arch resnet50 \
#       --optimizer sgd --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4 \
#       --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14     # DINO's ResNet-50 recipe
#   DATA=/path/to/cifar10 OUT=out/dino_cifar10 sbatch --nodes=1 slurm/dino_pretrain.sh \
#       --patch_size 4 --global_crops_size 32 --local_crops_size 16 --batch_size_per_gpu 128 \
#       --epochs 300                                                   # docs/methods.md, DINO recipes
# Extra flags go to train_ssl.py (the last value of a repeated flag wins). A requeued job resumes
# from $OUT/checkpoint.pth.
#SBATCH --job-name=dino_pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120
DATA="${DATA:?set DATA to the ImageNet folder that holds train/ (e.g. DATA=/datasets/imagenet)}"
OUT="${OUT:-out/dino_vit_small16}"
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh" train_ssl.py --method dino --arch vit_small \
    --patch_size 16 --dataset imagefolder --data_path "$DATA" --output_dir "$OUT" \
    --epochs 100 --batch_size_per_gpu 64 --num_workers "${SLURM_CPUS_PER_TASK:-10}" \
    --checkpoint_every_minutes 20 "$@"
