"""DINO (Caron et al. 2021, https://arxiv.org/abs/2104.14294): self-distillation with no labels.

A student network (backbone + DINOHead) is trained to match, with a cross-entropy, the
sharpened and centred output of a teacher that sees other crops of the same image. The teacher
is an exponential moving average (EMA) of the student; it gets no gradient. Every detail follows
https://github.com/facebookresearch/dino (main_dino.py, utils.py, vision_transformer.py):

    multi-crop      2 global crops (the teacher sees only these) + n local crops, crop-major
    DINOHead        3-layer MLP -> L2 normalisation -> weight-normalised linear layer
    DINOLoss        every (teacher global, student crop) pair except the same view; teacher
                    softmax((t - center) / temp) with a per-epoch temperature schedule; the centre
                    is an EMA of the all-reduced batch mean of the teacher logits
    EMA teacher     momentum 0.996 -> 1 on a per-iteration cosine schedule
    freeze_last_layer   no update of the head's last layer during the first epoch(s)

Plugs into train_ssl.py through RECIPE / add_args / check_args / build (see
methods/__init__.py):

    torchrun --nproc_per_node=4 train_ssl.py --method dino --dataset imagefolder \
        --data_path /path/to/imagenet --output_dir out/dino_vits16
    python train_ssl.py --method dino --arch vit_tiny --patch_size 4 --global_crops_size 32 \
        --local_crops_size 16 --out_dim 4096 --batch_size_per_gpu 64 --epochs 10 --warmup_epochs 1

docs/methods.md (DINO and iBOT) has the recipes for CIFAR, STL-10, Tiny ImageNet and ImageNet.
"""
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from core import amp
from core import dist as distu
from core.diagnostics import Every, check_collapse, teacher_stats
from core.logger import bool_flag
from core.optim import cosine_scheduler
from data import MultiCropTransform
from models import build_backbone, check_patch_size, vit_shape

# main_dino.py's defaults (ViT-S/16, ImageNet) for train_ssl.py's generic flags; --lr is for a
# global batch of 256 and scaled linearly.
RECIPE = dict(arch="vit_small", optimizer="adamw", lr=0.0005, min_lr=1e-6, weight_decay=0.04,
              weight_decay_end=0.4, clip_grad=3.0, warmup_epochs=10, epochs=100,
              batch_size_per_gpu=64, drop_path_rate=0.1, adamw_betas=(0.9, 0.999),
              saveckp_freq=20)


# ============ flags (main_dino.py names and defaults) ============

def add_args(parser):
    group = parser.add_argument_group("DINO")
    add_head_args(group, out_dim=65536)
    group.add_argument("--use_bn_in_head", default=False, type=bool_flag,
                       help="Whether to use batch normalizations in projection head. Does not "
                            "change the ViT result much; DINO's ResNet-50 run keeps it off too.")
    add_teacher_temp_args(group, warmup_epochs=0)
    add_multicrop_args(group, global_scale=(0.4, 1.0), local_number=8)


def add_head_args(group, out_dim):
    """Head and teacher flags shared by DINO and iBOT (same names and defaults in both repos,
    except --out_dim)."""
    group.add_argument("--out_dim", default=out_dim, type=int,
                       help="Dimensionality of the head output. For complex and large datasets "
                            "large values (like 65k) work well; 4096-16384 is plenty for "
                            "CIFAR-sized data.")
    group.add_argument("--norm_last_layer", default=True, type=bool_flag,
                       help="Whether or not to weight normalize the last layer of the head. Not "
                            "normalizing leads to better performance but can make the training "
                            "unstable: typically false with vit_small, true with vit_base.")
    group.add_argument("--momentum_teacher", default=0.996, type=float,
                       help="Base EMA parameter for the teacher, raised to 1 during training "
                            "with a cosine schedule. Use a higher value with small batches, for "
                            "example 0.9995 with a global batch of 256.")
    group.add_argument("--freeze_last_layer", default=1, type=int,
                       help="Number of epochs during which the output layer of the head is kept "
                            "fixed. Doing so during the first epoch helps training; increase "
                            "it if the loss does not decrease.")


def add_teacher_temp_args(group, warmup_epochs):
    group.add_argument("--warmup_teacher_temp", default=0.04, type=float,
                       help="Initial value for the teacher temperature: 0.04 works well in most "
                            "cases. Try decreasing it if the training loss does not decrease.")
    group.add_argument("--teacher_temp", default=0.04, type=float,
                       help="Final value (after linear warmup) of the teacher temperature. "
                            "Anything above 0.07 is unstable; the 'boosted' recipes use 0.07.")
    group.add_argument("--warmup_teacher_temp_epochs", default=warmup_epochs, type=int,
                       help="Number of warmup epochs for the teacher temperature (DINO's boosted "
                            "recipes use 30).")


def add_multicrop_args(group, global_scale, local_number):
    group.add_argument("--global_crops_scale", type=float, nargs="+", default=global_scale,
                       help="Area range of the global crops relative to the image. Without local "
                            "crops a wider range such as 0.14 1 is recommended.")
    group.add_argument("--local_crops_number", type=int, default=local_number,
                       help="Number of small local views; 0 disables multi-crop.")
    group.add_argument("--local_crops_scale", type=float, nargs="+", default=(0.05, 0.4),
                       help="Area range of the local crops relative to the image.")
    group.add_argument("--global_crops_size", type=int, default=224,
                       help="Resolution of the global crops, and the one the ViT is built for "
                            "(DINOv2's name). 32 for CIFAR, 64 for Tiny ImageNet, 96 for STL-10.")
    group.add_argument("--local_crops_size", type=int, default=96,
                       help="Resolution of the local crops (DINOv2's name). About half the "
                            "global size at low resolution: 16 for CIFAR.")


def check_multicrop_args(args):
    for name in ("global_crops_scale", "local_crops_scale"):
        scale = getattr(args, name)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"--{name} {' '.join(map(str, scale))} is not a range; "
                             f"give two numbers 0 < min <= max <= 1, e.g. 0.4 1")
    if args.local_crops_number < 0:
        raise ValueError(f"--local_crops_number {args.local_crops_number} is negative; "
                         "use 0 to disable local crops")
    for name in ("global_crops_size", "local_crops_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)} must be positive")
        if not args.arch.startswith("resnet") and getattr(args, name) < args.patch_size:
            raise ValueError(f"--{name} {getattr(args, name)} is smaller than "
                             f"--patch_size {args.patch_size}; lower the patch size (4 for "
                             "32px images) or raise the crop size")
        check_patch_size(args.arch, args.patch_size, getattr(args, name), f"--{name}")


def check_head_args(args):
    """Head and teacher flags shared with iBOT: values that would train silently on nonsense."""
    if args.out_dim < 1:
        raise ValueError(f"--out_dim {args.out_dim} must be >= 1 (4096-65536 as DINO)")
    if not 0 <= args.momentum_teacher <= 1:
        raise ValueError(f"--momentum_teacher {args.momentum_teacher} must be in [0, 1] "
                         "(0.996 as DINO)")
    for name in ("warmup_teacher_temp", "teacher_temp"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} {getattr(args, name)} must be positive (0.04 as DINO)")


def check_args(args):
    check_multicrop_args(args)
    check_head_args(args)


def input_size(args, info):
    """The ViT is built for the global crop size; local crops interpolate its position grid."""
    return args.global_crops_size


def backbone_kwargs(args):
    return {}


def build_transform(args, info):
    return MultiCropTransform(args.global_crops_size, args.local_crops_size,
                              tuple(args.global_crops_scale), tuple(args.local_crops_scale),
                              local_number=args.local_crops_number, global_number=2,
                              mean=info.mean, std=info.std)


# ============ head ============

class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| per output row.

    Same parameters, names and shapes as `torch.nn.utils.weight_norm(nn.Linear(in, out,
    bias=False))` (weight_g (out, 1), weight_v (out, in)), so official DINO/iBOT checkpoints
    load, without the deprecated API (its replacement, parametrizations.weight_norm, renames the
    keys). Like the official norm there is no epsilon. Runs in float32 even under autocast, and in
    full float32 under --tf32: the teacher divides these cosine logits by 0.04, and bfloat16's 8
    bits of mantissa would leave them with steps of up to 0.1 (TF32's 10 bits: 0.025).
    """

    def __init__(self, in_features, out_features):
        super().__init__()
        weight_v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(weight_v, a=math.sqrt(5))  # nn.Linear's default init, as DINO
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))  # DINO fills g with 1
        self.weight_v = nn.Parameter(weight_v)

    def forward(self, x):
        """x: (..., in_features) -> (..., out_features) in float32."""
        with torch.autocast(x.device.type, enabled=False), amp.full_fp32():
            weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))
            return F.linear(x.float(), weight.float())

    def extra_repr(self):
        return f"in_features={self.weight_v.shape[1]}, out_features={self.weight_v.shape[0]}"


def init_head_weights(m):
    """trunc_normal(0.02) on the MLP's Linear layers, zero biases (DINO's _init_weights)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DINOHead(nn.Module):
    """MLP (in -> hidden -> hidden -> bottleneck, GELU, optional BatchNorm) -> L2 normalisation
    -> weight-normalised last layer. Keys as the official head: mlp.{0,2,4}.* (with BN:
    mlp.{0,3,6} Linear, mlp.{1,4} BN; nlayers=1: mlp.*), last_layer.weight_{g,v}.

    With norm_last_layer the norm g of every output row stays 1 (not trained), so the logits are
    cosine similarities in [-1, 1]."""

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3,
                 hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(init_head_weights)
        # created after the init pass, so weight_v keeps nn.Linear's default init (as DINO)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        """x: (B, in_dim) features -> (B, out_dim) float32 logits."""
        x = F.normalize(self.mlp(x).float(), dim=-1, p=2)
        return self.last_layer(x)


# ============ multi-crop wrapper ============

def resolution_groups(crops):
    """End indices of runs of consecutive crops with the same width, e.g. widths
    [224, 224, 96, 96, 96] -> [2, 5]. Plain Python on the shapes (no device sync)."""
    ends = []
    for i, crop in enumerate(crops):
        if i > 0 and crop.shape[-1] != crops[i - 1].shape[-1]:
            ends.append(i)
    return ends + [len(crops)]


class MultiCropWrapper(nn.Module):
    """backbone + head on a list of crops (DINO's utils.MultiCropWrapper, with iBOT's masks).

    Consecutive crops of the same resolution run through the backbone as one batch (so a ResNet's
    BatchNorm sees per-resolution statistics, as in DINO); the features are concatenated in input
    order and the head runs once. The output stays crop-major: rows [0, B) are crop 0, [B, 2B)
    crop 1, ..., which is what the losses' .chunk(ncrops) expects.

    forward(x, mask=None, return_backbone_feat=False, **kwargs):
        x: list of (B, 3, H_i, W_i) crops (or one tensor); mask: matching list of bool
        (B, H_i/p, W_i/p) iBOT masks, concatenated like the crops; kwargs go to the backbone
        (e.g. return_all_tokens=True). Returns head(features), or (features, head(features)).
    """

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x, mask=None, return_backbone_feat=False, **kwargs):
        if not isinstance(x, (list, tuple)):
            x = [x]
            mask = [mask] if mask is not None else None
        features, start = [], 0
        for end in resolution_groups(x):
            if mask is not None:
                kwargs["mask"] = torch.cat(mask[start:end])
            features.append(self.backbone(torch.cat(x[start:end]), **kwargs))
            start = end
        features = torch.cat(features) if len(features) > 1 else features[0]
        output = self.head(features)
        return (features, output) if return_backbone_feat else output


# ============ loss ============

def teacher_temp_schedule(warmup_temp, temp, warmup_epochs, nepochs):
    """Per-epoch teacher temperature: linspace(warmup_temp, temp, warmup_epochs) (endpoint
    included, so `temp` is reached at epoch warmup_epochs - 1), then constant. A warmup longer
    than the run is cut off instead of failing (the official code crashes)."""
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs),
                           np.ones(max(nepochs - warmup_epochs, 0)) * temp))


@torch.no_grad()
def ema_center_(center, batch_sum, count, momentum):
    """center <- center * m + (all-reduced batch_sum / (count * world)) * (1 - m), in place (DDP
    keeps references to the module's buffers). Every rank ends with the same centre."""
    if distu.is_dist():
        dist.all_reduce(batch_sum)
    batch_center = batch_sum / (count * distu.get_world_size())
    center.copy_(center * momentum + batch_center * (1 - momentum))


def cross_view_entropy(teacher_probs, student_logp, nt):
    """Mean over the (teacher view t, student view s != t) pairs of the batch mean of
    -sum_k q_t log p_s: DINO's (and iBOT's [CLS]) cross-entropy.

    teacher_probs: (nt * B, K), views [t_1..t_nt]; student_logp: (ns * B, K), views
    [s_1..s_ns], whose first nt are the teacher's views (ns >= nt), crop-major. Instead of one
    product per pair (2 * (ns - 1) for DINO), two: the sum over every pair is
    (sum_t q_t) . (sum_s log p_s), and the same-view pairs sum_t q_t . log p_t are taken off.
    Equal to the pairwise sum up to float32 rounding."""
    k = teacher_probs.shape[-1]
    q = teacher_probs.reshape(nt, -1, k)                 # (nt, B, K)
    logp = student_logp.reshape(-1, q.shape[1], k)       # (ns, B, K)
    all_pairs = torch.dot(q.sum(0).flatten(), logp.sum(0).flatten())
    same_view = torch.dot(q.flatten(), logp[:nt].flatten())
    n_pairs = nt * logp.shape[0] - nt
    return (same_view - all_pairs) / (n_pairs * q.shape[1])


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher softmax of the 2 global crops and
    the student softmax of every other crop (main_dino.DINOLoss).

    forward(student_output, teacher_output, epoch, return_stats=False):
        student_output: (ncrops * B, out_dim) crop-major [g1, g2, l1, ..., ln]
        teacher_output: (2 * B, out_dim), the teacher on [g1, g2]
        epoch: int, indexes the teacher temperature schedule
    Returns the 0-d mean over the 2 * ncrops - 2 (teacher view, student view) pairs with
    different views of the per-pair batch-mean cross-entropy; with return_stats, (loss, the
    collapse diagnostics of core.diagnostics.teacher_stats: teacher entropy, batch entropy,
    KL). Afterwards the centre buffer (1, out_dim) moves towards the mean raw teacher logit
    over all ranks; the loss itself uses the centre from before the update.
    """

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # a warmup for the teacher temperature: too high a temperature early makes training unstable
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)

    def forward(self, student_output, teacher_output, epoch, return_stats=False):
        # log-softmax once for all crops (the official code recomputes it for every pair)
        student_logp = F.log_softmax(student_output / self.student_temp, dim=-1,
                                     dtype=torch.float32)
        temp = self.teacher_temp_schedule[epoch]
        with torch.no_grad():
            teacher_probs = F.softmax((teacher_output.float() - self.center) / temp, dim=-1)
        total_loss = cross_view_entropy(teacher_probs, student_logp, 2)
        self.update_center(teacher_output)
        if return_stats:  # each teacher view is in ncrops - 1 pairs, as teacher_stats needs
            return total_loss, teacher_stats(teacher_probs, total_loss)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        """teacher_output: (2B, out_dim) raw logits (before centring and softmax)."""
        batch_sum = torch.sum(teacher_output.float(), dim=0, keepdim=True)
        ema_center_(self.center, batch_sum, len(teacher_output), self.center_momentum)


# ============ EMA teacher ============

def matched_parameters(student, teacher):
    """(student params, teacher params) paired by name, over the names both have (iBOT's rule:
    the teacher lacks the student's masked_embed, and a shared teacher head lists last_layer
    once). For DINO this is simply every parameter, in order."""
    student_params = dict(student.named_parameters())
    names = [n for n, _ in teacher.named_parameters() if n in student_params]
    teacher_params = dict(teacher.named_parameters())
    return [student_params[n] for n in names], [teacher_params[n] for n in names]


@torch.no_grad()
def ema_update_(student_params, teacher_params, momentum):
    """teacher <- m * teacher + (1 - m) * student, as one multi-tensor kernel (a lerp towards
    the student by 1 - m: teacher + (1 - m) * (student - teacher)). Buffers (BatchNorm running
    statistics) are not averaged, as in DINO."""
    torch._foreach_lerp_(teacher_params, student_params, 1 - momentum)


class TeacherStudent(nn.Module):
    """The parts every teacher-student method shares: EMA update, frozen last layer, checkpoint
    keys. Subclasses hold their loss and define forward(views, epoch, it)."""

    def __init__(self, student, teacher, momentum_schedule, freeze_last_layer):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.momentum_schedule = momentum_schedule
        self.freeze_last_layer = freeze_last_layer
        self._ema_params = None

    def after_backward(self, epoch):
        # drop the last layer's gradients during the first epoch(s): AdamW then skips it
        cancel_gradients_last_layer(epoch, self.student, self.freeze_last_layer)

    @torch.no_grad()
    def after_step(self, it):
        if self._ema_params is None:
            # paired lazily: train_ssl may swap BatchNorm modules (SyncBN) after build()
            self._ema_params = matched_parameters(self.student, self.teacher)
        ema_update_(*self._ema_params, float(self.momentum_schedule[it]))

    def eval_backbone(self):
        return self.teacher.backbone

    def checkpoint_modules(self):
        return {"student": self.student, "teacher": self.teacher}


def init_teacher(student, teacher, strict=True):
    """Teacher starts as a copy of the student and never gets a gradient."""
    teacher.load_state_dict(student.state_dict(), strict=strict)
    for p in teacher.parameters():
        p.requires_grad = False


def teacher_momentum_schedule(args, niter_per_ep):
    """Teacher EMA momentum per iteration: cosine from --momentum_teacher to 1, no warmup."""
    return cosine_scheduler(args.momentum_teacher, 1, args.epochs, niter_per_ep)


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """Drop gradients of DINO/iBOT heads' last layer during the first epochs: AdamW then skips
    those parameters entirely (no update, no weight decay), as the official code."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


class DINO(TeacherStudent):
    def __init__(self, student, teacher, dino_loss, momentum_schedule, freeze_last_layer,
                 stats_every=10):
        super().__init__(student, teacher, momentum_schedule, freeze_last_layer)
        self.dino_loss = dino_loss  # main_dino.py's name, also its checkpoint key
        self.teacher_stats = Every(stats_every)  # collapse diagnostics on printed steps only

    def checkpoint_modules(self):
        return {**super().checkpoint_modules(), "dino_loss": self.dino_loss}

    def forward(self, views, epoch, it):
        """views: list of crops [g1, g2, l1, ..., ln], each (B, 3, H, W)."""
        with torch.no_grad():
            teacher_output = self.teacher(views[:2])  # only the 2 global views go to the teacher
        student_output = self.student(views)
        due = self.teacher_stats.due(it)
        out = self.dino_loss(student_output, teacher_output, epoch, return_stats=due)
        loss, stats = out if due else (out, None)
        stats = self.teacher_stats.keep(stats)
        temp = float(self.dino_loss.teacher_temp_schedule[epoch])
        return loss, {"teacher_temp": torch.full((), temp, device=loss.device), **stats}


def build(args, backbone, embed_dim, niter_per_ep):
    """backbone: the student backbone train_ssl.py built (drop_path_rate = --drop_path_rate)."""
    teacher_backbone, _ = build_backbone(args.arch, patch_size=args.patch_size,
                                         img_size=[args.input_size], drop_path_rate=0.0,
                                         cifar_stem=args.cifar_stem, **vit_shape(args))
    student_head = DINOHead(embed_dim, args.out_dim, use_bn=args.use_bn_in_head,
                            norm_last_layer=args.norm_last_layer)
    # the teacher head keeps norm_last_layer at its default (True), as in main_dino.py
    teacher_head = DINOHead(embed_dim, args.out_dim, use_bn=args.use_bn_in_head)
    student = MultiCropWrapper(backbone, student_head)
    teacher = MultiCropWrapper(teacher_backbone, teacher_head)
    init_teacher(student, teacher)
    loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp,
                    args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs)
    return DINO(student, teacher, loss, teacher_momentum_schedule(args, niter_per_ep),
                args.freeze_last_layer, stats_every=getattr(args, "print_freq", 10))


# ============ diagnostics (the method contract's diagnose) ============

def collapse_advice(normalise_head):
    """What to change for each collapse mode (core/diagnostics.collapse_mode), in this family's
    flags; normalise_head: the flag that puts a normalisation into the head."""
    return {
        "uniform": "sharpen the teacher (lower --teacher_temp and --warmup_teacher_temp, 0.04 "
                   "is DINO's default) and raise --momentum_teacher (e.g. 0.9995 for small "
                   "batches); this is why a loss sits at ln K",
        "one-dimension": "soften the teacher (raise --teacher_temp towards 0.07), raise "
                         "--momentum_teacher, use a larger batch (the centre is a batch mean), "
                         f"or normalise the head ({normalise_head})",
    }


COLLAPSE_ADVICE = collapse_advice("--use_bn_in_head true")


def diagnose(stats, args, epoch):
    """One warning line when the teacher collapsed over this epoch (after --warmup_epochs)."""
    return check_collapse(stats, args.out_dim, epoch, args.warmup_epochs, COLLAPSE_ADVICE)
