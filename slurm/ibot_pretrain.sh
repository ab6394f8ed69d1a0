#!/bin/bash
# iBOT ViT-S/16 pre-training on ImageNet, the recipe of bytedance/ibot's README (800 epochs,
# 16 GPUs x 64 images: 75.2% k-NN, 77.9% linear, 82.3% fine-tuned reported there).
# 2 nodes x 8 GPUs; a job that hits --time is requeued and resumes from $OUT/checkpoint.pth.
#   DATA=/datasets/imagenet sbatch slurm/ibot_pretrain.sh              # needs $DATA/train/<class>/
#   DATA=/datasets/imagenet OUT=out/ibot_vitb16 sbatch slurm/ibot_pretrain.sh --arch vit_base \
#       --norm_last_layer true --epochs 400 --batch_size_per_gpu 32    # extra flags win (last value)
#   DATA=/path/to/cifar10 OUT=out/ibot_cifar10 sbatch --nodes=1 --ntasks-per-node=4 \
#       --gpus-per-node=4 slurm/ibot_pretrain.sh --patch_size 4 --global_crops_size 32 \
#       --local_crops_size 16 --batch_size_per_gpu 128 --epochs 300   # docs/methods.md, DINO recipes
#SBATCH --job-name=ibot_pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120
DATA="${DATA:?set DATA to the ImageNet folder that holds train/ (e.g. DATA=/datasets/imagenet)}"
OUT="${OUT:-out/ibot_vit_small16}"
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh" train_ssl.py --method ibot --arch vit_small \
    --patch_size 16 --dataset imagefolder --data_path "$DATA" --output_dir "$OUT" \
    --teacher_temp 0.07 --warmup_teacher_temp_epochs 30 --norm_last_layer false --epochs 800 \
    --batch_size_per_gpu 64 --shared_head true --out_dim 8192 --local_crops_number 10 \
    --global_crops_scale 0.25 1 --local_crops_scale 0.05 0.25 --pred_ratio 0 0.3 \
    --pred_ratio_var 0 0.2 --num_workers "${SLURM_CPUS_PER_TASK:-10}" \
    --checkpoint_every_minutes 20 "$@"
