"""iBOT (Zhou et al. 2022, https://arxiv.org/abs/2111.07832): image BERT pre-training with an
online tokenizer. DINO's [CLS] self-distillation plus masked image modelling: the student sees
its global crops with some patches replaced by a learned `masked_embed` token and must predict,
for each masked patch, the teacher's softmax over `patch_out_dim` prototypes for the unmasked
patch. Details follow https://github.com/bytedance/ibot (main_ibot.py, models/head.py,
loader.py):

    masks           block-wise (BEiT) or random, drawn per global crop in the data workers
                    (--data_backend tensor: per batch from its seed, BatchedMultiCropMask)
    iBOTHead        DINO's MLP on every token; [CLS] -> last_layer, patches -> last_layer2
                    (the same module with --shared_head true)
    iBOTLoss        DINO loss on [CLS] for different views + masked-patch loss for the same view
    teacher         EMA of the student over the parameter names both have

The head, multi-crop wrapper, EMA and temperature schedule come from methods/dino.py.

    torchrun --nproc_per_node=4 train_ssl.py --method ibot --dataset imagefolder \
        --data_path /path/to/imagenet --output_dir out/ibot_vits16
    DATA=/path/to/imagenet sbatch slurm/ibot_pretrain.sh
"""
import math
import os
import random
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.diagnostics import TEACHER_KEYS, Every, check_collapse, teacher_stats
from core.logger import bool_flag
from data import MultiCropTransform
from data.gpu_transforms import batched_transform
from methods import dino
from methods.dino import (MultiCropWrapper, TeacherStudent, WeightNormLinear, add_head_args,
                          add_multicrop_args, cross_view_entropy, add_teacher_temp_args, check_head_args,
                          check_multicrop_args, ema_center_, init_head_weights, init_teacher,
                          teacher_momentum_schedule, teacher_temp_schedule)
from models import build_backbone, vit_shape

# main_ibot.py's defaults for train_ssl.py's generic flags: DINO's, with 128 images per GPU and
# a snapshot every 40 epochs.
RECIPE = dict(dino.RECIPE, batch_size_per_gpu=128, saveckp_freq=40)

NORMS = ("bn", "syncbn", "ln")


# ============ flags (main_ibot.py names and defaults) ============

def add_args(parser):
    group = parser.add_argument_group("iBOT")
    add_head_args(group, out_dim=8192)
    group.add_argument("--patch_out_dim", default=8192, type=int,
                       help="Dimensionality of the head output for patch tokens. Only used "
                            "when neither head is shared: with --shared_head or "
                            "--shared_head_teacher true (the default) it is --out_dim.")
    group.add_argument("--shared_head", default=False, type=bool_flag,
                       help="Whether the student uses the same last layer for [CLS] and patch "
                            "tokens (the README's ViT-S recipe: true).")
    group.add_argument("--shared_head_teacher", default=True, type=bool_flag,
                       help="Same for the teacher.")
    group.add_argument("--norm_in_head", default=None, type=str,
                       help=f"Normalization in the head MLP: none (default) or one of "
                            f"{', '.join(NORMS)}. bn and syncbn are the same here: with several "
                            "processes every BatchNorm uses global statistics.")
    group.add_argument("--act_in_head", default="gelu", choices=["gelu", "relu"],
                       help="Activation in the head MLP.")
    group.add_argument("--drop_path", dest="drop_path_rate", type=float, default=None,
                       help="iBOT's name for --drop_path_rate: stochastic depth of the student.")
    group.add_argument("--load_from", default=None, type=str,
                       help="iBOT's name for --resume_from: resume from this checkpoint, a path "
                            "relative to --output_dir as in main_ibot.py (an absolute one as "
                            "given); default: unset. Unlike main_ibot.py, <output_dir>/checkpoint.pth "
                            "is resumed from without it, and a missing file is an error.")

    group.add_argument("--use_masked_im_modeling", default=True, type=bool_flag,
                       help="Whether to mask the student's global crops.")
    group.add_argument("--pred_ratio", default=[0.3], type=float, nargs="+",
                       help="Ratio of masked patches. With several values, one is drawn per "
                            "crop (the ViT-S recipe: 0 0.3, i.e. half of the crops unmasked).")
    group.add_argument("--pred_ratio_var", default=[0.0], type=float, nargs="+",
                       help="Half-width of the uniform spread around each --pred_ratio value "
                            "(same length; 0 disables; the ViT-S recipe: 0 0.2).")
    group.add_argument("--pred_shape", default="block", choices=["block", "rand"],
                       help="block: BEiT's rectangles; rand: independent patches.")
    group.add_argument("--pred_aspect_ratio", default=[0.3, 1 / 0.3], type=float, nargs=2,
                       help="Aspect-ratio range of the mask blocks.")
    group.add_argument("--pred_start_epoch", default=0, type=int,
                       help="Epoch at which masking starts (typically 50 for Swin).")
    group.add_argument("--lambda1", default=1.0, type=float, help="Weight of the [CLS] loss.")
    group.add_argument("--lambda2", default=1.0, type=float,
                       help="Weight of the masked-patch loss.")

    add_teacher_temp_args(group, warmup_epochs=30)
    group.add_argument("--warmup_teacher_patch_temp", default=0.04, type=float,
                       help="Initial teacher temperature of the patch tokens.")
    group.add_argument("--teacher_patch_temp", default=0.07, type=float,
                       help="Final teacher temperature of the patch tokens.")

    group.add_argument("--global_crops_number", type=int, default=2,
                       help="Number of global views.")
    add_multicrop_args(group, global_scale=(0.14, 1.0), local_number=0)


def check_args(args):
    """Raises ValueError for flags iBOT cannot run with; normalises --norm_in_head none and
    turns iBOT's --load_from into --resume_from."""
    if getattr(args, "load_from", None):
        if args.resume_from:
            raise ValueError("--load_from (iBOT's name) and --resume_from both given; pass one")
        path = os.path.join(args.output_dir, args.load_from)  # main_ibot.py's reading
        own = os.path.join(args.output_dir, "checkpoint.pth")  # resumed from anyway
        args.resume_from = "" if os.path.abspath(path) == os.path.abspath(own) else path
        args.load_from = None  # one flag in the run's record: --resume_from
    check_multicrop_args(args)
    check_head_args(args)
    if args.patch_out_dim < 1 or min(args.warmup_teacher_patch_temp, args.teacher_patch_temp) <= 0:
        raise ValueError(f"--patch_out_dim {args.patch_out_dim} / --warmup_teacher_patch_temp "
                         f"{args.warmup_teacher_patch_temp} / --teacher_patch_temp "
                         f"{args.teacher_patch_temp}: need a width >= 1 and positive temperatures")
    if args.arch.startswith("resnet"):
        raise ValueError(f"iBOT predicts patch tokens, which --arch {args.arch} does not "
                         "have; use a ViT (vit_tiny, vit_small, vit_base) or --method dino")
    if args.global_crops_number < 1 or args.global_crops_number + args.local_crops_number < 2:
        raise ValueError(f"{args.global_crops_number} global + {args.local_crops_number} "
                         "local crops leave no pair of views to compare; use "
                         "--global_crops_number 2")
    if args.norm_in_head is not None and args.norm_in_head.lower() == "none":
        args.norm_in_head = None
    if args.norm_in_head not in (None,) + NORMS:
        raise ValueError(f"--norm_in_head {args.norm_in_head} is not supported; use "
                         f"none or one of {', '.join(NORMS)}")
    MaskGenerator(args.pred_ratio, args.pred_ratio_var, args.pred_aspect_ratio, args.pred_shape)


def input_size(args, info):
    """The ViT is built for the global crop size."""
    return args.global_crops_size


def backbone_kwargs(args):
    """The student needs `masked_embed`, the token that replaces masked patches."""
    return {"masked_im_modeling": args.use_masked_im_modeling}


def build_transform(args, info):
    multicrop = MultiCropTransform(args.global_crops_size, args.local_crops_size,
                                   tuple(args.global_crops_scale), tuple(args.local_crops_scale),
                                   local_number=args.local_crops_number,
                                   global_number=args.global_crops_number,
                                   mean=info.mean, std=info.std)
    masks = MaskGenerator(args.pred_ratio, args.pred_ratio_var, args.pred_aspect_ratio,
                          args.pred_shape)
    return MultiCropMaskTransform(multicrop, masks, args.global_crops_number, args.patch_size)


# ============ masks (loader.ImageFolderMask) ============

class MaskGenerator:
    """Draws one bool (H, W) patch mask per call, True = masked (replaced by masked_embed).

    Ratio: for each (r, v) in zip(pred_ratio, pred_ratio_var) draw U(r - v, r + v) (or r when
    v == 0), then pick one of those at random. Target count high = ratio * H * W.
    'block' (BEiT's MaskingGenerator): add random rectangles of area U((min(H, W) // 3)^2,
    high - count) and aspect ratio log-uniform in pred_aspect_ratio, each adding 1..(high -
    count) new patches, 10 attempts per rectangle, until the target is met or no rectangle fits;
    the achieved ratio is slightly below the target (about 0.29 for 0.3 on 14 x 14).
    'rand': exactly int(high) patches chosen uniformly.
    Uses Python's `random`, which the DataLoader seeds per worker.
    """

    def __init__(self, pred_ratio=(0.3,), pred_ratio_var=(0.0,), pred_aspect_ratio=(0.3, 1 / 0.3),
                 pred_shape="block"):
        self.pred_ratio = [float(r) for r in np.atleast_1d(pred_ratio)]
        self.pred_ratio_var = [float(v) for v in np.atleast_1d(pred_ratio_var)]
        if len(self.pred_ratio) != len(self.pred_ratio_var):
            raise ValueError(f"{len(self.pred_ratio)} --pred_ratio values but "
                             f"{len(self.pred_ratio_var)} --pred_ratio_var values; give one "
                             "variance per ratio (e.g. --pred_ratio 0 0.3 --pred_ratio_var 0 0.2)")
        for r, v in zip(self.pred_ratio, self.pred_ratio_var):
            if not (0 <= v <= r and r + v <= 1):
                raise ValueError(f"--pred_ratio {r} with --pred_ratio_var {v} leaves "
                                 "[0, 1]; need 0 <= var <= ratio and ratio + var <= 1")
        if len(pred_aspect_ratio) != 2 or not 0 < pred_aspect_ratio[0] <= pred_aspect_ratio[1]:
            raise ValueError(f"--pred_aspect_ratio {pred_aspect_ratio} is not a range; "
                             "give two numbers 0 < min <= max, e.g. 0.3 3.33")
        if pred_shape not in ("block", "rand"):
            raise ValueError(f"--pred_shape {pred_shape} is unknown; use block or rand")
        self.log_aspect_ratio = (math.log(pred_aspect_ratio[0]), math.log(pred_aspect_ratio[1]))
        self.pred_shape = pred_shape

    def sample_ratio(self):
        ratios = [random.uniform(r - v, r + v) if v > 0 else r
                  for r, v in zip(self.pred_ratio, self.pred_ratio_var)]
        return random.choice(ratios)

    def __call__(self, height, width, ratio=None):
        """-> bool tensor (height, width); ratio None draws one as described above."""
        high = (self.sample_ratio() if ratio is None else ratio) * height * width
        if self.pred_shape == "rand":
            mask = np.zeros(height * width, dtype=bool)
            mask[random.sample(range(height * width), int(high))] = True
            return torch.from_numpy(mask.reshape(height, width))
        mask = np.zeros((height, width), dtype=bool)
        min_area = (min(height, width) // 3) ** 2
        count = 0
        while count < high:
            max_new = high - count
            added = 0
            for _attempt in range(10):
                area = random.uniform(min_area, max_new)
                aspect = math.exp(random.uniform(*self.log_aspect_ratio))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if w < width and h < height:
                    top = random.randint(0, height - h)
                    left = random.randint(0, width - w)
                    block = mask[top:top + h, left:left + w]  # a view: writes go to mask
                    new = h * w - int(block.sum())
                    if 0 < new <= max_new:
                        block[...] = True
                        added = new
                if added > 0:
                    break
            if added == 0:
                break  # no rectangle fits any more
            count += added
        return torch.from_numpy(mask)


class MultiCropMaskTransform:
    """image -> (crops, masks): the multi-crop views and one mask (H/p, W/p) per global crop.
    Drawn in the DataLoader workers; the default collate turns the masks into a list of bool
    (B, H/p, W/p) tensors. Masks are always drawn: before --pred_start_epoch the model zeroes
    them (persistent workers do not know the epoch)."""

    def __init__(self, multicrop, mask_generator, global_number, patch_size):
        self.multicrop, self.mask_generator = multicrop, mask_generator
        self.global_number, self.patch_size = global_number, patch_size

    def __call__(self, img):
        crops = self.multicrop(img)
        p = self.patch_size
        masks = [self.mask_generator(c.shape[-2] // p, c.shape[-1] // p)
                 for c in crops[:self.global_number]]
        return crops, masks

    def batched(self):
        """The batched twin for --data_backend tensor (the method contract's hook)."""
        return BatchedMultiCropMask(self)

    def __repr__(self):
        return (f"{type(self).__name__}({self.multicrop}, one mask per global crop, "
                f"patch {self.patch_size})")


@contextmanager
def _python_random_seeded(seed):
    """Run with Python's `random` seeded by `seed`, then restore its state (None: unseeded)."""
    if seed is None:
        yield
        return
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


class BatchMasks:
    """(batch_size, seed) -> bool (global_number, batch_size, h, w) on the host: the masks of
    one batch, a function of the seed alone (MaskGenerator with Python's `random` seeded from
    it). Small and picklable: the loaders may draw it ahead in worker processes, as the
    batch_extras of BatchedMultiCropMask (data/loaders.py)."""

    def __init__(self, mask_generator, global_number, shape):
        self.mask_generator, self.global_number, self.shape = mask_generator, global_number, shape

    def __call__(self, batch_size, seed=None):
        with _python_random_seeded(None if seed is None else seed ^ 0x5EED):
            return torch.stack([torch.stack([self.mask_generator(*self.shape)
                                             for _ in range(batch_size)])
                                for _ in range(self.global_number)])

    def __repr__(self):
        return f"iBOT masks ({self.global_number} x {self.shape[0]}x{self.shape[1]} per image)"


class BatchedMultiCropMask:
    """MultiCropMaskTransform on a batch (--data_backend tensor) -> (crops, masks): the batched
    multi-crop views and global_number bool (B, h, w) masks.

    The masks are drawn on the host by the method's own MaskGenerator (the BEiT block algorithm
    is a data-dependent loop per mask), from the batch seed. batch_extras (a BatchMasks) is what
    the loaders run in worker processes ahead of time and pass back as `extras`; without it
    they are drawn here, in the calling process. Either way they reach the device through pinned
    memory. docs/benchmarks.md has the cost of both."""

    def __init__(self, pil):
        self.multicrop = batched_transform(pil.multicrop)
        size = self.multicrop.global1.size
        self.batch_extras = BatchMasks(pil.mask_generator, pil.global_number,
                                       (size[0] // pil.patch_size, size[1] // pil.patch_size))

    def __call__(self, images, seed=None, sizes=None, extras=None):
        crops = self.multicrop(images, seed, sizes)
        masks = self.batch_extras(images.shape[0], seed) if extras is None else extras
        if images.device.type == "cuda" and not masks.is_pinned():
            masks = masks.pin_memory()
        return crops, list(masks.to(images.device, non_blocking=True).unbind(0))


# ============ head (models/head.py) ============

class TokenSequential(nn.Sequential):
    """nn.Sequential that lets BatchNorm normalise (B, N, C) tokens over B * N samples by moving
    the channels to dim 1 and back (iBOT's CustomSequential)."""

    def forward(self, x):
        for module in self:
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and x.ndim > 2:
                x = module(x.transpose(1, -1)).transpose(1, -1)
            else:
                x = module(x)
        return x


class iBOTHead(nn.Module):
    """DINO's head applied to every token, with a second last layer for the patch tokens.

    forward((B, in_dim)) -> (B, out_dim), as DINOHead;
    forward((B, 1+N, in_dim)) -> ((B, out_dim) from [CLS] through last_layer,
                                  (B, N, patch_out_dim) from the patches through last_layer2).
    Keys: mlp.{0,2,4}.*, last_layer.weight_{g,v}, last_layer2.weight_{g,v} (present even when
    shared: state_dict lists the shared module under both names).
    """

    def __init__(self, in_dim, out_dim, patch_out_dim=8192, norm=None, act="gelu",
                 norm_last_layer=True, nlayers=3, hidden_dim=2048, bottleneck_dim=256,
                 shared_head=False):
        super().__init__()
        # As the official head, ONE norm module and ONE activation are reused after every
        # hidden layer (so with bn, mlp.1 and mlp.4 are the same BatchNorm).
        norm_layer = {None: None, "bn": nn.BatchNorm1d, "syncbn": nn.BatchNorm1d,
                      "ln": nn.LayerNorm}[norm]
        norm_layer = norm_layer(hidden_dim) if norm_layer else None
        act_layer = {"gelu": nn.GELU, "relu": nn.ReLU}[act]()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            between = ([norm_layer] if norm_layer else []) + [act_layer]
            layers = [nn.Linear(in_dim, hidden_dim)] + between
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim)] + between
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = TokenSequential(*layers)
        self.apply(init_head_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False
        if shared_head:
            self.last_layer2 = self.last_layer
        else:
            self.last_layer2 = WeightNormLinear(bottleneck_dim, patch_out_dim)
            if norm_last_layer:
                self.last_layer2.weight_g.requires_grad = False

    def forward(self, x):
        x = F.normalize(self.mlp(x).float(), dim=-1, p=2)
        if x.ndim == 2:
            return self.last_layer(x)
        return self.last_layer(x[:, 0]), self.last_layer2(x[:, 1:])


# ============ loss (main_ibot.iBOTLoss) ============

class iBOTLoss(nn.Module):
    """[CLS] self-distillation across views + masked-patch self-distillation within a view.

    forward(student_output, teacher_output, student_local_cls, student_mask, epoch):
        student_output: (cls (ng*B, K), patch (ng*B, N, Kp)), the student on masked global crops
        teacher_output: (cls (ng*B, K), patch (ng*B, N, Kp)), the teacher on unmasked ones
        student_local_cls: (nl*B, K) or None, the student's [CLS] on the local crops
        student_mask: list of bool (B, H/p, W/p) masks; the first ng are used
        epoch: int, indexes both teacher temperature schedules
    Returns {"cls": lambda1 * mean over the ng*(ng+nl) - ng pairs of different views of the
    [CLS] cross-entropy, "patch": lambda2 * mean over the ng global views of the per-image mean
    cross-entropy over masked patches (an image without masked patches counts as 0),
    "loss": cls + patch, and with return_stats the [CLS] teacher's collapse diagnostics of
    core.diagnostics.teacher_stats: "teacher_entropy", "teacher_batch_entropy", "kl"}.
    Then `center` (1, K) and `center2` (1, 1, Kp) move towards the all-reduced batch means of
    the raw teacher [CLS] logits and patch logits (mean over all patches, masked or not).
    """

    def __init__(self, out_dim, patch_out_dim, ngcrops, nlcrops, warmup_teacher_temp,
                 teacher_temp, warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs,
                 nepochs, student_temp=0.1, center_momentum=0.9, center_momentum2=0.9,
                 lambda1=1.0, lambda2=1.0, mim_start_epoch=0):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum, self.center_momentum2 = center_momentum, center_momentum2
        self.ngcrops, self.nlcrops, self.ncrops = ngcrops, nlcrops, ngcrops + nlcrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        # the patch temperature stays at its warmup value until masking starts
        self.teacher_temp2_schedule = np.concatenate((
            np.ones(mim_start_epoch) * warmup_teacher_temp2,
            teacher_temp_schedule(warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs,
                                  nepochs - mim_start_epoch)))

    def forward(self, student_output, teacher_output, student_local_cls, student_mask, epoch,
                return_stats=True):
        student_cls, student_patch = student_output
        teacher_cls, teacher_patch = teacher_output
        if student_local_cls is not None:
            student_cls = torch.cat([student_cls, student_local_cls])

        student_cls_logp = F.log_softmax(student_cls / self.student_temp, dim=-1,
                                         dtype=torch.float32)
        student_patch_logp = F.log_softmax(student_patch / self.student_temp, dim=-1,
                                           dtype=torch.float32)
        temp = self.teacher_temp_schedule[epoch]
        temp2 = self.teacher_temp2_schedule[epoch]
        with torch.no_grad():
            teacher_cls_probs = F.softmax((teacher_cls.float() - self.center) / temp, dim=-1)
            teacher_patch_probs = F.softmax((teacher_patch.float() - self.center2) / temp2, dim=-1)

        # different views: DINO's [CLS] loss over every (global, other crop) pair, two products
        total_loss1 = cross_view_entropy(teacher_cls_probs, student_cls_logp, self.ngcrops)
        # same view: predict the teacher's tokens at the masked patches, all global views at once
        loss2 = torch.sum(-teacher_patch_probs * student_patch_logp, dim=-1)       # (ng*B, N)
        mask = torch.cat(list(student_mask[:self.ngcrops])).flatten(-2, -1)        # (ng*B, N)
        # mean over the masked patches of each image; 0 for an image without any; then the
        # mean over images, which is the mean over the ng views of their batch means
        loss2 = torch.sum(loss2 * mask.float(), dim=-1) / mask.sum(dim=-1).clamp(min=1)
        total_loss2 = loss2.mean() * self.lambda2
        # every global view is the teacher of ncrops - 1 pairs, as teacher_stats needs
        diagnostics = teacher_stats(teacher_cls_probs, total_loss1) if return_stats else {}
        total_loss1 = total_loss1 * self.lambda1
        self.update_center(teacher_cls, teacher_patch)
        return dict(cls=total_loss1, patch=total_loss2, loss=total_loss1 + total_loss2,
                    **diagnostics)

    @torch.no_grad()
    def update_center(self, teacher_cls, teacher_patch):
        """teacher_cls (ng*B, K), teacher_patch (ng*B, N, Kp): raw logits."""
        ema_center_(self.center, torch.sum(teacher_cls.float(), dim=0, keepdim=True),
                    len(teacher_cls), self.center_momentum)
        ema_center_(self.center2, torch.sum(teacher_patch.float().mean(1), dim=0, keepdim=True),
                    len(teacher_patch), self.center_momentum2)


# ============ the method ============

class iBOT(TeacherStudent):
    def __init__(self, student, teacher, ibot_loss, momentum_schedule, freeze_last_layer, ngcrops,
                 use_masked_im_modeling, pred_start_epoch, stats_every=10):
        super().__init__(student, teacher, momentum_schedule, freeze_last_layer)
        self.teacher_stats = Every(stats_every)  # collapse diagnostics on printed steps only
        self.ibot_loss = ibot_loss  # main_ibot.py's name, also its checkpoint key
        self.ngcrops = ngcrops
        self.use_masked_im_modeling = use_masked_im_modeling
        self.pred_start_epoch = pred_start_epoch

    def checkpoint_modules(self):
        return {**super().checkpoint_modules(), "ibot_loss": self.ibot_loss}

    def forward(self, views, epoch, it):
        """views: (crops, masks): crops [g1..g_ng, l1..l_nl] each (B, 3, H, W); masks: ng bool
        (B, H/p, W/p) tensors for the global crops."""
        crops, masks = views
        ng = self.ngcrops
        if epoch < self.pred_start_epoch:  # no masking yet: the patch loss is 0
            masks = [torch.zeros_like(m) for m in masks]
        with torch.no_grad():
            teacher_output = self.teacher(crops[:ng], return_all_tokens=True)
        # the mask is always passed (even all False), so masked_embed is in every step's graph,
        # which DDP (without find_unused_parameters) requires
        student_output = self.student(crops[:ng], return_all_tokens=True,
                                      mask=masks[:ng] if self.use_masked_im_modeling else None)
        # local crops are never masked, and only their [CLS] output is used
        student_local_cls = self.student(crops[ng:], return_all_tokens=True)[0] \
            if len(crops) > ng else None
        due = self.teacher_stats.due(it)
        losses = self.ibot_loss(student_output, teacher_output, student_local_cls, masks, epoch,
                                return_stats=due)
        diagnostics = self.teacher_stats.keep({k: losses[k] for k in TEACHER_KEYS} if due else None)

        device = losses["loss"].device
        temp = float(self.ibot_loss.teacher_temp_schedule[epoch])
        temp2 = float(self.ibot_loss.teacher_temp2_schedule[epoch])
        stats = {"cls": losses["cls"].detach(), "patch": losses["patch"].detach(),
                 "teacher_temp": torch.full((), temp, device=device),
                 "teacher_patch_temp": torch.full((), temp2, device=device),
                 **diagnostics}
        if ng > 1:  # main_ibot's "acc": student (view 2) and teacher (view 1) agree on the argmax
            with torch.no_grad():
                t1 = teacher_output[0].chunk(ng)[0].argmax(-1)
                s2 = student_output[0].chunk(ng)[1].argmax(-1)
                stats["acc"] = (t1 == s2).float().mean()
        return losses["loss"], stats


def build(args, backbone, embed_dim, niter_per_ep):
    """backbone: the student ViT train_ssl.py built with backbone_kwargs(args), so with
    `masked_embed` under --use_masked_im_modeling (the teacher has none, as in iBOT)."""
    teacher_backbone, _ = build_backbone(args.arch, patch_size=args.patch_size,
                                         img_size=[args.input_size], drop_path_rate=0.0,
                                         cifar_stem=args.cifar_stem, **vit_shape(args))

    # official: the loss uses out_dim for patches when either head is shared; use the same
    # size for the student's separate last_layer2, which the official code would fail to copy
    # into a shared teacher head otherwise
    same_dim = args.shared_head or args.shared_head_teacher
    patch_dim = args.out_dim if same_dim else args.patch_out_dim
    if same_dim and args.patch_out_dim != args.out_dim:
        print(f"iBOT: a shared head predicts patches with --out_dim {args.out_dim} outputs; "
              f"--patch_out_dim {args.patch_out_dim} is ignored.")
    head = dict(patch_out_dim=patch_dim, norm=args.norm_in_head, act=args.act_in_head)
    student = MultiCropWrapper(backbone, iBOTHead(embed_dim, args.out_dim, **head,
                                                  norm_last_layer=args.norm_last_layer,
                                                  shared_head=args.shared_head))
    teacher = MultiCropWrapper(teacher_backbone, iBOTHead(embed_dim, args.out_dim, **head,
                                                          shared_head=args.shared_head_teacher))
    # strict=False as the official code: the teacher has no masked_embed. Official quirk, kept:
    # with a shared teacher head and separate student heads, the student's last_layer2 is
    # copied after its last_layer into the one shared layer, so the teacher starts from the
    # patch layer; the EMA (matched by name) then pulls it towards the student's last_layer.
    init_teacher(student, teacher, strict=False)
    loss = iBOTLoss(args.out_dim, patch_dim, args.global_crops_number, args.local_crops_number,
                    args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_patch_temp,
                    args.teacher_patch_temp, args.warmup_teacher_temp_epochs, args.epochs,
                    lambda1=args.lambda1, lambda2=args.lambda2,
                    mim_start_epoch=args.pred_start_epoch)
    return iBOT(student, teacher, loss, teacher_momentum_schedule(args, niter_per_ep),
                args.freeze_last_layer, args.global_crops_number, args.use_masked_im_modeling,
                args.pred_start_epoch, stats_every=getattr(args, "print_freq", 10))


COLLAPSE_ADVICE = dino.collapse_advice("--norm_in_head bn")


def diagnose(stats, args, epoch):
    """One warning line when the teacher's [CLS] output collapsed over this epoch (after
    --warmup_epochs), as DINO's."""
    return check_collapse(stats, args.out_dim, epoch, args.warmup_epochs, COLLAPSE_ADVICE)
