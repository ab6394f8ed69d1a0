"""SimCLR (Chen et al. 2020, https://arxiv.org/abs/2002.05709): two augmented views per image,
a projection head, and the NT-Xent / InfoNCE loss with every other embedding as a negative.

Plugs into train_ssl.py through RECIPE / add_args / check_args / build (see methods/__init__.py).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.amp import full_fp32
from core.diagnostics import EffectiveRankEvery, embedding_stats
from core.dist import all_gather_with_grad, get_rank
from data import TwoViewTransform
from models import check_patch_size

# google-research/simclr's optimisation: LARS, lr 0.3 per 256 images, weight decay 1e-6 held
# constant, no gradient clipping; a ResNet-18, 10 warmup epochs of 100. (adamw_betas: only
# with --optimizer adamw.)
RECIPE = dict(arch="resnet18", optimizer="lars", lr=0.3, min_lr=1e-6, weight_decay=1e-6,
              weight_decay_end=1e-6, clip_grad=0.0, warmup_epochs=10, epochs=100,
              batch_size_per_gpu=64, drop_path_rate=0.1, adamw_betas=(0.9, 0.999),
              saveckp_freq=20)


def add_args(parser):
    group = parser.add_argument_group("SimCLR")
    group.add_argument("--temperature", default=0.1, type=float,
                       help="InfoNCE temperature. 0.1 is google-research/simclr's ImageNet default, "
                            "0.2-0.5 is common on CIFAR, 0.07 in sthalles/SimCLR.")
    group.add_argument("--proj_hidden_dim", default=2048, type=int,
                       help="Hidden width of the projection MLP (2048 in solo-learn; the SimCLR "
                            "128px recipe uses 512).")
    group.add_argument("--proj_output_dim", default=128, type=int,
                       help="Output dimension of the projection head (128 in the paper).")
    group.add_argument("--crop_size", default=0, type=int,
                       help="RandomResizedCrop size of the views; 0 means the dataset's native "
                            "size (32 for CIFAR, 96 for STL-10, 224 for ImageFolder).")
    group.add_argument("--min_crop_scale", default=0.08, type=float,
                       help="Lower bound of the RandomResizedCrop area (0.08 in the paper).")


def check_args(args):
    if args.temperature <= 0:
        raise ValueError(f"--temperature {args.temperature} must be positive; 0.1-0.5 is usual")
    if args.crop_size < 0 or not 0 < args.min_crop_scale <= 1:
        raise ValueError(f"--crop_size {args.crop_size} / --min_crop_scale {args.min_crop_scale}: "
                         "need a size >= 0 (0: the dataset's) and a scale in (0, 1]")
    if args.proj_hidden_dim < 1 or args.proj_output_dim < 1:
        raise ValueError(f"--proj_hidden_dim {args.proj_hidden_dim} / --proj_output_dim "
                         f"{args.proj_output_dim} must be >= 1 (2048 / 128 as solo-learn)")
    if args.crop_size:  # 0: the dataset's size, checked by train_ssl.py once it is known
        check_patch_size(args.arch, args.patch_size, args.crop_size, "--crop_size")


def input_size(args, info):
    """The resolution the backbone is built for (ViT positional embedding grid)."""
    return args.crop_size or info.image_size


def backbone_kwargs(args):
    return {}


def build_transform(args, info):
    return TwoViewTransform(input_size(args, info), info.mean, info.std,
                            scale=(args.min_crop_scale, 1.0))


def projection_head(in_dim, hidden_dim, out_dim):
    """Linear-BN-ReLU-Linear, the SimCLR v1 / solo-learn projector."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def similarity_logits(z1, z2, temperature):
    """(2B, 2BW) cosine similarities / temperature of this rank's 2B embeddings [z1; z2] with
    every rank's (gathered with gradients, rank-major), in full float32 even under autocast and
    --tf32: at
    temperature 0.1 a bfloat16 product would move the logits by up to ~0.04, enough to reorder
    the candidates (DINO's last layer is kept in float32 for the same reason)."""
    with torch.autocast(z1.device.type, enabled=False), full_fp32():
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)         # (2B, D)
        candidates = all_gather_with_grad(z)                         # (2BW, D), rank-major
        return z @ candidates.T / temperature


def info_nce_loss(z1, z2, temperature=0.1):
    """NT-Xent over the global batch.

    z1, z2: (B, D) projections of the two views of the same B images on this rank.
    Every one of the 2B local embeddings is an anchor; its positive is the other view of the
    same image; all other 2*B*W - 2 embeddings of every rank are negatives (gathered with
    gradients). Returns (loss: mean over the 2B local anchors, top1, top5: % of anchors whose
    positive ranks first / in the first five among the 2BW - 1 candidates)."""
    b = z1.shape[0]
    logits = similarity_logits(z1, z2, temperature)                  # (2B, 2BW) float32
    idx = torch.arange(2 * b, device=logits.device)
    offset = get_rank() * 2 * b
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[idx, offset + idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = offset + (idx + b) % (2 * b)
    loss = F.cross_entropy(logits, positives)
    with torch.no_grad():
        pos_logit = logits[idx, positives]
        rank = (logits > pos_logit[:, None]).sum(1)                 # candidates above the positive
        top1 = (rank < 1).float().mean() * 100
        top5 = (rank < 5).float().mean() * 100
    return loss, top1, top5


class SimCLR(nn.Module):
    def __init__(self, backbone, embed_dim, args):
        super().__init__()
        self.backbone = backbone
        self.head = projection_head(embed_dim, args.proj_hidden_dim, args.proj_output_dim)
        self.temperature = args.temperature
        # collapse diagnostics of the projections; the SVD only once per printed line
        self.erank = EffectiveRankEvery(getattr(args, "print_freq", 10))

    def forward(self, views, epoch, it):
        """views: [x1, x2], each (B, 3, H, W). Both views go through the backbone as one batch
        (BatchNorm statistics over the 2B images, as google-research/simclr)."""
        z = self.head(self.backbone(torch.cat(views)))
        z1, z2 = z.chunk(2)
        loss, top1, top5 = info_nce_loss(z1, z2, self.temperature)
        return loss, {"acc1": top1, "acc5": top5, **embedding_stats(z, it, self.erank)}

    def after_backward(self, epoch):
        pass

    def after_step(self, it):
        pass

    def eval_backbone(self):
        return self.backbone

    def checkpoint_modules(self):
        return {"model": self}


def build(args, backbone, embed_dim, niter_per_ep):
    return SimCLR(backbone, embed_dim, args)


def diagnose(stats, args, epoch):
    """Nothing to check once per epoch: emb_std and erank are logged for the reader."""
    return None
