"""The per-channel mean and std every transform normalises with (T.Normalize(mean, std)), chosen
once per run and kept in the checkpoint, so that training and evaluation agree.

train_ssl.py (add_norm_args(parser)):
    --norm_stats dataset    the dataset's registry statistics (default: measured ones for CIFAR,
                            STL-10 and digits, ImageNet's for imagefolder, tiny-imagenet, npy)
    --norm_stats imagenet   ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)
    --norm_stats auto       measured once on the train split (dataset_stats)
    --norm_mean m m m --norm_std s s s   given (win over --norm_stats)
  resolve_train_norm(args, info) fills args.norm_mean / args.norm_std with the values used, which
  train_ssl.py stores in checkpoint.pth's "args".

The evaluation scripts (add_norm_args(parser, evaluation=True)) add --norm_stats checkpoint, their
default: the statistics the weights were trained with (checkpoint_stats): a train_ssl.py
checkpoint's norm_mean / norm_std, or for older ones its dataset's registry statistics; weights
without our args (official DINO / iBOT, torchvision, timm) were trained with ImageNet's. Without
weights (random init) the dataset's. resolve_eval_norm(args, ckpt) prints which are used.
"""
import argparse
from dataclasses import replace

import numpy as np

from .datasets import (DATASETS, IMAGENET_MEAN, IMAGENET_STD, build_dataset, dataset_info,
                       resolve_dataset)

TRAIN_CHOICES = ("dataset", "imagenet", "auto")
EVAL_CHOICES = ("checkpoint",) + TRAIN_CHOICES
# --norm_stats auto decodes at most this many images of an image-file split (evenly spaced);
# uint8 arrays (CIFAR, STL-10, npy, digits) are read whole.
AUTO_MAX_FILES = 2000


def _three(values, flag):
    if values is None:
        return None
    if len(values) == 1:
        values = values * 3  # one value for all three channels (grey data)
    if len(values) != 3:
        raise ValueError(f"{flag} takes 3 values (R G B) or one for all channels, not "
                         f"{len(values)}")
    return [float(v) for v in values]


def add_norm_args(parser, evaluation=False):
    """--norm_stats, --norm_mean, --norm_std (a group of `parser`)."""
    group = parser.add_argument_group("Normalisation (T.Normalize(mean, std) of every transform)")
    if evaluation:
        group.add_argument("--norm_stats", default="checkpoint", choices=EVAL_CHOICES,
                           help="checkpoint: the statistics the weights were trained with (ours: "
                                "stored in their args; official DINO/iBOT, torchvision, timm: "
                                "ImageNet's; no weights: the dataset's); dataset: the dataset's "
                                "registry values; imagenet; auto: measured on --dataset's train "
                                "split.")
    else:
        group.add_argument("--norm_stats", default="dataset", choices=TRAIN_CHOICES,
                           help="dataset: the registry values of --dataset (measured ones for "
                                "CIFAR-10/100, STL-10, digits; ImageNet's for imagefolder, "
                                "tiny-imagenet, npy); imagenet; auto: measured once on the train "
                                f"split (image files: {AUTO_MAX_FILES} evenly spaced). The values "
                                "used are stored in the checkpoint's args (norm_mean, norm_std) "
                                "and the evaluation scripts use them.")
    group.add_argument("--norm_mean", default=None, type=float, nargs="+",
                       help="Per-channel mean in [0, 1], R G B (one value: all three), as in "
                            "DINO's transforms.Normalize((0.485, 0.456, 0.406), ...); with "
                            "--norm_std, overrides --norm_stats (default: unset, from "
                            "--norm_stats).")
    group.add_argument("--norm_std", default=None, type=float, nargs="+",
                       help="Per-channel std, R G B (one value: all three); with --norm_mean "
                            "(default: unset, from --norm_stats).")
    return group


def check_norm_args(args):
    """--norm_mean and --norm_std: both or neither, 3 values (or 1), std > 0."""
    args.norm_mean = _three(args.norm_mean, "--norm_mean")
    args.norm_std = _three(args.norm_std, "--norm_std")
    if (args.norm_mean is None) != (args.norm_std is None):
        given, other = ("--norm_mean", "--norm_std") if args.norm_mean is not None \
            else ("--norm_std", "--norm_mean")
        raise ValueError(f"{given} given without {other}; pass both (or neither, to use "
                         f"--norm_stats {args.norm_stats})")
    if args.norm_std is not None and min(args.norm_std) <= 0:
        raise ValueError(f"--norm_std {' '.join(map(str, args.norm_std))} has a value <= 0; "
                         "a std must be positive")


def _show(values):
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _channel_sums(array, layout):
    """(sum, sum of squares, count) per RGB channel of a uint8 array, in chunks."""
    n = array.shape[0]
    s, s2, count = np.zeros(3), np.zeros(3), 0
    for i in range(0, n, 1024):
        chunk = np.asarray(array[i:i + 1024])
        if layout == "nchw":
            chunk = chunk.transpose(0, 2, 3, 1)
        if chunk.ndim == 3:
            chunk = chunk[..., None]
        x = chunk.reshape(-1, chunk.shape[-1]).astype(np.float64)
        if x.shape[1] == 1:  # grey: the dataset converts it to RGB by replication
            x = np.repeat(x, 3, axis=1)
        s += x.sum(0)
        s2 += (x * x).sum(0)
        count += x.shape[0]
    return s, s2, count


def dataset_stats(name, root, max_files=AUTO_MAX_FILES):
    """(mean, std) per RGB channel in [0, 1] of the train split of dataset `name`, over all its
    pixels: uint8 arrays (CIFAR, STL-10, npy, digits) whole, image files (imagefolder,
    tiny-imagenet) on `max_files` evenly spaced images, decoded as the dataset decodes them.
    Rounded to 4 decimals, as the registry's values."""
    ds = build_dataset(name, root, "train")
    base = getattr(ds, "dataset", ds)  # a held-out _Subset keeps its dataset under .dataset
    array, layout = None, "nhwc"
    if isinstance(getattr(base, "data", None), np.ndarray) and base.data.dtype == np.uint8:
        array = base.data  # torchvision CIFAR (N, H, W, 3) / STL-10 (N, 3, H, W)
        layout = "nchw" if name == "stl10" else "nhwc"
    elif hasattr(base, "images") and hasattr(base, "layout"):  # ArrayDataset (npy, digits)
        array = base.images if isinstance(base.images, np.ndarray) else \
            np.load(base.images, mmap_mode="r")
        layout = base.layout
    if array is not None:
        s, s2, count = _channel_sums(array, layout)
    else:
        n = len(ds)
        index = np.unique(np.linspace(0, n - 1, min(n, max_files)).round().astype(int))
        s, s2, count = np.zeros(3), np.zeros(3), 0
        for i in index:
            x = np.asarray(ds[int(i)][0], dtype=np.float64).reshape(-1, 3)
            s += x.sum(0)
            s2 += (x * x).sum(0)
            count += x.shape[0]
    if count == 0:
        raise ValueError(f"the train split of {name} holds no pixels to measure; pass "
                         "--norm_mean and --norm_std, or --norm_stats dataset")
    mean = s / count
    std = np.sqrt(np.maximum(s2 / count - mean * mean, 0.0))
    std = np.where(std > 0, std, 255.0)  # a constant channel: leave it unscaled (std 1)
    return [round(float(m) / 255, 4) for m in mean], [round(float(v) / 255, 4) for v in std]


def _from_choice(choice, args):
    """(mean, std, description) for --norm_stats dataset / imagenet / auto."""
    if choice == "imagenet":
        return list(IMAGENET_MEAN), list(IMAGENET_STD), "ImageNet's (--norm_stats imagenet)"
    if args.dataset is None:  # (the scripts resolve it first; a library caller may not)
        args.dataset = resolve_dataset(None, args.data_path)
    if choice == "dataset":
        info = dataset_info(args.dataset, args.data_path or None)
        return list(info.mean), list(info.std), f"the {args.dataset} registry values"
    print(f"Measuring the normalisation statistics of the {args.dataset} train split "
          "(--norm_stats auto) ...", flush=True)
    mean, std = dataset_stats(args.dataset, args.data_path or None)
    return mean, std, f"measured on the {args.dataset} train split (--norm_stats auto)"


def resolve_train_norm(args, info):
    """train_ssl.py: fill args.norm_mean / args.norm_std with the statistics this run uses (they
    go into the checkpoint's args), print them, and return `info` with them."""
    if args.norm_mean is not None:
        how = "given (--norm_mean, --norm_std)"
    else:
        args.norm_mean, args.norm_std, how = _from_choice(args.norm_stats, args)
    print(f"Normalisation: mean {_show(args.norm_mean)} std {_show(args.norm_std)}, {how}.")
    return replace(info, mean=tuple(args.norm_mean), std=tuple(args.norm_std))


def checkpoint_stats(stored):
    """(mean, std, description) a checkpoint's weights were trained with, from its args (a dict
    or an argparse.Namespace; None or {} for weights without args): train_ssl.py's norm_mean /
    norm_std; a train_ssl.py checkpoint from before those were stored: its dataset's registry
    values (what it normalised with); anything else (official DINO / iBOT checkpoints, released
    weights, torchvision, timm): ImageNet's, which they were all trained with."""
    stored = vars(stored) if isinstance(stored, argparse.Namespace) else dict(stored or {})
    if stored.get("norm_mean") is not None and stored.get("norm_std") is not None:
        how = stored.get("norm_stats")
        return (list(stored["norm_mean"]), list(stored["norm_std"]),
                "the checkpoint's" + (f" (trained with --norm_stats {how})" if how else ""))
    if stored.get("dataset") in DATASETS:
        info = DATASETS[stored["dataset"]]
        return (list(info.mean), list(info.std),
                f"the checkpoint's (its training set {stored['dataset']}'s registry values)")
    return list(IMAGENET_MEAN), list(IMAGENET_STD), "ImageNet's (weights trained without our args)"


def resolve_eval_norm(args, ckpt_args, has_weights):
    """Evaluation scripts: fill args.norm_mean / args.norm_std (given values win; --norm_stats
    checkpoint: checkpoint_stats of ckpt_args, or the dataset's without weights) and print which
    statistics are used. No-op for a parser without the flags."""
    if not hasattr(args, "norm_stats"):
        return
    check_norm_args(args)
    if args.norm_mean is not None:
        how = "given (--norm_mean, --norm_std)"
    elif args.norm_stats == "checkpoint" and has_weights:
        args.norm_mean, args.norm_std, how = checkpoint_stats(ckpt_args)
    else:
        choice = "dataset" if args.norm_stats == "checkpoint" else args.norm_stats
        args.norm_mean, args.norm_std, how = _from_choice(choice, args)
        if args.norm_stats == "checkpoint":
            how += " (no --pretrained_weights)"
    print(f"Normalisation: mean {_show(args.norm_mean)} std {_show(args.norm_std)}, {how}.")


def with_norm(info, args):
    """`info` (a DatasetInfo) with the run's statistics when resolved, else as it is."""
    if getattr(args, "norm_mean", None) is None:
        return info
    return replace(info, mean=tuple(args.norm_mean), std=tuple(args.norm_std))
