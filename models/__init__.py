"""Backbones by name, and the evaluation features every eval script shares.

build_backbone("vit_small", patch_size=16) -> (model, 384); the arch names are the builder
functions below, so adding a builder adds an arch. "deit_tiny"/"deit_small" are accepted as in
official DINO, which rewrites "deit" to "vit".
"""
import torch

from .resnet import ResNet, resnet18, resnet34, resnet50
from .heads import MLPClassifier
from .vision_transformer import (VIT_SIZES, VisionTransformer, resize_pos_embed, vit_base, vit_nano,
                                 vit_size, vit_small, vit_tiny)

_VITS = {f.__name__: f for f in (vit_nano, vit_tiny, vit_small, vit_base)}
_RESNETS = {f.__name__: f for f in (resnet18, resnet34, resnet50)}
ARCHS = list(_VITS) + list(_RESNETS)
ALIASES = {"deit_tiny": "vit_tiny", "deit_small": "vit_small"}
# the only keyword arguments a ResNet understands; ViT-only ones are dropped for it
_RESNET_KWARGS = ("zero_init_residual", "width_per_group", "norm_layer")
VIT_SHAPE = ("embed_dim", "depth", "num_heads")  # the flags that change a ViT arch's size


def vit_shape(args):
    """{embed_dim, depth, num_heads} of the flags (argparse Namespace or dict) that are set
    (not None): the keywords that make build_backbone build that shape; {} for the arch's own."""
    get = args.get if isinstance(args, dict) else lambda k: getattr(args, k, None)
    return {k: get(k) for k in VIT_SHAPE if get(k) is not None}


def check_vit_shape(arch, flags):
    """Refuse, before anything is built, a --embed_dim / --depth / --num_heads (the set ones of
    `flags`, a Namespace or dict) that cannot size --arch: any on a ResNet, a width the heads
    do not divide, a value below 1. Unknown archs are left to build_backbone."""
    shape = vit_shape(flags)
    arch = ALIASES.get(arch, arch)
    if arch in _VITS:
        vit_size(arch, **shape)
    elif arch in _RESNETS and shape:
        given = " ".join(f"--{k} {v}" for k, v in shape.items())
        raise ValueError(f"{given} only sizes a ViT, not --arch {arch}; drop it or pick a vit_* "
                         "arch")


def build_backbone(arch, patch_size=16, img_size=224, drop_path_rate=0.0, cifar_stem=False, **kwargs):
    """Backbone without classifier (num_classes=0) and its feature dimension.

    ViT: extra kwargs (embed_dim, depth, num_heads: None keeps the arch's own; masked_im_modeling,
    return_all_tokens, use_mean_pooling, ...) are passed on.
    ResNet: patch_size, img_size, drop_path_rate and ViT-only kwargs are ignored (a ViT shape
    given to it is refused); cifar_stem is used.
    """
    arch = ALIASES.get(arch, arch)
    if arch in _VITS:
        model = _VITS[arch](patch_size=patch_size, img_size=img_size, drop_path_rate=drop_path_rate,
                            num_classes=0, **kwargs)
    elif arch in _RESNETS:
        check_vit_shape(arch, kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k in _RESNET_KWARGS}
        model = _RESNETS[arch](num_classes=0, cifar_stem=cifar_stem, **kwargs)
    else:
        raise ValueError(f"unknown --arch '{arch}'; choose one of: {', '.join(ARCHS + list(ALIASES))}")
    return model, model.embed_dim


def check_patch_size(arch, patch_size, size, what, fixed_patch=False):
    """A ViT cuts its input into patch_size x patch_size patches and silently drops the pixels
    left over at the right and bottom edges: refuse a size (`what`: the flag or description
    named in the message) that the patch size does not divide. ResNets take any size.
    fixed_patch: the patch size is the loaded weights' own, so the message asks for another
    size (a flag `what`) rather than another patch size."""
    if ALIASES.get(arch, arch) not in _VITS or size % patch_size == 0:
        return
    lo, hi = size - size % patch_size, size - size % patch_size + patch_size
    sizes = " or ".join(str(s) for s in (lo, hi) if s > 0)
    drop = (f"--patch_size {patch_size} does not divide {what} {size}: the ViT would drop the last "
            f"{size % patch_size} pixel rows and columns; ")
    if fixed_patch and what.startswith("--"):
        raise ValueError(f"{drop}the weights have {patch_size}x{patch_size} patches, so pass "
                         f"{what} {sizes}")
    fits = [p for p in (4, 8, 14, 16) if size % p == 0]
    hint = f", e.g. {' or '.join(map(str, fits))}" if fits else ""
    other = f", or {what} {sizes}" if what.startswith("--") else ""
    raise ValueError(f"{drop}use a patch size that divides it{hint}{other}")


def is_vit(model):
    return isinstance(model, VisionTransformer)


def _check_eval_args(model, n_last_blocks, avgpool_patchtokens):
    if avgpool_patchtokens not in (0, 1, 2):
        raise ValueError(f"--avgpool_patchtokens {avgpool_patchtokens} is not one of 0, 1, 2; "
                         "use 0 (CLS), 1 (patch mean) or 2 (both)")
    if not 1 <= n_last_blocks <= len(model.blocks):
        raise ValueError(f"--n_last_blocks {n_last_blocks} is outside 1..{len(model.blocks)}; "
                         "use 1 (k-NN) or 4 (ViT-S linear probe)")


def feature_dim(model, n_last_blocks=1, avgpool_patchtokens=0):
    """Size F of the features `extract_features` returns with the same arguments."""
    if not is_vit(model):
        return model.num_features
    _check_eval_args(model, n_last_blocks, avgpool_patchtokens)
    return model.embed_dim * {0: n_last_blocks, 1: 1, 2: n_last_blocks + 1}[avgpool_patchtokens]


def extract_features(model, x, n_last_blocks=1, avgpool_patchtokens=0):
    """Evaluation features (B, F) for k-NN, linear probing and fine-tuning; x: (B, 3, H, W).

    ViT (iBOT eval layout, from the normed outputs of get_intermediate_layers):
      avgpool 0: [CLS of each of the last n blocks]; n=1 is model(x), DINO's k-NN feature;
      avgpool 1: mean of the last block's patch tokens (n ignored);
      avgpool 2: [CLS of the last n blocks..., patch mean of the last block].
    ResNet: the pooled features (B, 512 * expansion); n_last_blocks and avgpool are ignored.
    """
    if not is_vit(model):
        return model(x)
    _check_eval_args(model, n_last_blocks, avgpool_patchtokens)
    out = model.get_intermediate_layers(x, n_last_blocks)
    feats = [o[:, 0] for o in out] if avgpool_patchtokens in (0, 2) else []
    if avgpool_patchtokens in (1, 2):
        feats.append(out[-1][:, 1:].mean(dim=1))
    return torch.cat(feats, dim=-1)


def layerwise_features(model, x):
    """One feature per depth, for a layer-by-layer probe; x: (B, 3, H, W).

    ViT: the normed CLS (B, D) after every block (through the final norm, as get_intermediate_layers).
    ResNet: the 4 global-average-pooled stage outputs (B, C_i).
    """
    if is_vit(model):
        return [o[:, 0] for o in model.get_intermediate_layers(x, n=len(model.blocks))]
    return model.forward_stages(x)


__all__ = ["ARCHS", "ALIASES", "VIT_SHAPE", "VIT_SIZES", "MLPClassifier", "vit_shape", "check_vit_shape", "build_backbone", "check_patch_size", "is_vit", "extract_features", "feature_dim",
           "layerwise_features", "resize_pos_embed", "VisionTransformer", "ResNet"]
