#!/bin/bash
# SimCLR ResNet-18 pre-training on CIFAR-10 (ImageFolder of JPEGs), 2 nodes x 4 GPUs.
#   DATA=/path/to/cifar10 sbatch slurm/simclr_pretrain.sh                      # defaults below
#   DATA=/path/to/cifar10 sbatch --nodes=1 slurm/simclr_pretrain.sh --epochs 100 # extra flags go to train_ssl.py
#   DATA=/datasets/imagenet OUT=out/simclr_in1k sbatch slurm/simclr_pretrain.sh --arch resnet50 --crop_size 224
#SBATCH --job-name=simclr_pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120
DATA="${DATA:?set DATA to the dataset folder that holds train/ and test/ (e.g. DATA=/path/to/cifar10)}"
OUT="${OUT:-out/simclr_resnet18_cifar10}"
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh" train_ssl.py --method simclr --arch resnet18 \
    --dataset imagefolder --data_path "$DATA" --crop_size 32 --output_dir "$OUT" \
    --epochs 500 --warmup_epochs 10 --batch_size_per_gpu 64 --temperature 0.2 \
    --num_workers "${SLURM_CPUS_PER_TASK:-10}" \
    --checkpoint_every_minutes 20 "$@"
