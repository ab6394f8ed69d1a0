"""Export a checkpoint of ours for the official scripts of facebookresearch/dino and
bytedance/ibot (eval_knn.py, eval_linear.py, visualize_attention.py, ...), which load it
unpatched.

    python export_official.py --pretrained_weights out/dino/checkpoint.pth --output teacher_official.pth
    # then, in a clone of facebookresearch/dino:
    python eval_knn.py --arch vit_tiny --patch_size 8 --pretrained_weights teacher_official.pth \
        --data_path /path/to/imagenet

The official scripts build their ViT for 224px images (`vits.vit_small(patch_size=8,
num_classes=0)`: a positional embedding of 1 + (224/8)^2 = 785 tokens) and load the weights
as they are, so a ViT trained here at 32px (1 + 4^2 = 17 tokens) stops them with a size
mismatch. The export resizes the table to the --image_size grid with the very function our ViT
calls in its forward (models.vision_transformer.resize_pos_embed: DINO's bicubic
interpolate_pos_encoding), so the exported network at 224px computes what ours computes at
224px. The official scripts also always normalise with ImageNet's mean and std: when the weights
were trained with other statistics (CIFAR's, --norm_stats auto, ...), --fold_normalization
(default) rescales the patch embedding so that the exported ViT on ImageNet-normalised pixels
computes what ours computes on its own normalisation (exact: the patch convolution sees no
padding). Each export is checked on a random image before it is written.

--layout backbone (default): a bare backbone state dict, as the released
dino_deitsmall16_pretrain.pth (every official script loads it whatever its --checkpoint_key).
--layout checkpoint: main_dino.py's checkpoint.pth layout, {"teacher", "student"} with
`backbone.` / `head.` keys (official --checkpoint_key teacher or student).
The exported file holds no training args: keep checkpoint.pth for use here.
"""
import argparse
import os

import torch

from core import cli
from core.checkpoint import (checkpoint_args, load_file, load_pretrained_weights, save_atomic,
                             strip_prefixes)
from core.model_flags import resolve_model_flags
from core.logger import bool_flag
from data.datasets import IMAGENET_MEAN, IMAGENET_STD
from data.normalization import checkpoint_stats
from models import ARCHS, build_backbone, check_patch_size, is_vit, resize_pos_embed

OFFICIAL_VITS = ("vit_tiny", "vit_small", "vit_base")  # what vits.__dict__[args.arch] builds


def get_args_parser():
    parser = cli.ArgumentParser("Export a checkpoint for the official DINO / iBOT scripts",
                                formatter_class=cli.HelpFormatter)
    parser.add_argument("--pretrained_weights", required=True, type=str,
                        help="A train_ssl.py checkpoint (or any weights the evaluation scripts "
                             "read).")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help="Network to export with --layout backbone (teacher or student; "
                             "SimCLR / rotation checkpoints hold one network).")
    parser.add_argument("--output", required=True, type=str, help="The .pth file to write.")
    parser.add_argument("--image_size", default=224, type=int,
                        help="Resolution the official model is built for (their ViTs: 224, "
                             "img_size=[224]); the positional embedding gets its grid.")
    parser.add_argument("--layout", default="backbone", choices=["backbone", "checkpoint"],
                        help="backbone: a bare backbone state dict (as dino_deitsmall16_pretrain"
                             ".pth); checkpoint: main_dino.py's {teacher, student} with "
                             "backbone./head. keys (DINO and iBOT checkpoints).")
    parser.add_argument("--fold_normalization", default=True, type=bool_flag,
                        help="ViT weights trained with other statistics than ImageNet's: fold "
                             "the difference into the patch embedding, since the official "
                             "scripts normalise with ImageNet's.")
    parser.add_argument("--arch", default=None, type=str, choices=ARCHS,
                        help="Default: from the checkpoint's args or the shape of its weights.")
    parser.add_argument("--patch_size", default=None, type=int,
                        help="Default: from the checkpoint's args or its patch embedding.")
    return parser


def fold_normalization(weight, bias, mean, std, to_mean=IMAGENET_MEAN, to_std=IMAGENET_STD):
    """(weight', bias') of a patch convolution (D, 3, p, p) that gives on pixels normalised with
    (to_mean, to_std) what (weight, bias) gives on the same pixels normalised with (mean, std):
    x = (x' * to_std + to_mean - mean) / std, and the convolution has no padding."""
    mean, std, to_mean, to_std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1)
                                  for v in (mean, std, to_mean, to_std))
    w = weight.double()
    new_w = w * to_std / std
    new_b = bias.double() + (w * (to_mean - mean) / std).sum(dim=(1, 2, 3))
    return new_w.to(weight.dtype), new_b.to(bias.dtype)


def convert_network(sd, patch_size, image_size, stats=None):
    """A state dict (keys with or without `backbone.` / `module.` prefixes) with its ViT
    positional embedding resized to the image_size grid and, with stats (mean, std), the
    normalisation folded into the patch embedding. Other tensors are kept as they are."""
    out = dict(sd)
    bare = {strip_prefixes({k: None}).popitem()[0]: k for k in sd}  # stripped name -> key
    if "pos_embed" in bare:
        key = bare["pos_embed"]
        grid = (image_size // patch_size) ** 2
        if sd[key].shape[1] != 1 + grid:
            with torch.no_grad():
                out[key] = resize_pos_embed(sd[key], patch_size, image_size, image_size)
    if stats is not None and "patch_embed.proj.weight" in bare:
        w, b = bare["patch_embed.proj.weight"], bare["patch_embed.proj.bias"]
        out[w], out[b] = fold_normalization(sd[w], sd[b], *stats)
    return out


def official_commands(arch, patch_size, output, layout):
    key = " --checkpoint_key teacher" if layout == "checkpoint" else ""
    if arch.startswith("resnet"):
        return [f"python eval_knn.py --arch {arch} --pretrained_weights {output}{key} "
                "--data_path /path/to/imagenet"]
    flags = f"--arch {arch} --patch_size {patch_size} --pretrained_weights {output}{key}"
    return [f"python eval_knn.py {flags} --data_path /path/to/imagenet",
            f"python eval_linear.py {flags} --n_last_blocks 4 --avgpool_patchtokens false "
            "--data_path /path/to/imagenet",
            f"python visualize_attention.py {flags} --image_path img.jpg"]


def _show(values):
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def export(args, check=True):
    """Write args.output; returns the exported dict. check: compare the exported network with
    ours on a random image first (check_export)."""
    if os.path.abspath(args.output) == os.path.abspath(args.pretrained_weights):
        raise ValueError(f"--output {args.output} is the checkpoint itself; pass another file")
    ckpt = load_file(args.pretrained_weights)
    flags = argparse.Namespace(arch=args.arch, patch_size=args.patch_size, image_size=None,
                               cifar_stem=None, checkpoint_key=args.checkpoint_key)
    build_size = resolve_model_flags(flags, ckpt)
    model, _ = build_backbone(flags.arch, patch_size=flags.patch_size, img_size=[build_size],
                              cifar_stem=flags.cifar_stem)
    load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, ckpt=ckpt)
    model.eval()
    mean, std, how = checkpoint_stats(checkpoint_args(ckpt))
    differs = any(abs(a - b) > 1e-6 for a, b in zip(mean + std, IMAGENET_MEAN + IMAGENET_STD))
    vit = is_vit(model)
    if not vit and flags.cifar_stem:
        raise ValueError(f"{args.pretrained_weights} holds a {flags.arch} with the CIFAR stem (3x3 "
                         "conv1, no max-pool), which torchvision's ResNet (the official scripts' "
                         "model) cannot hold; only ResNets trained with --cifar_stem false export")
    if vit:
        check_patch_size(flags.arch, flags.patch_size, args.image_size, "--image_size",
                         fixed_patch=True)
    stats = (mean, std) if vit and differs and args.fold_normalization else None
    if differs and stats is None:
        print(f"Note: these weights were trained with mean {_show(mean)} std {_show(std)}, "
              f"{how}; the official scripts normalise with ImageNet's"
              + ("" if vit else " (a ResNet's conv1 has no bias to fold the difference into)")
              + ".")
    elif stats is not None:
        print(f"Folding the normalisation into the patch embedding: the weights were trained with "
              f"mean {_show(mean)} std {_show(std)}, {how}; the official scripts use ImageNet's.")

    backbone = convert_network(model.state_dict(), flags.patch_size, args.image_size, stats)
    if args.layout == "backbone":
        dropped = [k for k in ("masked_embed",) if k in backbone]  # iBOT's training-only token
        out = {k: v for k, v in backbone.items() if k not in dropped}
        if dropped:
            print(f"Dropped {', '.join(dropped)} (iBOT's mask token, used in training only).")
    else:
        nets = [k for k in ("teacher", "student") if isinstance(ckpt.get(k), dict)]
        if not nets:
            raise ValueError(f"{args.pretrained_weights} has no 'teacher' / 'student' networks "
                             "(a SimCLR or rotation checkpoint holds one under 'model'); pass "
                             "--layout backbone")
        out = {k: convert_network(ckpt[k], flags.patch_size, args.image_size, stats) for k in nets}
        if isinstance(ckpt.get("epoch"), int):
            out["epoch"] = ckpt["epoch"]
    if vit and check:
        check_export(model, backbone, flags, args.image_size, stats)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_atomic(out, args.output)
    grid = args.image_size // flags.patch_size if vit else None
    print(f"Wrote {args.output} ({args.layout} layout, {flags.arch}"
          + (f"/{flags.patch_size}, positional embedding for {grid}x{grid} patches of a "
             f"{args.image_size}px image" if vit else "") + ").")
    if vit and flags.arch not in OFFICIAL_VITS:
        print(f"Note: the official scripts have no {flags.arch} (their ViTs: "
              f"{', '.join(OFFICIAL_VITS)}).")
    else:
        print("In a clone of facebookresearch/dino (or bytedance/ibot's evaluation/), e.g.:\n  "
              + "\n  ".join(official_commands(flags.arch, flags.patch_size, args.output,
                                              args.layout)))
    return out


@torch.no_grad()
def check_export(model, exported, flags, image_size, stats):
    """The exported backbone, in a ViT built for image_size as the official scripts build
    theirs and loaded with strict=True, gives on an ImageNet-normalised random image (with
    stats: that image's pixels normalised by stats) what our model gives."""
    official, _ = build_backbone(flags.arch, patch_size=flags.patch_size, img_size=[image_size])
    official.load_state_dict({k: v for k, v in exported.items() if k != "masked_embed"},
                             strict=True)
    official.eval()
    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    ours_in = x
    if stats is not None:  # the same pixels, normalised as our model was trained
        view = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
        pixels = x * view(IMAGENET_STD) + view(IMAGENET_MEAN)
        ours_in = (pixels - view(stats[0])) / view(stats[1])
    diff = (official(x) - model(ours_in)).abs().max().item()
    print(f"Checked: at {image_size}px the exported network and ours differ by at most {diff:.2e}.")
    if diff > 1e-3:
        raise ValueError(f"the exported network differs from ours by {diff:.2e} at "
                         f"{image_size}px; please report this")


if __name__ == "__main__":
    cli.run(lambda: export(get_args_parser().parse_args()))
