"""Rotation prediction (RotNet, Gidaris et al. 2018, https://arxiv.org/abs/1803.07728): every
image of the batch is shown at 0, 90, 180 and 270 degrees and a classification head predicts
which rotation it sees. Recognising "upright" needs the object's shape and pose, so the backbone
learns semantic features without labels.

As gidariss/FeatureLearningRotNet: one augmented view per image (RandomCrop + flip on CIFAR,
RandomResizedCrop + flip above 64px), then all four rotations of that same view in one batch
with labels 0-3 (k quarter turns counter-clockwise, as np.rot90), plain 4-way cross-entropy.
The optimisation recipe is the rotation-prediction recipe for a ViT on ImageNet (RotNet ViT,
MAE-style: AdamW betas 0.9/0.95, lr 1.5e-4 per 256 images, weight decay 0.05, warmup +
cosine), not RotNet's step-decayed SGD.

Plugs into train_ssl.py through RECIPE / add_args / check_args / build (see methods/__init__.py).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.diagnostics import EffectiveRankEvery, embedding_stats
from data import SingleViewTransform
from models import check_patch_size

NUM_ROTATIONS = 4

# the rotation-prediction recipe (RotNet ViT on ImageNet): AdamW with betas (0.9, 0.95) as MAE,
# lr 1.5e-4 per 256 images, constant weight decay 0.05, DINO's gradient clipping, warmup + cosine
RECIPE = dict(arch="resnet18", optimizer="adamw", lr=1.5e-4, min_lr=1e-6, weight_decay=0.05,
              weight_decay_end=0.05, clip_grad=3.0, warmup_epochs=10, epochs=100,
              batch_size_per_gpu=64, drop_path_rate=0.1, adamw_betas=(0.9, 0.95),
              saveckp_freq=20)


def add_args(parser):
    group = parser.add_argument_group("Rotation prediction (RotNet)")
    group.add_argument("--crop_size", default=0, type=int,
                       help="Size of the (square) training view; 0 means the dataset's native "
                            "size (32 for CIFAR, 96 for STL-10, 224 for ImageFolder).")
    group.add_argument("--min_crop_scale", default=0.08, type=float,
                       help="Lower bound of the RandomResizedCrop area above 64px (unused at "
                            "CIFAR size, where RotNet pads by 4 and random-crops instead).")
    group.add_argument("--rot_hidden_dim", default=0, type=int,
                       help="0: a linear rotation head on the pooled features, as RotNet's "
                            "Linear(192, 4); > 0: Linear-BN-ReLU-Linear with this hidden width.")


def check_args(args):
    if args.crop_size < 0 or not 0 < args.min_crop_scale <= 1 or args.rot_hidden_dim < 0:
        raise ValueError(f"--crop_size {args.crop_size} / --min_crop_scale {args.min_crop_scale} "
                         f"/ --rot_hidden_dim {args.rot_hidden_dim}: need a size >= 0 (0: the "
                         "dataset's), a scale in (0, 1] and a width >= 0")
    if args.crop_size:  # 0: the dataset's size, checked by train_ssl.py once it is known
        check_patch_size(args.arch, args.patch_size, args.crop_size, "--crop_size")


def input_size(args, info):
    """The resolution the backbone is built for (ViT positional embedding grid)."""
    return args.crop_size or info.image_size


def backbone_kwargs(args):
    return {}


def build_transform(args, info):
    return SingleViewTransform(input_size(args, info), info.mean, info.std,
                               scale=(args.min_crop_scale, 1.0))


def rotate_batch(images):
    """images (B, C, S, S) -> (rotated (4B, C, S, S), labels (4B,) int64).

    Rows 4i..4i+3 are image i turned by 0, 90, 180, 270 degrees counter-clockwise (label k =
    k quarter turns, np.rot90's direction), RotNet's per-image stacking. Runs on the images'
    device; the images must be square so the four rotations share one shape."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation prediction needs a batch of square images (B, C, S, S), "
                         f"got {tuple(images.shape)}; use square crops (--crop_size)")
    b = images.shape[0]
    # dims (2, 3) = (H, W): torch.rot90 turns from the first dim towards the second, which is
    # counter-clockwise on the displayed image, as np.rot90 on an HWC array
    rotated = torch.stack([torch.rot90(images, k, dims=(2, 3)) for k in range(NUM_ROTATIONS)], dim=1)
    labels = torch.arange(NUM_ROTATIONS, device=images.device).repeat(b)
    return rotated.flatten(0, 1), labels


class RotationPrediction(nn.Module):
    def __init__(self, backbone, embed_dim, hidden_dim=0, rank_freq=10):
        super().__init__()
        self.backbone = backbone
        # collapse diagnostics of the backbone features; the SVD only every rank_freq steps
        self.erank = EffectiveRankEvery(rank_freq)
        if hidden_dim > 0:
            self.head = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                      nn.ReLU(inplace=True), nn.Linear(hidden_dim, NUM_ROTATIONS))
        else:
            self.head = nn.Linear(embed_dim, NUM_ROTATIONS)

    def forward(self, views, epoch, it):
        """views: (B, 3, S, S) (one view per image); the backbone sees all 4B rotations at once,
        so every BatchNorm batch holds each image in all four orientations."""
        x = views[0] if isinstance(views, (list, tuple)) else views
        rotated, labels = rotate_batch(x)
        features = self.backbone(rotated)
        logits = self.head(features)
        loss = F.cross_entropy(logits.float(), labels)
        with torch.no_grad():
            acc = (logits.argmax(dim=1) == labels).float().mean() * 100
        return loss, {"rot_acc": acc, **embedding_stats(features, it, self.erank)}

    def after_backward(self, epoch):
        pass

    def after_step(self, it):
        pass

    def eval_backbone(self):
        return self.backbone

    def checkpoint_modules(self):
        return {"model": self}


def build(args, backbone, embed_dim, niter_per_ep):
    return RotationPrediction(backbone, embed_dim, args.rot_hidden_dim,
                              getattr(args, "print_freq", 10))


def diagnose(stats, args, epoch):
    """Nothing to check once per epoch: emb_std and erank are logged for the reader."""
    return None
