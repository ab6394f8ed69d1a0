"""Datasets by name and the augmentations of each method (see datasets.py, transforms.py)."""
from .datasets import DATASETS, DatasetInfo, build_dataset, dataset_info, resolve_dataset
from .transforms import MultiCropTransform, SingleViewTransform, TwoViewTransform, eval_transform

__all__ = ["DATASETS", "DatasetInfo", "dataset_info", "resolve_dataset", "build_dataset", "TwoViewTransform",
           "MultiCropTransform", "SingleViewTransform", "eval_transform"]
