"""Datasets by name.

Every dataset built here yields `(transform(PIL RGB image), int label)` and carries two
attributes, so that pretraining, k-NN and linear evaluation treat them all alike:
    .targets      labels of the items, in item order (-1 for STL-10's unlabeled images)
    .num_classes  number of classes (int)

    DATASETS["cifar10"]                              -> DatasetInfo (classes, size, mean, std)
    build_dataset("cifar10", root, "train", tf)      -> torch Dataset
    build_dataset("cifar10", root, "val", tf, val_split=5000)   # 5k held out of train
    build_dataset("imagefolder", root, "test", tf)   # test/ when root has val/ and test/, else
                                                     # the one of them it has (resolve_split)

A probe or fine-tuning may train on another split of an npy or imagefolder dataset than
train/ (train_split="probe": probe/images.npy, probe_images.npy or the folder probe/); "val"
held out with val_split comes out of that split then. npy class names come from classes.txt
beside the arrays (<root>/classes.txt, one name per line, line i + 1 naming class i), as
.classes, which the reports read (core/report.py class_names).

Each also names the split it read (.split_name: "val/", "test", "train/ held-out"), so that
every printed and logged number can say where it comes from; npy labels are checked as a split
is built (class indices, and no class in val/test that train lacks: one line naming the file).

The datasets are plain picklable objects (no lambdas, no open file handles) so DataLoader
workers can receive them under both the fork and the spawn start methods.

Image files are decoded by decode_image: a file that cannot be decoded is a BadImageError
naming it; with skip_bad_images=True the folder datasets train on the next file instead and
count the skips (first_decodable, reusable by any dataset that reads files). Every decoded
image goes through to_rgb8, the one conversion to 8-bit RGB of both data backends (16-bit
images keep their top 8 bits, alpha is dropped). ImageFolder skips hidden entries (names
starting with '.': .ipynb_checkpoints/, .DS_Store, macOS ._* files) as classes and as files.
"""
import os
import sys
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int | None  # None: read from the data (class folders, label array)
    image_size: int  # native / recommended input resolution
    mean: tuple  # per-channel RGB mean in [0, 1], for Normalize
    std: tuple


DATASETS = {
    "cifar10": DatasetInfo(10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": DatasetInfo(10, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagefolder": DatasetInfo(None, 224, IMAGENET_MEAN, IMAGENET_STD),
    "tiny-imagenet": DatasetInfo(200, 64, IMAGENET_MEAN, IMAGENET_STD),
    # image_size 32 is a placeholder (iBOT's CIFAR .npy files); dataset_info(root=...) reads it
    "npy": DatasetInfo(None, 32, IMAGENET_MEAN, IMAGENET_STD),
    # sklearn's 8x8 digits upscaled to 32x32, grayscale replicated to RGB; statistics measured
    # on our train split (tests/test_data.py recomputes them)
    "digits": DatasetInfo(10, 32, (0.3052,) * 3, (0.3234,) * 3),
}

# "val" (where models are selected) is either carved out of "train" (val_split > 0) or the
# dataset's validation split; "test" is the split the reported number comes from
SPLITS = ("train", "val", "test")
STL10_SPLITS = SPLITS + ("unlabeled", "train+unlabeled")
# --eval_split: which folder "test" reads when a dataset has both val/ and test/
EVAL_SPLITS = ("auto", "val", "test")
# the one labelled evaluation split of the datasets with fixed files
FIXED_EVAL_SPLIT = {"cifar10": "test", "cifar100": "test", "stl10": "test", "digits": "test",
                    "tiny-imagenet": "val"}


def _check_name(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")


def resolve_dataset(name, root):
    """The dataset a run uses, from --dataset and --data_path, so that a given path is never
    ignored. `name` given: that one (it must be able to use `root`). `name` None: digits without
    a root; with one, inferred from what the folder holds:
        cifar-10-batches-py/, cifar-100-python/, stl10_binary/ (torchvision's files), or the
        folder itself       -> cifar10, cifar100, stl10
        tiny-imagenet-200/ or wnids.txt + train/   -> tiny-imagenet
        train/images.npy + train/labels.npy (or train_images.npy + train_labels.npy) -> npy
        train/              -> imagefolder
    Raises FileNotFoundError for a missing folder, ValueError when the layout names no dataset
    (or several)."""
    if name is not None:
        _check_name(name)
        if name == "digits" and root:
            raise ValueError(f"--dataset digits is embedded and reads no files, but --data_path "
                             f"{root} was given; drop --data_path, or name the dataset it holds "
                             f"with --dataset")
        if name != "digits" and not root:
            raise ValueError(f"dataset {name} needs its location; pass --data_path")
        if Path(root).exists() and not Path(root).is_dir():
            raise NotADirectoryError(f"--data_path {root} is a file, not a folder; pass the "
                                     f"folder that holds the {name} dataset")
        return name
    if not root:
        return "digits"
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"--data_path {root} {what}; pass an existing folder "
                                f"(or no --data_path to use the embedded digits)")
    found = [dataset for folder, dataset in (
        ("cifar-10-batches-py", "cifar10"), ("cifar-100-python", "cifar100"),
        ("stl10_binary", "stl10"), ("tiny-imagenet-200", "tiny-imagenet"))
        if root.name == folder or (root / folder).is_dir()]
    if not found and (root / "wnids.txt").is_file() and (root / "train").is_dir():
        found = ["tiny-imagenet"]
    if not found and _npy_paths(root, "train") is not None:
        found = ["npy"]
    if not found and (root / "train").is_dir():
        found = ["imagefolder"]
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"--data_path {root} holds several datasets ({', '.join(found)}); pass "
                         f"--dataset to pick one")
    if _holds_class_folders(root):
        raise ValueError(f"--data_path {root} holds class folders of images, i.e. one split "
                         f"(main_dino.py's --data_path /path/to/imagenet/train/); pass its parent, "
                         f"the folder that holds train/ (and val/ for the k-NN check)")
    raise ValueError(f"cannot tell which dataset --data_path {root} holds (no train/ folder, no "
                     f"train/images.npy, no CIFAR/STL-10/Tiny ImageNet files); pass --dataset "
                     f"(one of {', '.join(DATASETS)})")


def _holds_class_folders(root, look=20):
    """Whether `root` looks like one split of an ImageFolder: sub-folders holding image files
    (the first `look` of each listing are checked)."""
    exts = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
    for sub in sorted(p for p in root.iterdir() if p.is_dir())[:look]:
        if any(f.suffix.lower() in exts for f in sorted(sub.iterdir())[:look]):
            return True
    return False


def dataset_info(name, root=None):
    """Registry entry for `name`; with `root`, the data-dependent fields of `imagefolder`
    (number of class folders) and `npy` (classes from the labels, size from the array) are
    filled in when the files are there."""
    _check_name(name)
    info = DATASETS[name]
    if not root:
        return info
    if name == "imagefolder" and (Path(root) / "train").is_dir():
        classes = [e.name for e in os.scandir(Path(root) / "train")
                   if e.is_dir() and not _hidden(e.name)]
        return DatasetInfo(len(classes), info.image_size, info.mean, info.std)
    if name == "npy" and _npy_paths(root, "train") is not None:
        images_path, labels_path = _npy_paths(root, "train")
        shape = np.load(images_path, mmap_mode="r").shape
        size = shape[1] if _npy_layout(shape, images_path) != "nchw" else shape[2]
        names = npy_class_names(root)  # classes.txt: as many classes as it names
        classes = len(names) if names else _num_classes(np.load(labels_path))
        return DatasetInfo(classes, int(size), info.mean, info.std)
    return info


def _eval_folders(name, root):
    """The labelled evaluation splits a dataset has: those of val/ and test/ that exist
    (imagefolder, npy), or its one fixed split."""
    if name == "imagefolder":
        return [s for s in ("val", "test") if (Path(root) / s).is_dir()]
    if name == "npy":
        return [s for s in ("val", "test") if _npy_paths(root, s) is not None]
    return [FIXED_EVAL_SPLIT[name]]


def resolve_split(name, root, split, eval_split="auto", val_split=0):
    """The split that `split` reads, as build_dataset reads it (folders are looked at, no file
    is read): "train", "unlabeled", "train+unlabeled" are themselves;
      "test", where the reported number comes from: the folder eval_split names ("val" or
      "test"); "auto" takes test/ when the dataset has one, else val/ (DINO's convention:
      ImageNet's val/ is its test set). CIFAR, STL-10 and digits have only a test split, Tiny
      ImageNet only val/ (its test/ has no labels);
      "val", where models are selected: "heldout" (held out of train) when val_split > 0, else
      val/ when the dataset has one, else the same split as "test".
    Raises ValueError for an unknown eval_split, FileNotFoundError for a split that is not there."""
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"--eval_split {eval_split} is unknown; choose one of {', '.join(EVAL_SPLITS)}")
    if split not in ("val", "test"):
        return split
    if split == "val" and val_split:
        return "heldout"
    have = _eval_folders(name, root)
    if not have:
        if name == "imagefolder":
            raise FileNotFoundError(f"{root} has no val/ or test/ folder; pass --data_path "
                                    f"pointing to {_IMAGEFOLDER_LAYOUT}")
        raise FileNotFoundError(f"no val or test arrays under {root}; pass --data_path pointing "
                                f"to a folder with val/images.npy + val/labels.npy (or test/..., "
                                f"or val_images.npy + val_labels.npy)")
    if split == "val" and "val" in have:
        return "val"
    if eval_split == "auto":
        return "test" if "test" in have else "val"
    if eval_split not in have:
        if name in FIXED_EVAL_SPLIT:
            why = ("its test/ has no labels" if name == "tiny-imagenet" else
                   f"--val_split N holds N train images out for validation")
            raise ValueError(f"--eval_split {eval_split}: {name} has no labelled {eval_split} "
                             f"split, only {have[0]} ({why}); use --eval_split auto or {have[0]}")
        raise FileNotFoundError(f"--eval_split {eval_split}: {root} has no {eval_split}/ "
                                f"{'folder' if name == 'imagefolder' else 'arrays'}, only "
                                f"{have[0]}/; use --eval_split auto or {have[0]}")
    return eval_split


def split_label(name, root, split, train_split="train"):
    """How prints and logs name a split that resolve_split returned: the folder ("val/",
    "test/") of imagefolder, npy and Tiny ImageNet, the files of a flat npy layout
    ("val_*.npy"), else the split's own name (CIFAR's "test"); "heldout" is named after the
    train split it comes out of ("train/ held-out", "probe/ held-out")."""
    if split == "heldout":
        return f"{split_label(name, root, train_split)} held-out"
    if name in ("imagefolder", "tiny-imagenet"):
        return f"{split}/"
    if name == "npy":
        paths = _npy_paths(root, split)
        return f"{split}_*.npy" if paths and paths[0].parent == Path(root) else f"{split}/"
    return split


def build_dataset(name, root, split, transform=None, val_split=0, seed=0, download=False,
                  skip_bad_images=False, eval_split="auto", train_split="train"):
    """Dataset `name` stored under `root` (the --data_path), split `split`, which the dataset
    names in .split_name (how prints label its numbers, e.g. "val/", "test", "train/
    held-out") and .split_key (the same as a word for keys and tags: "val", "test", "heldout").

    split: "train", "val" or "test" (stl10 also "unlabeled" and "train+unlabeled"); "test" is
        the split a reported number comes from, "val" the one models are selected on: see
        resolve_split (with both val/ and test/, "val" reads val/ and "test" reads test/).
    val_split: number (int >= 1) or fraction (0 < float < 1) of the official train split held
        out as "val", class-stratified and fixed by `seed`; "train" is then the remainder.
    eval_split: "auto", "val" or "test", the folder "test" reads (resolve_split).
    train_split: the split "train" reads, and "val" is held out of (check_train_split): "train",
        or another split of an npy / imagefolder dataset (e.g. "probe").
    download: let torchvision fetch cifar10/cifar100/stl10 when they are missing.
    skip_bad_images: imagefolder / tiny-imagenet replace an image file that cannot be decoded
        by the next one, named on stderr and counted in the dataset's .skipped (else: one
        BadImageError naming it).
    """
    _check_name(name)
    valid = STL10_SPLITS if name == "stl10" else SPLITS
    if split not in valid:
        raise ValueError(f"unknown split '{split}' for {name}; choose one of {', '.join(valid)}")
    if name != "digits" and not root:
        raise ValueError(f"dataset {name} needs its location; pass --data_path")
    build = _BUILDERS[name]
    if name in ("imagefolder", "tiny-imagenet"):  # the datasets that decode image files
        build = partial(build, skip_bad_images=skip_bad_images)
    check_train_split(name, train_split)
    source = train_split if split == "train" else resolve_split(name, root, split, eval_split,
                                                                val_split)
    if not val_split or split in ("test", "unlabeled"):
        ds = build(root, source, transform, download)
    else:
        # held-out validation: carve it out of the train split. For stl10's
        # train+unlabeled the labeled part comes first and is the same as "train", so the
        # same images are held out of both.
        base = build(root, train_split if split == "val" else source, transform, download)
        train_idx, val_idx = _holdout(base.targets, val_split, seed)
        ds = _Subset(base, val_idx if split == "val" else train_idx)
    ds.split_name = split_label(name, root, source, train_split)
    ds.split_key = source.replace("+", "_")
    return ds


def train_labels(name, root, split="train"):
    """(classes, unlabelled) of the train split (or the named split a probe trains on),
    without decoding an image: how many distinct classes its labelled images hold (class
    folders, the labels >= 0 of an npy split, the registry; 1 when every image has the same
    label) and how many images have none (-1)."""
    if name == "npy":
        if _npy_paths(root, split) is None:
            _build_npy(root, split, None, False)  # its one-line error
        path = _npy_paths(root, split)[1]
        labels = _check_npy_labels(np.load(path).reshape(-1), path)
        return int(np.unique(labels[labels >= 0]).size), int((labels < 0).sum())
    if name == "imagefolder":
        folder = Path(root) / split
        if not folder.is_dir():
            _build_imagefolder(root, split, None, False)  # its one-line error
        return len([e for e in os.scandir(folder) if e.is_dir() and not _hidden(e.name)]), 0
    return dataset_info(name, root).num_classes or 0, 0


def check_train_split(name, train_split):
    """A named train split (--train_split) is a folder of an npy or imagefolder dataset; the
    datasets with fixed files have only their own train split."""
    if train_split == "train":
        return
    if name not in ("npy", "imagefolder"):
        raise ValueError(f"--train_split {train_split}: {name} has fixed splits, its train split "
                         f"is the only one to train on; a named split is a folder of an npy or "
                         f"imagefolder dataset (<data_path>/{train_split}/)")
    if train_split in ("heldout", "") or "/" in train_split or train_split.startswith("."):
        raise ValueError(f"--train_split '{train_split}' is not a split name; give the name of a "
                         f"folder of --data_path, e.g. probe")


class _Subset(Dataset):
    """torch.utils.data.Subset that also carries .targets and .num_classes."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.targets = [int(dataset.targets[i]) for i in self.indices]
        self.num_classes = dataset.num_classes

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


def _holdout(targets, val_split, seed):
    """Split the labeled items (target >= 0) into (train, val) index arrays, class-stratified.

    Only the labeled items are candidates for val; every other item stays in train. Items are
    shuffled with `seed`, then ranked by (position within their class) / (class size), so the
    first k of that ranking hold every class in proportion for any k.
    """
    targets = np.asarray(targets, dtype=np.int64)
    labeled = np.flatnonzero(targets >= 0)
    n = len(labeled)
    if 0 < val_split < 1:
        k = round(val_split * n)
    elif val_split >= 1 and float(val_split).is_integer():
        k = int(val_split)
    else:
        raise ValueError(f"--val_split {val_split} is invalid; give a count >= 1 or a fraction in (0, 1)")
    if not 0 < k < n:
        raise ValueError(f"--val_split {val_split} holds out {k} of {n} labeled training images; "
                         f"it must leave both splits non-empty")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    labels = targets[labeled][perm]
    order = np.argsort(labels, kind="stable")  # perm positions grouped by class, shuffled within
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    sizes = np.searchsorted(sorted_labels, sorted_labels, side="right") - starts
    rank = (np.arange(n) - starts + 0.5) / sizes
    picked = order[np.argsort(rank, kind="stable")[:k]]
    val_idx = np.sort(labeled[perm[picked]])
    train_idx = np.setdiff1d(np.arange(len(targets)), val_idx)
    return train_idx, val_idx


def _num_classes(labels):
    labels = np.asarray(labels)
    return int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0


# ============ torchvision datasets: cifar10, cifar100, stl10 ============

def _torchvision(cls, title, folder, root, download, **kwargs):
    root = Path(root)
    if root.name == folder:  # accept --data_path pointing at the extracted folder itself
        root = root.parent
    try:
        return cls(str(root), download=download, **kwargs)
    except (RuntimeError, OSError) as e:  # RuntimeError: files missing; OSError/URLError: offline
        damage = _damaged_file(cls, root / folder)
        if damage:
            raise FileNotFoundError(
                f"{title} under {root / folder} is damaged or incomplete: {damage}; delete "
                f"{root / folder} and run again with --download true, or extract "
                f"{cls.filename} there again") from None
        how = f"and it could not be downloaded ({e})" if download else "(downloading is off)"
        raise FileNotFoundError(f"{title} not found under {root} {how}; pass --data_path pointing to "
                         f"the folder that holds {folder}/") from None


def _damaged_file(cls, folder):
    """When `folder` (torchvision's extracted folder) exists: which of its files is missing or
    has another checksum than torchvision's list, e.g. "data_batch_3 is missing"; else None."""
    from torchvision.datasets.utils import check_integrity

    if not folder.is_dir():
        return None
    files = list(cls.train_list) + list(cls.test_list)
    if getattr(cls, "meta", None):
        files.append((cls.meta["filename"], cls.meta["md5"]))
    for name, md5 in files:
        if not (folder / name).is_file():
            return f"{name} is missing"
        if not check_integrity(str(folder / name), md5):
            return f"{name} is truncated or altered (its MD5 differs from the published one)"
    return "its files are there but could not be read"


def _build_cifar10(root, split, transform, download):
    ds = _torchvision(tv_datasets.CIFAR10, "CIFAR-10", "cifar-10-batches-py", root, download,
                      train=split == "train", transform=transform)
    ds.num_classes = 10
    return ds


def _build_cifar100(root, split, transform, download):
    ds = _torchvision(tv_datasets.CIFAR100, "CIFAR-100", "cifar-100-python", root, download,
                      train=split == "train", transform=transform)
    ds.num_classes = 100
    return ds


def _build_stl10(root, split, transform, download):
    ds = _torchvision(tv_datasets.STL10, "STL-10", "stl10_binary", root, download,
                      split=split, transform=transform)
    ds.targets = [int(t) for t in ds.labels]  # torchvision calls them .labels; -1 = unlabeled
    ds.num_classes = 10
    return ds


# ============ image files: decoding, bad files ============

class BadImageError(ValueError):
    """An image file that cannot be decoded. `path` and `reason` are None when the error was
    re-raised from a DataLoader worker (which rebuilds it from its message alone)."""

    def __init__(self, message, path=None, reason=None):
        super().__init__(message)
        self.path, self.reason = path, reason


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb8(img):
    """A decoded PIL image of any mode as 8-bit RGB: the one conversion of both data backends
    (data/loaders.py decode_bytes gives the same pixels from torchvision's decoders).
        RGB                          as it is
        L, 1, P, CMYK, YCbCr, ...    PIL's convert("RGB"): grey replicated, palette looked up,
                                     CMYK converted as PIL converts it
        RGBA, LA, PA, P with a transparent colour   convert("RGB"): the alpha channel is
                                     dropped (not blended onto a background), as PIL does
        I;16, I;16B, I (16-bit grey, e.g. a 16-bit PNG)   the top 8 bits (value >> 8), as PIL
                                     itself reads 16-bit RGB(A) PNGs (convert("RGB") would clip
                                     every value above 255 to white); I is clipped to 0..65535
        F (32-bit float)             convert("RGB"): values taken as 0..255, clipped"""
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES:
        top = np.asarray(img).astype(np.int64).clip(0, 65535) >> 8
        return Image.fromarray(top.astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # the same colours, without PIL's warning about transparency
    return img.convert("RGB")


DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def bad_image(path, error):
    """The BadImageError of the file at `path` that PIL (or reading it) failed on with `error`."""
    reason = ("not an image file PIL can identify" if isinstance(error, UnidentifiedImageError)
              else " ".join(str(error).split()) or type(error).__name__)
    return BadImageError(f"cannot decode image {path} ({reason}); replace or delete that file "
                         "(train_ssl.py --skip_bad_images true trains on without it)",
                         str(path), reason)


def open_rgb8(file, path):
    """The image in `file` (a path or a binary file object) as to_rgb8 gives it, or a
    BadImageError naming `path`: empty, truncated, not an image, or unreadable (PIL raises
    OSError, SyntaxError or ValueError)."""
    try:
        with Image.open(file) as img:
            img.load()  # before the file closes; a truncated file fails here
            return to_rgb8(img)
    except DECODE_ERRORS as e:
        raise bad_image(path, e) from None


def image_size(path):
    """(height, width) of the image file at `path`, read from its header; a BadImageError when
    PIL cannot identify it."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except DECODE_ERRORS as e:
        raise bad_image(path, e) from None


def decode_image(path):
    """The image file at `path` as an 8-bit RGB PIL image (to_rgb8), or a BadImageError naming
    the file."""
    return open_rgb8(path, path)


MAX_CONSECUTIVE_BAD = 100


def first_decodable(getitem, i, n, skipped=None):
    """getitem(i), where getitem decodes with decode_image. skipped None: a bad file raises its
    BadImageError. skipped a shared int64 counter (torch.zeros(()).share_memory_(), so that
    every DataLoader worker adds to the same one): a bad file is named on stderr with the count
    so far, and the next decodable item (i + 1, i + 2, ... of the n) is returned instead, so
    batches keep their size."""
    for j in range(min(n, MAX_CONSECUTIVE_BAD)):
        try:
            return getitem((i + j) % n)
        except BadImageError as e:
            if skipped is None:
                raise
            skipped += 1
            print(f"warning: skipped {e.path} ({e.reason}), {int(skipped)} bad image(s) skipped "
                  "so far by this process (--skip_bad_images)", file=sys.stderr, flush=True)
    raise BadImageError(f"{min(n, MAX_CONSECUTIVE_BAD)} images in a row from item {i} cannot be "
                        "decoded; check that --data_path holds image files")


def _hidden(name):
    return name.startswith(".")


class ImageFolder(tv_datasets.ImageFolder):
    """torchvision's ImageFolder, decoding with decode_image; with skip_bad_images=True a file
    that cannot be decoded is replaced by the next one and counted in .skipped. Hidden entries
    (names starting with '.', e.g. .ipynb_checkpoints/, .DS_Store, macOS ._photo.jpg) are
    neither classes nor images, at any depth below the class folders."""

    def __init__(self, root, transform=None, skip_bad_images=False):
        super().__init__(root, transform=transform, loader=decode_image)
        self.skipped = torch.zeros((), dtype=torch.int64).share_memory_() if skip_bad_images else None

    def find_classes(self, directory):
        classes = sorted(e.name for e in os.scandir(directory)
                         if e.is_dir() and not _hidden(e.name))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False):
        directory = os.path.expanduser(directory)
        extensions = extensions or tv_datasets.folder.IMG_EXTENSIONS

        def visible_image(path):
            inside = Path(path).relative_to(directory).parts
            return (not any(_hidden(part) for part in inside)
                    and tv_datasets.folder.has_file_allowed_extension(path, extensions))

        return tv_datasets.folder.make_dataset(directory, class_to_idx, is_valid_file=visible_image,
                                               allow_empty=allow_empty)

    def __getitem__(self, i):
        return first_decodable(super().__getitem__, i, len(self), self.skipped)


# ============ class-folder datasets: imagefolder, tiny-imagenet ============

def _image_folder(folder, transform, train_folder, layout, skip_bad_images=False):
    try:
        ds = ImageFolder(str(folder), transform=transform, skip_bad_images=skip_bad_images)
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"no images found in {folder} ({e}); pass --data_path pointing to {layout}") from None
    # class indices come from sorted folder names, so train and val agree only if they hold
    # the same class folders
    if Path(folder) != Path(train_folder) and Path(train_folder).is_dir():
        train_classes, _ = ds.find_classes(str(train_folder))
        if ds.classes != train_classes:
            raise ValueError(f"the class folders of {folder} and {train_folder} differ; "
                             f"both splits need the same classes so that label indices agree")
    ds.num_classes = len(ds.classes)
    return ds


_IMAGEFOLDER_LAYOUT = ("a folder with train/ and val/ (or test/, or both) holding one "
                       "sub-folder per class")


def _build_imagefolder(root, split, transform, download, skip_bad_images=False):
    """split: the folder, "train", "val" or "test" (build_dataset resolves the roles)."""
    root = Path(root)
    layout = _IMAGEFOLDER_LAYOUT
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"{root} {what}; pass --data_path pointing to {layout}")
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{root} has no {split}/ folder; pass --data_path pointing to {layout}")
    return _image_folder(folder, transform, root / "train", layout, skip_bad_images)


def _prepare_tiny_imagenet_val(val_dir):
    """Move val/images/<file> into val/<wnid>/<file> (from val_annotations.txt) so that
    ImageFolder reads it. Idempotent, and safe to rerun after an interruption: files are moved
    one by one and images/ is removed last, only once empty. Run it on one process first when
    training distributed (build the val set on rank 0, barrier, then on every rank)."""
    images = val_dir / "images"
    if not images.is_dir():
        return  # already reorganised
    annotations = val_dir / "val_annotations.txt"
    if not annotations.is_file():
        raise FileNotFoundError(f"{annotations} is missing; pass --data_path pointing to an "
                         f"unmodified copy of tiny-imagenet-200")
    for line in annotations.read_text().splitlines():
        if not line.strip():
            continue
        filename, wnid = line.split("\t")[:2]
        (val_dir / wnid).mkdir(exist_ok=True)
        try:
            os.replace(images / filename, val_dir / wnid / filename)
        except FileNotFoundError:  # moved by an earlier, interrupted run
            pass
    left = sorted(os.listdir(images))
    if left:
        raise ValueError(f"{len(left)} files in {images} (e.g. {left[0]}) are not in "
                         f"{annotations.name}; remove them or restore the original annotations")
    images.rmdir()


def _build_tiny_imagenet(root, split, transform, download, skip_bad_images=False):
    root = Path(root)
    if (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    layout = ("tiny-imagenet-200/ with train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
              "val/val_annotations.txt")
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise FileNotFoundError(f"Tiny ImageNet not found under {root}; pass --data_path pointing to {layout}")
    if split == "train":
        return _image_folder(root / "train", transform, root / "train", layout, skip_bad_images)
    # the official test split has no labels, so "test" and "val" both mean val/
    _prepare_tiny_imagenet_val(root / "val")
    return _image_folder(root / "val", transform, root / "train", layout, skip_bad_images)


# ============ uint8 image arrays: npy, digits ============

class ArrayDataset(Dataset):
    """uint8 images in an array of shape (N, H, W, C), (N, C, H, W) or (N, H, W), C in {1, 3}.

    `images` is an array, or the path of a .npy file: that is memory-mapped on first access in
    each process and never pickled, so DataLoader workers share the pages instead of copying
    the whole array.
    """

    def __init__(self, images, targets, num_classes, transform=None, layout="nhwc", classes=None):
        self.images = images
        if classes is not None:
            self.classes = list(classes)  # names, as torchvision's datasets have them
        self.targets = [int(t) for t in targets]
        self.num_classes = num_classes
        self.transform = transform
        self.layout = layout
        self._array = images if isinstance(images, np.ndarray) else None

    def __getstate__(self):
        state = self.__dict__.copy()
        if not isinstance(self.images, np.ndarray):
            state["_array"] = None  # reopened lazily by the worker
        return state

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        if self._array is None:
            self._array = np.load(self.images, mmap_mode="r")
        img = np.asarray(self._array[i])
        if self.layout == "nchw":
            img = img.transpose(1, 2, 0)
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        img = Image.fromarray(np.ascontiguousarray(img)).convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


def _npy_paths(root, split):
    """(images, labels) paths of `split` in either layout, or None."""
    root = Path(root)
    for images, labels in [(root / split / "images.npy", root / split / "labels.npy"),
                           (root / f"{split}_images.npy", root / f"{split}_labels.npy")]:
        if images.is_file() and labels.is_file():
            return images, labels
    return None


def _npy_layout(shape, path):
    if len(shape) == 3:
        return "nhw"
    if len(shape) == 4 and shape[3] in (1, 3):
        return "nhwc"
    if len(shape) == 4 and shape[1] in (1, 3):
        return "nchw"
    raise ValueError(f"{path} has shape {tuple(shape)}; expected uint8 images as "
                     f"N x H x W x C or N x C x H x W with C in {{1, 3}}")


def _build_npy(root, split, transform, download):
    """split: the arrays, "train", "val" or "test" (build_dataset resolves the roles)."""
    paths = _npy_paths(root, split)
    if paths is None:
        raise FileNotFoundError(f"no {split} arrays under {root}; pass --data_path pointing to a folder "
                         f"with {split}/images.npy + {split}/labels.npy (or {split}_images.npy + "
                         f"{split}_labels.npy)")
    images_path, labels_path = paths
    images = np.load(images_path, mmap_mode="r")
    labels = np.load(labels_path).reshape(-1)
    layout = _npy_layout(images.shape, images_path)
    if images.dtype != np.uint8:
        raise ValueError(f"{images_path} holds {images.dtype}; convert the images to uint8 (0..255)")
    if len(labels) != len(images):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has "
                         f"{len(labels)} labels; they must match")
    # (a probe may train on a named split: only the evaluation splits need every label)
    labels = _check_npy_labels(labels, labels_path, unlabelled_ok=split not in ("val", "test"))
    # the test split may miss a class: count classes on train so the indices agree
    train = _npy_paths(root, "train")
    if split != "train" and train is not None:
        train_labels = _check_npy_labels(np.load(train[1]).reshape(-1), train[1])
        _check_eval_labels(labels, labels_path, train_labels, train[1])
        num_classes = _num_classes(train_labels)
    else:
        num_classes = _num_classes(labels)
    names = npy_class_names(root)
    if names is not None:
        _check_named(labels, labels_path, names)
        num_classes = len(names)
    return ArrayDataset(str(images_path), labels, num_classes, transform, layout, names)


CLASS_NAMES_FILE = "classes.txt"


def npy_class_names(root):
    """The class names of an npy dataset, from <root>/classes.txt beside the arrays (or beside
    the split folders): one name per line, line i + 1 naming class i, in UTF-8; None without
    the file. An empty line (but trailing ones) or a name given twice is a ValueError naming
    the file."""
    path = Path(root) / CLASS_NAMES_FILE
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    how = "write one class name per line, line i + 1 naming class i"
    if not names:
        raise ValueError(f"{path} holds no class name; {how}, or delete it")
    if "" in names:
        raise ValueError(f"{path} line {names.index('') + 1} is empty; {how}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{path} names class '{twice[0]}' twice (lines "
                         f"{', '.join(str(i + 1) for i, n in enumerate(names) if n == twice[0])}); "
                         f"{how}")
    return names


def _check_named(labels, labels_path, names):
    """Every class index of an npy split has its line in classes.txt."""
    if labels.size and labels.max() >= len(names):
        raise ValueError(f"{labels_path} holds class {int(labels.max())}, but "
                         f"{CLASS_NAMES_FILE} beside it names only {len(names)} classes "
                         f"(0..{len(names) - 1}); write one class name per line, line i + 1 "
                         f"naming class i")


def _counted(values, labels, most=5):
    """ "5 (12 images), 7 (3 images)" for the first `most` of `values` as found in `labels`."""
    text = ", ".join(f"{v} ({int((labels == v).sum())} images)" for v in values[:most])
    return text + (f" and {len(values) - most} more" if len(values) > most else "")


def _check_npy_labels(labels, path, unlabelled_ok=True):
    """Labels as int64: whole numbers, class indices >= 0 or -1 for an unlabelled image (only
    where unlabelled_ok: a train split, as STL-10's train+unlabeled); else a ValueError naming
    the file and the bad values."""
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not (np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0)):
            raise ValueError(f"{path} holds {labels.dtype} labels that are not whole numbers "
                             f"(e.g. {labels[np.mod(labels, 1) != 0][0]}); labels must be class "
                             f"indices 0..C-1")
    labels = labels.astype(np.int64)
    bad = np.unique(labels[(labels < -1) | ((labels == -1) & (not unlabelled_ok))])
    if bad.size:
        allowed = ("0..C-1, or -1 for an unlabelled train image" if unlabelled_ok else
                   "0..C-1 (every image of an evaluation split needs its class)")
        raise ValueError(f"{path} holds negative labels: {_counted(bad, labels)}; labels must "
                         f"be class indices {allowed}")
    return labels


def _check_eval_labels(labels, path, train_labels, train_path):
    """Every class of an evaluation split must be one the train split has: a k-NN or a probe
    trained on it can never predict another (and a probe's loss fails on an index >= C)."""
    bad = np.setdiff1d(np.unique(labels), np.unique(train_labels[train_labels >= 0]))
    if bad.size:
        raise ValueError(f"{path} has labels that {train_path} never has: {_counted(bad, labels)}; "
                         f"no classifier trained on the train split can predict them, so its "
                         f"accuracy would be wrong. Give both splits the same class indices")


_DIGITS_SEED = 0  # fixed: every run and every process sees the same 80/20 split


@lru_cache(maxsize=1)
def _digits_arrays():
    """sklearn's bundled digits: (1797, 32, 32) uint8 images, labels, and the test indices."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    digits = load_digits()
    small = np.round(digits.images * (255 / 16)).astype(np.uint8)  # values 0..16 -> 0..255
    big = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BILINEAR))
                    for im in small])
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = _holdout(labels, 0.2, _DIGITS_SEED)
    return big, labels, train_idx, test_idx


def _build_digits(root, split, transform, download):
    images, labels, train_idx, test_idx = _digits_arrays()
    idx = train_idx if split == "train" else test_idx
    return ArrayDataset(images[idx], labels[idx], 10, transform, "nhw")


_BUILDERS = {
    "cifar10": _build_cifar10,
    "cifar100": _build_cifar100,
    "stl10": _build_stl10,
    "imagefolder": _build_imagefolder,
    "tiny-imagenet": _build_tiny_imagenet,
    "npy": _build_npy,
    "digits": _build_digits,
}
