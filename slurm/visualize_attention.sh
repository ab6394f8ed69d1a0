#!/bin/bash
# Attention maps of a ViT checkpoint (visualize_attention.py): the last block's [CLS] attention,
# one map per head, and with --threshold the masks that hold that share of each head's attention.
# One GPU for a few minutes; PNGs (and attention.png in one figure) in $OUT.
#   WEIGHTS=out/dino_vit_tiny16/checkpoint.pth IMAGE=cat.jpg OUT=out/attention sbatch \
#       slurm/visualize_attention.sh --threshold 0.6
#   DATA=/path/to/cifar10 WEIGHTS=out/dino_vit_tiny16/checkpoint.pth OUT=out/attention_7 sbatch \
#       slurm/visualize_attention.sh --sample_index 7 --threshold 0.6   # image 7 of DATA's test/
# Extra flags go to visualize_attention.py.
#SBATCH --job-name=visualize_attention
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=0:20:00
#SBATCH --output=slurm-%x-%j.out
WEIGHTS="${WEIGHTS:?set WEIGHTS=path/to/checkpoint.pth (a ViT)}"
OUT="${OUT:-out/attention}"
if [ -n "${IMAGE:-}" ]; then
    SOURCE=(--image_path "$IMAGE")
else
    SOURCE=(--dataset imagefolder --data_path "${DATA:?set IMAGE=path/to/image.jpg, or DATA to the dataset folder whose test/ image --sample_index shows}")
fi
source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh" visualize_attention.py --pretrained_weights "$WEIGHTS" \
    "${SOURCE[@]}" --output_dir "$OUT" "$@"
