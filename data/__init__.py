"""Datasets by name and the augmentations of each method (see datasets.py, transforms.py)."""
from .datasets import (DATASETS, BadImageError, DatasetInfo, build_dataset, dataset_info,
                       decode_image, resolve_dataset)
from .transforms import MultiCropTransform, SingleViewTransform, TwoViewTransform, eval_transform

__all__ = ["DATASETS", "BadImageError", "DatasetInfo", "decode_image", "dataset_info", "resolve_dataset", "build_dataset", "TwoViewTransform",
           "MultiCropTransform", "SingleViewTransform", "eval_transform"]
