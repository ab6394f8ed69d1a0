"""Augmentations: PIL image in, normalized float tensor(s) of shape (3, size, size) out.

    TwoViewTransform      SimCLR: two views of one image
    MultiCropTransform    DINO / iBOT: 2 global crops + n local crops
    SingleViewTransform   one random crop + flip (rotation pretraining, linear / fine-tune training)
    eval_transform        resize + center crop (k-NN, linear evaluation)

Blur needs resolution: at 32px a Gaussian blur of radius up to 2 wipes out most of the image, so
blur=None turns it on only from 64px (SimCLR's CIFAR recipe has no blur either).
"""
import torch
from PIL import ImageFilter
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from .datasets import IMAGENET_MEAN, IMAGENET_STD

BICUBIC = InterpolationMode.BICUBIC


class RandomGaussianBlur:
    """PIL Gaussian blur with probability p and radius ~ U(radius_min, radius_max) (DINO's
    GaussianBlur). Random numbers come from torch so DataLoader worker seeding covers them."""

    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if torch.rand(()).item() >= self.p:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self):
        return f"{type(self).__name__}(p={self.p}, radius=({self.radius_min}, {self.radius_max}))"


def _flip_and_jitter(brightness, contrast, saturation, hue):
    return [
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]


class TwoViewTransform:
    """SimCLR augmentation (https://arxiv.org/abs/2002.05709, appendix A) applied twice.

    Returns [view1, view2], each (3, size, size). Colour strength s = 0.5 (0.8s, 0.8s, 0.8s, 0.2s)
    as in SimCLR's CIFAR setting; blur p=0.5 with a kernel of ~10% of the size.
    """

    def __init__(self, size, mean, std, scale=(0.08, 1.0), blur=None):
        if blur is None:
            blur = size >= 64
        ops = [T.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC)]
        ops += _flip_and_jitter(0.4, 0.4, 0.4, 0.1)
        if blur:
            kernel = int(0.1 * size) // 2 * 2 + 1  # odd, e.g. 23 at 224px
            ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
        ops += [T.ToTensor(), T.Normalize(mean, std)]
        self.transform = T.Compose(ops)

    def __call__(self, img):
        return [self.transform(img), self.transform(img)]

    def __repr__(self):
        return f"{type(self).__name__}(2 x {self.transform})"


class MultiCropTransform:
    """DINO / iBOT multi-crop (DataAugmentationDINO / DataAugmentationiBOT).

    Returns [g1, ..., g_global_number, l1, ..., l_local_number]: globals are
    (3, global_size, global_size), locals (3, local_size, local_size).
    Global 1: blur p=1.0. Every further global (iBOT's rule; DINO has exactly 2): blur p=0.1 and
    solarize p=0.2 (torchvision's RandomSolarize at DINO's PIL threshold 128: pixels >= 128 become
    255 - pixel). Locals: blur p=0.5. blur=None enables blur iff global_size >= 64; solarize is
    always kept.
    """

    def __init__(self, global_size=224, local_size=96, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4),
                 local_number=8, global_number=2, mean=IMAGENET_MEAN, std=IMAGENET_STD, blur=None):
        if global_number < 1 or local_number < 0:
            raise ValueError(f"{global_number} global / {local_number} local crops requested; "
                             f"need at least 1 global crop and no negative local count")
        if blur is None:
            blur = global_size >= 64
        self.global_number, self.local_number = global_number, local_number
        normalize = [T.ToTensor(), T.Normalize(mean, std)]

        def crop(size, scale):
            return [T.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC)] + _flip_and_jitter(0.4, 0.4, 0.2, 0.1)

        def maybe_blur(p):
            return [RandomGaussianBlur(p)] if blur else []

        self.global1 = T.Compose(crop(global_size, global_scale) + maybe_blur(1.0) + normalize)
        self.global2 = T.Compose(crop(global_size, global_scale) + maybe_blur(0.1)
                                + [T.RandomSolarize(threshold=128, p=0.2)] + normalize)
        self.local = T.Compose(crop(local_size, local_scale) + maybe_blur(0.5) + normalize)

    def __call__(self, img):
        crops = [self.global1(img)]
        crops += [self.global2(img) for _ in range(self.global_number - 1)]
        crops += [self.local(img) for _ in range(self.local_number)]
        return crops

    def __repr__(self):
        return (f"{type(self).__name__}(global1={self.global1}, global2 x {self.global_number - 1}={self.global2}, "
                f"local x {self.local_number}={self.local})")


class SingleViewTransform:
    """One random view: RandomResizedCrop + flip, or with cifar_style (default iff size <= 64)
    the CIFAR recipe RandomCrop(size, padding=size // 8) + flip, which keeps the whole object in
    view at low resolution. Returns (3, size, size)."""

    def __init__(self, size, mean, std, scale=(0.08, 1.0), cifar_style=None):
        if cifar_style is None:
            cifar_style = size <= 64
        if cifar_style:
            # the Resize is a no-op for images already at `size` (CIFAR at 32px)
            ops = [T.Resize(size, interpolation=BICUBIC), T.RandomCrop(size, padding=size // 8)]
        else:
            ops = [T.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC)]
        ops += [T.RandomHorizontalFlip(p=0.5), T.ToTensor(), T.Normalize(mean, std)]
        self.transform = T.Compose(ops)

    def __call__(self, img):
        return self.transform(img)

    def __repr__(self):
        return f"{type(self).__name__}({self.transform})"


def eval_transform(size, mean, std, crop_pct=None):
    """Resize(size / crop_pct) + CenterCrop(size): (3, size, size). crop_pct None -> DINO's
    224/256 = 0.875 from 128px up, 1.0 below (small images are not cropped)."""
    if crop_pct is None:
        crop_pct = 0.875 if size >= 128 else 1.0
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct {crop_pct} is out of range; use a value in (0, 1]")
    return T.Compose([
        T.Resize(int(size / crop_pct), interpolation=BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
