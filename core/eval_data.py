"""The labelled images an evaluation reads, and the checks made before any of them is read:

    check_eval_data(args), check_knn_data(args)   data a score can be computed on (the eval
                             scripts; train_ssl.py's k-NN check): the splits exist, the train
                             split is not the scored one, it has labels and two classes or more
    check_scored_split(dataset)   a note when the scored split holds a single class
    eval_split(args, split, transform)    a split through --data_backend tensor (LoadedSplit) or pil
    train_loader(args, split, transform)  a training loader with the run's flags (data/loaders.py)
"""
import torch

from data import build_dataset
from data.datasets import check_train_split, resolve_split, split_label, train_labels
from data.loaders import build_train_loader


# ============ before any image is read ============

def check_eval_data(args, val_split=0, selects=True):
    """Before any image is read, for the scripts whose output is an accuracy: the splits they
    read are there (resolve_split: the --eval_split folder, the selection split), the train
    split (--train_split) is neither the scored split nor, for the scripts that select a model
    (selects), the selection split, and it has a label for every image and at least two
    classes (with one, every k-NN vote and every probe predicts it: 100 % whatever the
    backbone)."""
    scored = {split: resolve_split(args.dataset, args.data_path, split, args.eval_split, val_split)
              for split in ("test", "val")}
    train_split = getattr(args, "train_split", "train")
    check_train_split(args.dataset, train_split)
    if train_split == scored["test"] or (selects and train_split == scored["val"]):
        role = "scored" if train_split == scored["test"] else "where models are selected"
        raise ValueError(f"--train_split {train_split} is the split {role} "
                         f"(--eval_split {args.eval_split}); a classifier trained on it would be "
                         f"measured on its own training images: train on another split, or hold "
                         f"images out with --val_split N")
    try:
        classes, unlabelled = train_labels(args.dataset, args.data_path, train_split)
    except FileNotFoundError as e:
        if train_split == "train":
            raise
        raise FileNotFoundError(f"--train_split {train_split}: {e}; or pass the name of a split "
                                f"that {args.data_path} has") from None
    train = split_label(args.dataset, args.data_path, train_split)
    if classes < 2:
        what = "has no labels" if classes == 0 else "holds a single class"
        raise ValueError(f"the {train} split of {args.data_path or args.dataset} {what}, so every "
                         f"prediction is that class and the accuracy would be 100% whatever the "
                         f"backbone: a number that measures nothing; evaluate on labelled data "
                         f"with at least 2 classes")
    if unlabelled:
        raise ValueError(f"{unlabelled} images of the {train} split of {args.data_path} are "
                         f"unlabelled (-1); a classifier fit on the train split needs a label for "
                         f"each: label them, or drop them from the split")


def check_knn_data(args):
    """train_ssl.py's k-NN check (--knn_eval, --knn_freq), before any image is read: data
    without labels skips it, as before; a labelled dataset without a val/ or test/ split, or
    whose train split holds one class or unlabelled images, is refused with the way out."""
    if not (args.knn_eval or args.knn_freq):
        return
    classes, unlabelled = train_labels(args.dataset, args.data_path)
    if classes == 0:
        return  # no labels: no k-NN (--knn_freq's help)
    off = "--knn_eval false" + (" --knn_freq 0" if args.knn_freq else "")
    try:
        split = resolve_split(args.dataset, args.data_path, "test", args.eval_split)
    except FileNotFoundError as e:
        if args.eval_split != "auto":
            raise
        raise FileNotFoundError(f"the k-NN check after training (--knn_eval, on by default) "
                                f"scores a labelled val/ or test/ split, and {args.data_path} has "
                                f"only train/; pass {off} to train without it, or add a val/ "
                                f"with the same class folders") from e
    if classes == 1:
        raise ValueError(f"the train split of {args.data_path} holds a single class, so the k-NN "
                         f"check after training would score 100% on "
                         f"{split_label(args.dataset, args.data_path, split)} whatever the "
                         f"backbone: a number that measures nothing; pass {off} to train "
                         f"without it, or give the images one folder per class")
    if unlabelled:
        raise ValueError(f"{unlabelled} train images of {args.data_path} are unlabelled (-1) and "
                         f"the k-NN check after training needs a label for each; pass {off} to "
                         f"train without it")


def check_scored_split(dataset):
    """A note when a scored split holds a single class: its accuracy is then that class's
    recall, not an accuracy over classes."""
    classes = set(int(t) for t in dataset.targets)
    if len(classes) == 1:
        print(f"note: {getattr(dataset, 'split_name', 'the evaluation split')} holds one class "
              f"only ({classes.pop()}); its accuracy is the recall of that class", flush=True)


# ============ the images: --data_backend tensor or pil ============

def train_loader(args, split, transform, shuffle=True, drop_last=True, **dataset_kwargs):
    """data/loaders.py's build_train_loader for `split` with the run's flags (--data_backend,
    --data_memory_gb, batch size, workers, seed, rank): (images, labels) batches of each rank's
    DistributedSampler order, as train_ssl.py reads its data. dataset_kwargs: val_split
    (skip_bad_images: --skip_bad_images where the script has it)."""
    dataset_kwargs.setdefault("skip_bad_images", getattr(args, "skip_bad_images", False))
    dataset_kwargs.setdefault("eval_split", getattr(args, "eval_split", "auto"))
    dataset_kwargs.setdefault("train_split", getattr(args, "train_split", "train"))
    return build_train_loader(args.data_backend, args.dataset, args.data_path, transform,
                              args.batch_size_per_gpu, device=args.device, seed=args.seed,
                              rank=args.rank, world_size=args.world_size,
                              num_workers=args.num_workers, memory_gb=args.data_memory_gb,
                              split=split, shuffle=shuffle, drop_last=drop_last, **dataset_kwargs)


class LoadedSplit(torch.utils.data.Dataset):
    """A dataset with a loader of the same images (data/loaders.py, shuffle=False,
    drop_last=False): its length, items, targets, num_classes and split names are the
    dataset's (and its classes, through .dataset as for a held-out subset), while
    extract_dataset_features reads its images from the loader (--data_backend tensor)."""

    def __init__(self, dataset, loader):
        self.dataset, self.loader = dataset, loader
        self.targets, self.num_classes = dataset.targets, dataset.num_classes
        self.split_name, self.split_key = dataset.split_name, dataset.split_key

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]


def eval_split(args, split, transform, **dataset_kwargs):
    """`split` of --dataset with the (deterministic) eval `transform`, as extract_dataset_features
    reads it: with --data_backend pil the dataset itself (PIL transforms in DataLoader workers),
    with tensor a LoadedSplit (the split kept as uint8 on the device, Resize + CenterCrop done
    in batches there). dataset_kwargs: val_split (skip_bad_images: --skip_bad_images where the
    script has it, train_ssl.py's k-NN check). Which folder a split reads: --eval_split
    (data.datasets.resolve_split); the result names it in .split_name."""
    dataset_kwargs.setdefault("skip_bad_images", getattr(args, "skip_bad_images", False))
    dataset_kwargs.setdefault("eval_split", getattr(args, "eval_split", "auto"))
    dataset_kwargs.setdefault("train_split", getattr(args, "train_split", "train"))
    dataset = build_dataset(args.dataset, args.data_path, split, transform, seed=args.seed,
                            **dataset_kwargs)
    if args.data_backend == "pil":
        return dataset
    return LoadedSplit(dataset, train_loader(args, split, transform, shuffle=False,
                                             drop_last=False, **dataset_kwargs))
