"""A checkpoint -> the model flags -> the backbone, the file read once:

    load_backbone(args)      read --pretrained_weights, fill the model flags left unset from it,
                             build the backbone, load the weights and the normalisation they
                             were trained with; returns (backbone, embed_dim)
    resolve_model_flags(args, ckpt)   the flags left at None: command line, then the checkpoint's
                             args, then the shapes of its weights, then the defaults
    flags_from_weights(ckpt), guess_num_heads(width)   what bare weights (no args) tell
"""
import torch

from core.checkpoint import (checkpoint_args, extract_backbone_state, load_file,
                             load_pretrained_weights, weights_arch)
from data.normalization import resolve_eval_norm
from models import (VIT_SHAPE, VIT_SIZES, build_backbone, check_patch_size, check_vit_shape,
                    vit_shape)


def guess_num_heads(width):
    """Attention heads of a ViT of this width when only its weights are known (the qkv weight is
    (3D, D) whatever the heads): the fewest heads of at most 64 channels each, which gives every
    DINO size's (192: 3, 384: 6, 768: 12) and 8 for the RotNet ViT recipe's 512."""
    return next(h for h in range(1, width + 1) if width % h == 0 and width // h <= 64)


def flags_from_weights(ckpt, checkpoint_key="teacher"):
    """Model flags read off the tensors of weights that carry no args (released backbones):
    a ViT's patch size and width from patch_embed.proj.weight (D, 3, p, p) and its depth from
    the blocks.<i> keys: the named size of that width and depth (vit_nano/tiny/small/base),
    else vit_small with embed_dim, depth and num_heads (guess_num_heads) set; a ResNet's depth
    from its blocks (core.checkpoint.weights_arch) and its stem from conv1.weight (3x3: CIFAR
    stem, 7x7: ImageNet stem)."""
    sd, _ = extract_backbone_state(ckpt, checkpoint_key)
    found = {}
    arch = weights_arch(sd)
    if arch:
        found["arch"] = arch
    w = sd.get("patch_embed.proj.weight")
    if torch.is_tensor(w) and w.ndim == 4:
        found["patch_size"] = int(w.shape[-1])
        width = int(w.shape[0])
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        named = [n for n, (d, L, _) in VIT_SIZES.items() if (d, L) == (width, depth)]
        same_width = [n for n, (d, _, _) in VIT_SIZES.items() if d == width and n != "vit_nano"]
        if named:
            found["arch"] = named[0]
        elif same_width:  # e.g. a ViT-S of 6 blocks
            found.update(arch=same_width[0], depth=depth)
        elif width > 0 and depth > 0:
            found.update(arch="vit_small", embed_dim=width, depth=depth,
                         num_heads=guess_num_heads(width))
            print(f"Weights of a ViT of width {width} and depth {depth} without their flags: "
                  f"assuming {found['num_heads']} heads (pass --num_heads if it had others).")
    w = sd.get("conv1.weight")
    if torch.is_tensor(w) and w.ndim == 4:
        found["cifar_stem"] = int(w.shape[-1]) == 3
    return found


def resolve_model_flags(args, ckpt=None, default_image_size=None):
    """Fill the model flags left at None (--arch --patch_size --embed_dim --depth --num_heads
    --image_size --cifar_stem), in this order of preference: the command line, the args stored
    in the checkpoint, the shapes of its weights, the defaults (vit_small, patch 16, the arch's
    own shape, the training crop or default_image_size, a CIFAR stem at 64px and below). The
    ViT shape is taken from the checkpoint only for the arch it was trained with (an --arch
    given on the command line that differs keeps its own). Returns the size to build the
    network at."""
    found = {k: v for k, v in checkpoint_args(ckpt).items() if v is not None}
    # (official DINO ResNet checkpoints store arch but no stem: conv1 tells it)
    if ckpt is not None and any(k not in found for k in ("arch", "patch_size", "cifar_stem")):
        found = {**flags_from_weights(ckpt, args.checkpoint_key), **found}
    for name, default in (("arch", "vit_small"), ("patch_size", 16)):
        if getattr(args, name, None) is None:
            setattr(args, name, found.get(name, default))
    for name in VIT_SHAPE:
        if getattr(args, name, None) is None and args.arch == found.get("arch"):
            setattr(args, name, found.get(name))
    check_vit_shape(args.arch, args)
    if getattr(args, "image_size", None) is None:
        args.image_size = (found.get("input_size") or found.get("global_crops_size")
                           or found.get("image_size"))
        if args.image_size is None and ckpt is None:
            args.image_size = default_image_size  # random init: build for this resolution
    if getattr(args, "cifar_stem", None) is None:
        args.cifar_stem = found.get("cifar_stem", bool(args.image_size and args.image_size <= 64))
    build_size = args.image_size or 224
    args.image_size = args.image_size or default_image_size
    return build_size


def load_backbone(args, default_image_size=None, **build_kwargs):
    """The backbone named by the model flags with --pretrained_weights loaded, the file read
    once; flags left unset come from it (resolve_model_flags), so `--pretrained_weights
    out/checkpoint.pth` needs no model flags, and so do the normalisation statistics
    (args.norm_mean / args.norm_std, printed). Returns (backbone, embed_dim)."""
    ckpt = load_file(args.pretrained_weights) if args.pretrained_weights else None
    build_size = resolve_model_flags(args, ckpt, default_image_size)
    check_patch_size(args.arch, args.patch_size, args.image_size or build_size, "--image_size",
                     fixed_patch=ckpt is not None)
    backbone, embed_dim = build_backbone(args.arch, patch_size=args.patch_size, img_size=[build_size],
                                         cifar_stem=args.cifar_stem, **vit_shape(args),
                                         **build_kwargs)
    load_pretrained_weights(backbone, args.pretrained_weights, args.checkpoint_key, ckpt=ckpt)
    # the normalisation the weights were trained with, unless flags say otherwise; the scripts
    # build their transforms from args.norm_mean / args.norm_std (data.normalization.with_norm)
    resolve_eval_norm(args, checkpoint_args(ckpt), ckpt is not None)
    return backbone, embed_dim
