"""Training data loaders behind one flag, --data_backend {tensor,pil}, with one interface.

    loader = build_train_loader(args.data_backend, args.dataset, args.data_path, transform,
                                args.batch_size_per_gpu, device=args.device, seed=args.seed,
                                rank=args.rank, world_size=args.world_size,
                                num_workers=args.num_workers, memory_gb=args.data_memory_gb,
                                download=args.download)
    print(f"Data loaded: there are {loader.num_images} images ({loader.describe}).")
    niter_per_epoch = len(loader)                  # batches of a whole epoch
    for epoch in range(start_epoch, args.epochs):
        loader.set_epoch(epoch, start_iter=0)      # start_iter > 0 resumes mid-epoch
        for i, (views, labels) in enumerate(loader, start=loader.start_iter): ...

`transform` is the method's PIL transform (method.build_transform(args, info)); `views` is what
the DataLoader collates from it (see data/gpu_transforms.py). Every loader visits, on each rank,
exactly the batches of torch.utils.data.DistributedSampler(shuffle=True, seed=seed,
drop_last=False) followed by DataLoader(drop_last=True), as train_ssl.py always did.

backend "pil": today's path. DataLoader workers run the PIL transform image by image; batches
    come on the host (pinned when training on CUDA) and train_ssl's to_device moves them.
backend "tensor": no PIL in the loop; batches come already on `device`.
  - ResidentLoader: when the decoded train split fits memory_gb (GiB) - digits, CIFAR-10/100,
    STL-10, Tiny ImageNet, npy, small ImageFolders - it is decoded once into one uint8 tensor
    (N, 3, H, W) kept on `device`; each batch is an index_select plus the batched augmentation,
    with no worker process at all. Array datasets above the budget stay in host memory (pinned
    on CUDA) and only their batches are copied.
  - StreamingLoader: ImageFolder trees above the budget (ImageNet). DataLoader workers only read
    file bytes; on CUDA the batch is decoded by torchvision.io.decode_jpeg(device="cuda") (nvJPEG),
    on the CPU the workers decode it. Images of a batch are zero-padded to the largest one and
    the crops are drawn inside each image's own size.
  The random parameters of a batch come from batch_seed(seed, epoch, iteration, rank), so the
  views of a run resumed at iteration i are those of an uninterrupted run.

Stored size of a resident ImageFolder: the images keep their size when they all share the first
one's; any other image is resized (bicubic, antialiased) to cover that size and centre-cropped
to it; store_size=s stores every image as s x s that way instead.
"""
import itertools
import math

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets as tv_datasets
from torchvision.io import ImageReadMode
from torchvision.transforms import functional as F

from .datasets import ArrayDataset, _Subset, build_dataset
from .gpu_transforms import batch_seed, batched_transform

BACKENDS = ("tensor", "pil")


def add_data_args(parser):
    """--data_backend and --data_memory_gb, for train_ssl.py and the evaluation scripts."""
    group = parser.add_argument_group("Data loading")
    group.add_argument("--data_backend", default="tensor", choices=BACKENDS,
                       help="tensor (default): views made in batches on the training device, "
                            "small datasets resident there, JPEGs decoded on the GPU; pil: "
                            "torchvision/PIL transforms image by image in DataLoader workers "
                            "(the reference path). Same recipe, same flags.")
    group.add_argument("--data_memory_gb", default=4.0, type=float,
                       help="With --data_backend tensor, the most memory (GiB, per process) the "
                            "decoded train split may take to be kept resident on the device "
                            "(CIFAR-10: 0.15, Tiny ImageNet: 1.2). Larger ImageFolders stream "
                            "JPEGs instead; larger arrays stay in host memory.")
    return group


# ============ the per-rank order of DistributedSampler ============

class _EpochSampler(DistributedSampler):
    """DistributedSampler that can start `start` indices into its epoch (mid-epoch resume)."""

    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])


def epoch_indices(num_images, epoch, seed, rank, world_size, shuffle=True):
    """The indices DistributedSampler(shuffle, seed, drop_last=False) gives `rank` in `epoch`."""
    sampler = DistributedSampler(range(num_images), num_replicas=world_size, rank=rank,
                                 shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


class _Loader:
    """What every backend shares: the epoch length in batches and the resume position."""

    def __init__(self, num_images, batch_size, seed, rank, world_size, shuffle, drop_last):
        self.num_images, self.batch_size = num_images, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.start_iter = 0, 0
        per_rank = math.ceil(num_images / world_size)  # DistributedSampler pads to this
        self._len = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
        if self._len == 0:
            raise ValueError(f"the train split has {num_images} images, fewer than one batch of "
                             f"{batch_size} per process ({world_size} processes); lower the "
                             "batch size")

    def __len__(self):
        """Batches in a whole epoch, whatever start_iter is."""
        return self._len

    def set_epoch(self, epoch, start_iter=0):
        if not 0 <= start_iter <= self._len:
            raise ValueError(f"start_iter {start_iter} is outside the epoch's {self._len} batches")
        self.epoch, self.start_iter = epoch, start_iter

    def _batches(self):
        """(iteration, index list) of the batches left in this epoch, on this rank."""
        idx = epoch_indices(self.num_images, self.epoch, self.seed, self.rank, self.world_size,
                            self.shuffle)
        b = self.batch_size
        for i in range(self.start_iter, self._len):
            yield i, idx[i * b:(i + 1) * b]

    def _seed(self, i):
        return batch_seed(self.seed, self.epoch, i, self.rank)

    def _init_masks(self, transform, workers, device):
        """iBOT: its masks drawn ahead in `workers` processes (0: inline, in this process)."""
        self._mask_loader = None
        if workers > 0 and hasattr(transform, "host_masks"):
            self._mask_keys = _MaskKeys()
            self._mask_loader = DataLoader(
                _MaskBatches(transform.host_masks, self.seed, self.rank), sampler=self._mask_keys,
                batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                persistent_workers=True, generator=_quiet_generator())
        return f", masks drawn in {workers} workers" if self._mask_loader is not None else ""

    def _masks(self):
        """{"masks": prefetched masks} for each batch left in this epoch ({} when drawn inline)."""
        if self._mask_loader is None:
            return itertools.repeat({})
        per_rank = math.ceil(self.num_images / self.world_size)
        self._mask_keys.keys = [(self.epoch, i, min(self.batch_size, per_rank - i * self.batch_size))
                                for i in range(self.start_iter, self._len)]
        return ({"masks": m} for m in self._mask_loader)


def _quiet_generator():
    """The generator a DataLoader draws its workers' base seed from when an epoch's iteration
    starts. Without one it draws from torch's global generator, at the first batch of the
    epoch; a run resumed mid-epoch (core/preempt.py) would then consume that draw at another
    step than the uninterrupted run and shift the stream stochastic depth draws from. The
    workers here draw nothing at random (masks are keyed by batch, files are only read)."""
    return torch.Generator().manual_seed(0)


class _MaskKeys:
    """Sampler of (epoch, iteration, batch size) keys, refilled every epoch (a persistent
    DataLoader re-reads it at each new iteration)."""

    def __init__(self):
        self.keys = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


class _MaskBatches(Dataset):
    """(epoch, iteration, n) -> the iBOT masks of that batch, the same as drawn inline."""

    def __init__(self, host_masks, seed, rank):
        self.host_masks, self.seed, self.rank = host_masks, seed, rank

    def __getitem__(self, key):
        epoch, it, n = key
        return self.host_masks(n, batch_seed(self.seed, epoch, it, self.rank))


# ============ tensor backend: resident datasets ============

def _array_of(dataset):
    """The uint8 (N, 3, H, W) array behind an array-backed dataset, or None."""
    if isinstance(dataset, ArrayDataset):
        arr = dataset.images if isinstance(dataset.images, np.ndarray) else \
            np.load(dataset.images, mmap_mode="r")
        if dataset.layout == "nhw":
            arr = arr[:, None]
        elif dataset.layout == "nhwc":
            arr = arr.transpose(0, 3, 1, 2)
    elif isinstance(dataset, tv_datasets.CIFAR10):  # CIFAR-100 is a subclass
        arr = dataset.data.transpose(0, 3, 1, 2)
    elif isinstance(dataset, tv_datasets.STL10):
        arr = dataset.data
    else:
        return None
    if arr.shape[1] == 1:  # grayscale -> RGB, as PIL's convert("RGB")
        arr = np.repeat(arr, 3, axis=1)
    return arr


def _base_and_indices(dataset):
    if isinstance(dataset, _Subset):
        return dataset.dataset, np.asarray(dataset.indices)
    return dataset, None


def _folder_samples(dataset):
    base, idx = _base_and_indices(dataset)
    if not hasattr(base, "samples"):
        return None
    return base.samples if idx is None else [base.samples[i] for i in idx]


def _cover_crop(img, height, width):
    """uint8 (3, h, w) -> uint8 (3, height, width): as is when it has that size, else resized
    (bicubic, antialiased) to cover it and centre-cropped."""
    h, w = img.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        size = [max(height, round(h * scale)), max(width, round(w * scale))]
        img = F.resize(img, size, interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        img = F.center_crop(img, [height, width])
    return img


class _Decoded(Dataset):
    """Item i of a dataset as uint8 (3, height, width): files are read and decoded with
    torchvision.io (libjpeg-turbo, the same pixels as PIL, several times faster), other
    datasets' PIL images converted."""

    def __init__(self, dataset, height, width):
        self.dataset, self.height, self.width = dataset, height, width
        self.samples = _folder_samples(dataset)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if self.samples is not None:
            img = _decode_cpu(torchvision.io.read_file(self.samples[i][0]))
        else:
            img = F.pil_to_tensor(self.dataset[i][0].convert("RGB"))
        return _cover_crop(img, self.height, self.width)


def _first_size(dataset):
    """(height, width) of item 0, from the file header alone when it is a file."""
    samples = _folder_samples(dataset)
    if samples is not None:
        with Image.open(samples[0][0]) as img:
            return img.height, img.width
    return dataset[0][0].height, dataset[0][0].width


def stored_shape(dataset, store_size=None):
    """(N, 3, H, W) of the resident copy of `dataset` (built with transform=None)."""
    base, idx = _base_and_indices(dataset)
    arr = _array_of(base)
    if store_size:
        h = w = store_size
    elif arr is not None:
        h, w = arr.shape[2:]
    else:
        h, w = _first_size(dataset)
    return len(dataset), 3, int(h), int(w)


def decode_dataset(dataset, store_size=None, num_workers=0):
    """A dataset of data.datasets built with transform=None -> (uint8 (N, 3, H, W), int64 (N,))
    on the host. Arrays (digits, npy, CIFAR, STL-10) are copied as they are; other datasets
    (ImageFolder, Tiny ImageNet) are decoded once (torchvision.io) in `num_workers` processes,
    to the size stored_shape() gives."""
    base, idx = _base_and_indices(dataset)
    arr = _array_of(base)
    _, _, h, w = stored_shape(dataset, store_size)
    if arr is not None and not store_size:
        arr = arr if idx is None else arr[idx]
        images = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        loader = DataLoader(_Decoded(dataset, h, w), batch_size=256, num_workers=num_workers)
        images = torch.empty((len(dataset), 3, h, w), dtype=torch.uint8)
        n = 0
        for batch in loader:
            images[n:n + len(batch)] = batch
            n += len(batch)
    labels = torch.as_tensor(np.asarray(dataset.targets, dtype=np.int64))
    return images, labels


class ResidentLoader(_Loader):
    """Batches of a decoded dataset held in one uint8 tensor: images[idx] -> transform.

    images: uint8 (N, 3, H, W) on `device`, or on the host (pinned when `device` is CUDA), in
    which case each batch is gathered there and copied. transform: a batched transform
    (data.gpu_transforms.batched_transform). Yields (views, labels) on `device`."""

    def __init__(self, images, labels, transform, batch_size, device, seed=0, rank=0,
                 world_size=1, shuffle=True, drop_last=True, mask_workers=0):
        super().__init__(len(images), batch_size, seed, rank, world_size, shuffle, drop_last)
        self.images, self.labels, self.transform = images, labels.to(images.device), transform
        self.device = torch.device(device)
        self.describe = f"resident uint8 {tuple(images.shape)} on {images.device}, no workers"
        self.describe += self._init_masks(transform, mask_workers, self.device)

    def __iter__(self):
        on_device = self.images.device == self.device
        for (i, idx), extra in zip(self._batches(), self._masks()):
            idx = torch.tensor(idx)
            if on_device:  # indices through pinned memory: no host-device sync
                if self.device.type == "cuda":
                    idx = idx.pin_memory().to(self.device, non_blocking=True)
                images, labels = self.images[idx], self.labels[idx]
            else:
                images, labels = self.images[idx], self.labels[idx]
                if self.device.type == "cuda":
                    images, labels = images.pin_memory(), labels.pin_memory()
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield self.transform(images, seed=self._seed(i), **extra), labels


# ============ tensor backend: JPEGs streamed from an ImageFolder ============

def _shrink(img, max_side):
    """uint8 (3, h, w) -> at most max_side on its longer side (antialiased bilinear)."""
    h, w = img.shape[-2:]
    if max(h, w) <= max_side:
        return img
    scale = max_side / max(h, w)
    size = [max(1, round(h * scale)), max(1, round(w * scale))]
    out = torch.nn.functional.interpolate(img[None].float(), size=size, mode="bilinear",
                                          antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def _decode_cpu(data):
    try:
        return torchvision.io.decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:  # a format torchvision cannot read (e.g. CMYK): PIL
        import io
        img = Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB")
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


class EncodedImages(Dataset):
    """(path, label) samples -> (file bytes as a uint8 tensor, label); with decode=True the
    worker decodes them too -> (uint8 (3, h, w), label), at most max_side on the longer side."""

    def __init__(self, samples, decode=False, max_side=1024):
        self.samples, self.decode, self.max_side = samples, decode, max_side
        self.targets = [int(label) for _, label in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        data = torchvision.io.read_file(path)
        if self.decode:
            return _shrink(_decode_cpu(data), self.max_side), int(label)
        return data, int(label)


def pad_batch(images, device=None):
    """list of uint8 (3, h_i, w_i) -> (uint8 (B, 3, H, W) zero-padded at the bottom / right,
    int64 sizes (B, 2) of (h_i, w_i))."""
    device = images[0].device if device is None else device
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    out = torch.zeros((len(images), 3, h, w), dtype=torch.uint8, device=device)
    for b, img in enumerate(images):
        out[b, :, :img.shape[1], :img.shape[2]] = img
    sizes = torch.tensor([list(img.shape[1:]) for img in images], dtype=torch.int64)
    return out, sizes


def _collate_decoded(batch):
    images, sizes = pad_batch([img for img, _ in batch])
    return images, sizes, torch.tensor([label for _, label in batch])


def _collate_encoded(batch):
    return [data for data, _ in batch], torch.tensor([label for _, label in batch])


class StreamingLoader(_Loader):
    """An ImageFolder too large to keep: workers read (CPU: and decode) the files, the batch is
    decoded on the GPU with nvJPEG when `device` is CUDA, then augmented on `device`. Images
    longer than max_side are shrunk to it first (bounds the padded batch)."""

    def __init__(self, samples, transform, batch_size, device, seed=0, rank=0, world_size=1,
                 shuffle=True, drop_last=True, num_workers=4, max_side=1024, mask_workers=0):
        super().__init__(len(samples), batch_size, seed, rank, world_size, shuffle, drop_last)
        self.device, self.transform, self.max_side = torch.device(device), transform, max_side
        cuda = self.device.type == "cuda"
        self.dataset = EncodedImages(samples, decode=not cuda, max_side=max_side)
        self.sampler = _EpochSampler(self.dataset, num_replicas=world_size, rank=rank,
                                     shuffle=shuffle, seed=seed)
        self.loader = DataLoader(self.dataset, sampler=self.sampler, batch_size=batch_size,
                                 num_workers=num_workers, pin_memory=cuda, drop_last=drop_last,
                                 collate_fn=_collate_encoded if cuda else _collate_decoded,
                                 persistent_workers=num_workers > 0, generator=_quiet_generator())
        where = "decoded on the GPU (nvJPEG)" if cuda else "decoded in the workers"
        self.describe = f"JPEG bytes read by {num_workers} workers, {where}"
        self.describe += self._init_masks(transform, mask_workers, self.device)

    def set_epoch(self, epoch, start_iter=0):
        super().set_epoch(epoch, start_iter)
        self.sampler.set_epoch(epoch)
        self.sampler.start = start_iter * self.batch_size

    def _decode_gpu(self, data):
        try:
            images = torchvision.io.decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # a PNG or CMYK file in the batch: decode those one by one
            images = []
            for d in data:
                try:
                    images.append(torchvision.io.decode_jpeg(d, mode=ImageReadMode.RGB,
                                                             device=self.device))
                except RuntimeError:
                    images.append(_decode_cpu(d).to(self.device))
        return pad_batch([_shrink(img, self.max_side) for img in images], self.device)

    def __iter__(self):
        cuda = self.device.type == "cuda"
        masks = self._masks()
        for i, batch in enumerate(self.loader, start=self.start_iter):
            if cuda:
                data, labels = batch
                images, sizes = self._decode_gpu(data)
                sizes = sizes.pin_memory().to(self.device, non_blocking=True)
            else:
                images, sizes, labels = batch
                images = images.to(self.device)
            labels = labels.to(self.device, non_blocking=True)
            yield self.transform(images, seed=self._seed(i), sizes=sizes, **next(masks)), labels


# ============ pil backend: today's DataLoader ============

class PILLoader(_Loader):
    """DataLoader + DistributedSampler over the dataset with its PIL transform, as train_ssl.py
    built it; batches come on the host (pinned when `device` is CUDA)."""

    def __init__(self, dataset, batch_size, device, seed=0, rank=0, world_size=1, shuffle=True,
                 drop_last=True, num_workers=4):
        super().__init__(len(dataset), batch_size, seed, rank, world_size, shuffle, drop_last)
        self.sampler = _EpochSampler(dataset, num_replicas=world_size, rank=rank,
                                     shuffle=shuffle, seed=seed)
        self.loader = DataLoader(dataset, sampler=self.sampler, batch_size=batch_size,
                                 num_workers=num_workers,
                                 pin_memory=torch.device(device).type == "cuda",
                                 drop_last=drop_last, persistent_workers=num_workers > 0)
        self.describe = f"PIL transforms in {num_workers} DataLoader workers"

    def set_epoch(self, epoch, start_iter=0):
        super().set_epoch(epoch, start_iter)
        self.sampler.set_epoch(epoch)
        self.sampler.start = start_iter * self.batch_size

    def __iter__(self):
        return iter(self.loader)


# ============ the entry point ============

def build_train_loader(backend, dataset_name, data_path, pil_transform, batch_size, *, device,
                       seed=0, rank=0, world_size=1, num_workers=4, memory_gb=4.0,
                       download=False, split="train", shuffle=True, drop_last=True,
                       store_size=None, max_side=1024, mask_workers=None, **dataset_kwargs):
    """The loader of `split` of a dataset for one process; see the module docstring.

    backend: "tensor" or "pil". pil_transform: the method's PIL transform (the tensor backend
    builds its batched twin from it). device: the training device. memory_gb: the resident
    budget in GiB. mask_workers: processes drawing iBOT's masks ahead (default
    min(num_workers, 4); 0 draws them inline). dataset_kwargs: passed to build_dataset (e.g.
    val_split, held out with `seed` as well).
    -> a loader with __len__ (batches per epoch), set_epoch(epoch, start_iter=0), start_iter,
    num_images, describe, and iteration over (views, labels)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown data backend '{backend}'; use one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    common = dict(seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
                  drop_last=drop_last)
    if backend == "pil":
        dataset = build_dataset(dataset_name, data_path, split, pil_transform, seed=seed,
                                download=download, **dataset_kwargs)
        return PILLoader(dataset, batch_size, device, num_workers=num_workers, **common)

    transform = batched_transform(pil_transform)
    common["mask_workers"] = min(num_workers, 4) if mask_workers is None else mask_workers
    dataset = build_dataset(dataset_name, data_path, split, None, seed=seed, download=download,
                            **dataset_kwargs)
    n, c, h, w = stored_shape(dataset, store_size)
    fits = n * c * h * w <= memory_gb * 2**30
    samples = _folder_samples(dataset)
    if not fits and samples is not None:
        return StreamingLoader(samples, transform, batch_size, device, num_workers=num_workers,
                               max_side=max_side, **common)
    images, labels = decode_dataset(dataset, store_size, num_workers)
    if fits:
        images = images.to(device)
    elif device.type == "cuda":
        images = images.pin_memory()
    return ResidentLoader(images, labels, transform, batch_size, device, **common)
