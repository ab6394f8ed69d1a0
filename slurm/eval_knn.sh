#!/bin/bash
# Weighted k-NN of a pre-trained backbone, 1 node x 4 GPUs (features extracted in parallel).
#   DATA=/path/to/cifar10 WEIGHTS=out/simclr_resnet18_cifar10/checkpoint.pth sbatch slurm/eval_knn.sh
#   WEIGHTS=dino_deitsmall16_pretrain.pth DATA=/datasets/imagenet sbatch slurm/eval_knn.sh --arch vit_small --patch_size 16
#SBATCH --job-name=eval_knn
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=10
#SBATCH --time=2:00:00
#SBATCH --output=slurm-%x-%j.out
DATA="${DATA:?set DATA to the dataset folder that holds train/ and test/ (e.g. DATA=/path/to/cifar10)}"
WEIGHTS="${WEIGHTS:?set WEIGHTS=path/to/checkpoint.pth}"
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh" eval_knn.py --pretrained_weights "$WEIGHTS" \
    --dataset imagefolder --data_path "$DATA" --num_workers "${SLURM_CPUS_PER_TASK:-10}" "$@"
