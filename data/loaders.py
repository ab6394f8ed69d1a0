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
    on the CPU the workers decode it. decode_on="device" forces the CUDA path's batch decoding
    on the CPU too (decode_jpeg there), decode_on="workers" the workers' decoding on CUDA; with
    memory_gb=0 every ImageFolder streams. Images of a batch are zero-padded to the largest one
    and the crops are drawn inside each image's own size.
  The random parameters of a batch come from batch_seed(seed, epoch, iteration, rank), so the
  views of a run resumed at iteration i are those of an uninterrupted run.

Both backends see the same images. Sizes: a resident ImageFolder stores every image unchanged;
when they differ, each sits in the top-left corner of a zero-padded (N, 3, H_max, W_max) tensor
with its (h, w) kept beside it, and the batched transforms crop and resize it within its own
size, as PIL does image by image (the sizes are read from the file headers first; a split whose
padded tensor would not fit memory_gb streams instead). store_size=s stores every image
resized (bicubic, antialiased) to cover s x s and centre-cropped instead. Pixels: files are
decoded to the 8-bit RGB of datasets.to_rgb8 (decode_bytes: torchvision.io for JPEG and PNG,
16-bit PNGs cut to their top 8 bits; PIL for other formats). A file that cannot be decoded is a
BadImageError naming it, or with skip_bad_images the next decodable file, as the pil backend.
"""
import argparse
import io
import itertools
import math

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets as tv_datasets
from torchvision.io import ImageReadMode
from torchvision.transforms import functional as F

from .datasets import (ArrayDataset, BadImageError, _Subset, bad_image, build_dataset,
                       first_decodable, image_size, open_rgb8)
from .gpu_transforms import batch_seed, batched_transform

BACKENDS = ("tensor", "pil")
DECODE_ON = ("device", "workers")  # where StreamingLoader decodes JPEGs


def add_data_args(parser):
    """--data_backend and --data_memory_gb, for train_ssl.py and the evaluation scripts."""
    group = parser.add_argument_group("Data loading")
    group.add_argument("--data_backend", default="tensor", choices=BACKENDS,
                       help="tensor (default): views made in batches on the training device, "
                            "small datasets resident there, JPEGs decoded on the GPU; pil: "
                            "torchvision/PIL transforms image by image in DataLoader workers "
                            "(the reference path). Same recipe, same flags.")
    group.add_argument("--data_memory_gb", default=4.0, type=memory_gb,
                       help="With --data_backend tensor, the most memory (GiB, per process) the "
                            "decoded train split may take to be kept resident on the device "
                            "(CIFAR-10: 0.15, Tiny ImageNet: 1.2). Larger ImageFolders stream "
                            "JPEGs instead; larger arrays stay in host memory.")
    return group


def memory_gb(value):
    """--data_memory_gb: a number of GiB >= 0 (0: nothing resident on the device)."""
    try:
        gb = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of GiB") from None
    if not gb >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"{value} must be >= 0 (GiB per process; 0 keeps "
                                         "nothing resident on the device)")
    return gb


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

    def _init_extras(self, transform, workers, device):
        """A batched transform may offer batch_extras, a picklable callable (batch_size, seed)
        -> a host tensor, a function of the batch seed alone (methods/__init__.py; e.g. patch
        masks). With `workers` > 0 they are drawn ahead in that many processes and passed to
        the transform as `extras`; else the transform draws them itself, inline."""
        self._extras_loader = None
        draw = getattr(transform, "batch_extras", None)
        if workers > 0 and draw is not None:
            self._extras_keys = _BatchKeys()
            self._extras_loader = DataLoader(
                _BatchExtras(draw, self.seed, self.rank), sampler=self._extras_keys,
                batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                persistent_workers=True, generator=_quiet_generator())
            return f", {draw} drawn in {workers} workers"
        return ""

    def _extras(self):
        """{"extras": prefetched value} for each batch left in this epoch ({} when drawn inline)."""
        if self._extras_loader is None:
            return itertools.repeat({})
        per_rank = math.ceil(self.num_images / self.world_size)
        b = self.batch_size
        self._extras_keys.keys = [(self.epoch, i, min(b, per_rank - i * b))
                                  for i in range(self.start_iter, self._len)]
        return ({"extras": e} for e in self._extras_loader)


def _quiet_generator():
    """The generator a DataLoader draws its workers' base seed from when an epoch's iteration
    starts. Without one it draws from torch's global generator, at the first batch of the
    epoch; a run resumed mid-epoch (core/preempt.py) would then consume that draw at another
    step than the uninterrupted run and shift the stream stochastic depth draws from. The
    workers here draw nothing at random (batch extras are keyed by batch, files are only read)."""
    return torch.Generator().manual_seed(0)


class _BatchKeys:
    """Sampler of (epoch, iteration, batch size) keys, refilled every epoch (a persistent
    DataLoader re-reads it at each new iteration)."""

    def __init__(self):
        self.keys = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


class _BatchExtras(Dataset):
    """(epoch, iteration, n) -> batch_extras(n, seed of that batch), the same as drawn inline."""

    def __init__(self, draw, seed, rank):
        self.draw, self.seed, self.rank = draw, seed, rank

    def __getitem__(self, key):
        epoch, it, n = key
        return self.draw(n, batch_seed(self.seed, epoch, it, self.rank))


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


_TORCHVISION_FORMATS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG


def decode_bytes(data, path):
    """The bytes of an image file (uint8 1-D tensor) -> uint8 (3, h, w): the pixels of
    datasets.decode_image (its to_rgb8 conversion), decoded by torchvision.io for JPEG and PNG
    (libjpeg-turbo / libpng, faster than PIL; 16-bit PNGs keep their top 8 bits, palettes are
    looked up, alpha is dropped, CMYK converted as PIL does), by PIL for the other formats
    (GIF, WebP, BMP, TIFF, ...). A file neither can read is a BadImageError naming `path`."""
    if data[:8].numpy().tobytes().startswith(_TORCHVISION_FORMATS):
        try:
            img = torchvision.io.decode_image(data, mode=ImageReadMode.RGB)
        except RuntimeError:  # truncated, or a variant libjpeg/libpng refuse: PIL names it
            pass
        else:
            if img.dtype != torch.uint8:  # 16 bits per sample
                img = (img.to(torch.int32) >> 8).to(torch.uint8)
            return img
    pil = open_rgb8(io.BytesIO(data.numpy().tobytes()), path)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


class ImageFiles:
    """The image files of a folder dataset (ImageFolder, Tiny ImageNet, or a held-out part of
    one) for the tensor backend. Item i is the base dataset's sample indices[i]; decoded(i) is
    what the pil backend's dataset[i] gives before its transform: the image (uint8 (3, h, w),
    decode_bytes) and label of that file, or when it cannot be decoded a BadImageError naming
    it, or with skip_bad_images (the base dataset's .skipped counter) the next decodable file
    of the base dataset, named on stderr and counted (datasets.first_decodable)."""

    def __init__(self, dataset):
        base, idx = _base_and_indices(dataset)
        self.samples = base.samples
        self.indices = None if idx is None else [int(i) for i in idx]
        self.skipped = getattr(base, "skipped", None)

    def __len__(self):
        return len(self.samples) if self.indices is None else len(self.indices)

    def base_index(self, i):
        return i if self.indices is None else self.indices[i]

    def path(self, i):
        return self.samples[self.base_index(i)][0]

    def label(self, i):
        return int(self.samples[self.base_index(i)][1])

    def read(self, i):
        """The bytes of item i's file, as a uint8 tensor (a BadImageError if it cannot be read)."""
        return _read_bytes(self.path(i))

    def decoded(self, i):
        return first_decodable(self._decode_base, self.base_index(i), len(self.samples),
                               self.skipped)

    def _decode_base(self, b):
        path, label = self.samples[b]
        return decode_bytes(_read_bytes(path), path), int(label)


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise bad_image(path, e) from None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
        torch.empty(0, dtype=torch.uint8)


class _HeaderChunks(Dataset):
    """Chunk k -> the (height, width) of items [k * chunk, (k + 1) * chunk) of ImageFiles, from
    their headers; None for a file PIL cannot identify when bad images are skipped (else its
    BadImageError)."""

    def __init__(self, files, chunk=256):
        self.files, self.chunk = files, chunk

    def __len__(self):
        return math.ceil(len(self.files) / self.chunk)

    def __getitem__(self, k):
        sizes = []
        for i in range(k * self.chunk, min(len(self.files), (k + 1) * self.chunk)):
            try:
                sizes.append(image_size(self.path(i)))
            except BadImageError:
                if self.files.skipped is None:
                    raise
                sizes.append(None)
        return sizes

    def path(self, i):
        return self.files.path(i)


def _as_is(batch):
    return batch


def header_sizes(files, budget_bytes, num_workers=0):
    """The (height, width) of every item of ImageFiles read from the file headers (None: not
    identified, skipped), and whether all were read: it stops as soon as the images padded to
    the largest size so far would take more than budget_bytes (they will not be resident).
    Reads in `num_workers` processes when there are many files."""
    chunks = _HeaderChunks(files)
    loader = DataLoader(chunks, batch_size=None, collate_fn=_as_is,
                        num_workers=num_workers if len(files) > 4096 else 0)
    sizes, h_max, w_max = [], 1, 1
    for chunk in loader:
        sizes += chunk
        h_max = max([h_max] + [s[0] for s in chunk if s is not None])
        w_max = max([w_max] + [s[1] for s in chunk if s is not None])
        if len(files) * 3 * h_max * w_max > budget_bytes:
            break
    return sizes, len(sizes) == len(files)


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
    """Item i of a dataset as (uint8 (3, h, w), label): files are read and decoded as
    ImageFiles.decoded (torchvision.io for JPEG / PNG, the same pixels as PIL, several times
    faster), at their own size, or with store_size s resized to cover s x s and centre-cropped."""

    def __init__(self, files, store_size=None):
        self.files, self.store_size = files, store_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img, label = self.files.decoded(i)
        if self.store_size:
            img = _cover_crop(img, self.store_size, self.store_size)
        return img, label


def stored_shape(dataset, store_size=None):
    """(N, 3, H, W) of the resident copy of an array dataset (digits, npy, CIFAR, STL-10), or of
    any dataset stored at store_size; folder datasets keep their own sizes (header_sizes)."""
    base, _ = _base_and_indices(dataset)
    arr = _array_of(base)
    if store_size:
        h = w = store_size
    elif arr is not None:
        h, w = arr.shape[2:]
    else:
        raise ValueError(f"{type(base).__name__} has no resident shape; it is read file by file")
    return len(dataset), 3, int(h), int(w)


def decode_dataset(dataset, store_size=None, num_workers=0):
    """A dataset of data.datasets built with transform=None -> (uint8 (N, 3, H, W), int64 (N,))
    on the host. Arrays (digits, npy, CIFAR, STL-10) are copied as they are; folder datasets
    (ImageFolder, Tiny ImageNet) need store_size here (every image resized to cover it, centre-
    cropped), decoded once in `num_workers` processes; decode_files keeps their own sizes."""
    base, idx = _base_and_indices(dataset)
    arr = _array_of(base)
    if arr is not None and not store_size:
        arr = arr if idx is None else arr[idx]
        images = torch.from_numpy(np.ascontiguousarray(arr))
        return images, torch.as_tensor(np.asarray(dataset.targets, dtype=np.int64))
    if _folder_samples(dataset) is None:
        raise ValueError(f"store_size is for folder datasets, not {type(base).__name__}")
    images, _, labels = decode_files(ImageFiles(dataset), store_size, store_size, num_workers,
                                     store_size)
    return images, labels


def decode_files(files, height, width, num_workers=0, store_size=None):
    """ImageFiles -> (uint8 (N, 3, height, width), int64 sizes (N, 2) or None, int64 labels
    (N,)) on the host: each image decoded once (in `num_workers` processes) into the top-left
    corner of its slot, zero-padded; sizes None when every image is height x width. The labels
    are those of the decoded files (a skipped file's are its replacement's). A replacement
    larger than height x width (the next file of a split held out of a bigger one) widens the
    padding."""
    n = len(files)
    loader = DataLoader(_Decoded(files, store_size), batch_size=64, num_workers=num_workers,
                        collate_fn=_as_is)
    images = torch.zeros((n, 3, height, width), dtype=torch.uint8)
    sizes = torch.empty((n, 2), dtype=torch.int64)
    labels = torch.empty(n, dtype=torch.int64)
    k = 0
    for batch in loader:
        for img, label in batch:
            h, w = img.shape[1:]
            if h > images.shape[2] or w > images.shape[3]:
                grown = torch.zeros((n, 3, max(h, images.shape[2]), max(w, images.shape[3])),
                                    dtype=torch.uint8)
                grown[:, :, :images.shape[2], :images.shape[3]] = images
                images = grown
            images[k, :, :h, :w] = img
            sizes[k, 0], sizes[k, 1], labels[k] = h, w, label
            k += 1
    same = bool((sizes[:, 0] == images.shape[2]).all() and (sizes[:, 1] == images.shape[3]).all())
    return images, None if same else sizes, labels


def _size_note(images, sizes):
    """How a resident folder keeps its images, for the loader's describe."""
    h, w = images.shape[2:]
    if sizes is None:
        return f"every image {h}x{w} as decoded"
    distinct = sorted({tuple(s) for s in sizes.tolist()}, key=lambda s: (s[0] * s[1], s))
    (h0, w0), (h1, w1) = distinct[0], distinct[-1]
    return (f"images of {len(distinct)} sizes (smallest {h0}x{w0}, largest {h1}x{w1}): each kept "
            f"at its own size, zero-padded to {h}x{w}")


class ResidentLoader(_Loader):
    """Batches of a decoded dataset held in one uint8 tensor: images[idx] -> transform.

    images: uint8 (N, 3, H, W) on `device`, or on the host (pinned when `device` is CUDA), in
    which case each batch is gathered there and copied. sizes: None, or int64 (N, 2) of each
    image's (h, w) in the top-left corner of its zero-padded slot, passed on to the transform
    (crops are drawn inside each image). transform: a batched transform
    (data.gpu_transforms.batched_transform). note: how the images are stored, for describe.
    Yields (views, labels) on `device`."""

    def __init__(self, images, labels, transform, batch_size, device, seed=0, rank=0,
                 world_size=1, shuffle=True, drop_last=True, extras_workers=0, sizes=None,
                 note=""):
        super().__init__(len(images), batch_size, seed, rank, world_size, shuffle, drop_last)
        self.images, self.labels, self.transform = images, labels.to(images.device), transform
        self.sizes = None if sizes is None else sizes.to(images.device)
        self.device = torch.device(device)
        self.describe = f"resident uint8 {tuple(images.shape)} on {images.device}, no workers"
        self.describe += f"; {note}" if note else ""
        self.describe += self._init_extras(transform, extras_workers, self.device)

    def __iter__(self):
        on_device = self.images.device == self.device
        for (i, idx), extra in zip(self._batches(), self._extras()):
            idx = torch.tensor(idx)
            if on_device:  # indices through pinned memory: no host-device sync
                if self.device.type == "cuda":
                    idx = idx.pin_memory().to(self.device, non_blocking=True)
                images, labels = self.images[idx], self.labels[idx]
                sizes = None if self.sizes is None else self.sizes[idx]
            else:
                images, labels = self.images[idx], self.labels[idx]
                sizes = None if self.sizes is None else self.sizes[idx]
                if self.device.type == "cuda":
                    images, labels = images.pin_memory(), labels.pin_memory()
                    sizes = None if sizes is None else sizes.pin_memory()
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                sizes = None if sizes is None else sizes.to(self.device, non_blocking=True)
            if sizes is not None:
                extra = {**extra, "sizes": sizes}
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


_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_components(data):
    """The number of colour components in the frame header of JPEG bytes (uint8 tensor): 1
    (grey), 3 (YCbCr / RGB), 4 (CMYK / YCCK); 0 when not a JPEG or no frame header is found."""
    buf = memoryview(data.numpy())
    if len(buf) < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return 0
    i = 2
    while i + 9 < len(buf):
        if buf[i] != 0xFF:
            return 0
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _JPEG_FRAMES:  # FF Cn, length (2), precision (1), height (2), width (2), Nf
            return buf[i + 9] if buf[i + 4] == 8 else 0
        elif marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return 0
        else:
            i += 2 + (buf[i + 2] << 8 | buf[i + 3])
    return 0


class EncodedImages(Dataset):
    """ImageFiles -> (file bytes as a uint8 tensor, label, i); with decode=True the worker
    decodes them too (ImageFiles.decoded: a bad file raises or is replaced) -> (uint8 (3, h, w),
    label, i), at most max_side on the longer side. A file that cannot be read gives empty
    bytes, decoded (and named, or replaced) by the loader."""

    def __init__(self, files, decode=False, max_side=1024):
        self.files, self.decode, self.max_side = files, decode, max_side

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        if self.decode:
            img, label = self.files.decoded(i)
            return _shrink(img, self.max_side), label, i
        try:
            data = self.files.read(i)
        except BadImageError:
            data = torch.empty(0, dtype=torch.uint8)
        return data, self.files.label(i), i


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
    images, sizes = pad_batch([img for img, _, _ in batch])
    return images, sizes, torch.tensor([label for _, label, _ in batch])


def _collate_encoded(batch):
    return ([data for data, _, _ in batch], torch.tensor([label for _, label, _ in batch]),
            [i for _, _, i in batch])


class StreamingLoader(_Loader):
    """An ImageFolder too large to keep (ImageFiles), read file by file in `num_workers`
    DataLoader workers, decoded where decode_on says, then augmented on `device`:
      "device"   the workers only read the bytes; the main process decodes each batch with one
                 torchvision.io.decode_jpeg call on `device`: nvJPEG on CUDA, libjpeg-turbo on
                 the CPU (the same code path, the CPU decoder standing in for nvJPEG). JPEGs of
                 1 or 3 8-bit components go there; other files (PNG, CMYK, ...) and files the
                 decoder refuses are decoded as by the workers.
      "workers"  the workers decode (ImageFiles.decoded) and pad the batch.
    Default (None): "device" on CUDA, "workers" on the CPU. On the CPU both give the same views
    (the same decoder). Images longer than max_side are shrunk to it first (bounds the padded
    batch). note: why it streams, for describe."""

    def __init__(self, files, transform, batch_size, device, seed=0, rank=0, world_size=1,
                 shuffle=True, drop_last=True, num_workers=4, max_side=1024, extras_workers=0,
                 note="", decode_on=None):
        super().__init__(len(files), batch_size, seed, rank, world_size, shuffle, drop_last)
        self.device, self.transform, self.max_side = torch.device(device), transform, max_side
        cuda = self.device.type == "cuda"
        self.decode_on = decode_on or ("device" if cuda else "workers")
        if self.decode_on not in DECODE_ON:
            raise ValueError(f"decode_on '{decode_on}' is unknown; use one of "
                             f"{', '.join(DECODE_ON)}")
        on_device = self.decode_on == "device"
        self.dataset = EncodedImages(files, decode=not on_device, max_side=max_side)
        self.sampler = _EpochSampler(self.dataset, num_replicas=world_size, rank=rank,
                                     shuffle=shuffle, seed=seed)
        self.loader = DataLoader(self.dataset, sampler=self.sampler, batch_size=batch_size,
                                 num_workers=num_workers, pin_memory=cuda, drop_last=drop_last,
                                 collate_fn=_collate_encoded if on_device else _collate_decoded,
                                 persistent_workers=num_workers > 0, generator=_quiet_generator())
        where = ("decoded in the workers" if not on_device else
                 "decoded on the GPU (nvJPEG)" if cuda else
                 "decoded in batches in the main process (decode_jpeg on the CPU)")
        self.describe = (f"JPEG bytes read by {num_workers} workers, {where}, images over "
                         f"{max_side} px on a side shrunk to it")
        self.describe += f"; {note}" if note else ""
        self.describe += self._init_extras(transform, extras_workers, self.device)

    def set_epoch(self, epoch, start_iter=0):
        super().set_epoch(epoch, start_iter)
        self.sampler.set_epoch(epoch)
        self.sampler.start = start_iter * self.batch_size

    def _decode_batch(self, data, labels, index):
        """Bytes of a batch -> padded uint8 batch on the device and its sizes (host); labels
        (host) are updated for the files replaced by skip_bad_images."""
        images = [None] * len(data)
        jpegs = [k for k, d in enumerate(data) if _jpeg_components(d) in (1, 3)]
        if jpegs:
            try:
                out = torchvision.io.decode_jpeg([data[k] for k in jpegs], mode=ImageReadMode.RGB,
                                                 device=self.device)
            except RuntimeError:  # one file the decoder refuses fails the batch: one by one
                out = []
                for k in jpegs:
                    try:
                        out.append(torchvision.io.decode_jpeg(data[k], mode=ImageReadMode.RGB,
                                                              device=self.device))
                    except RuntimeError:
                        out.append(None)
            for k, img in zip(jpegs, out):
                images[k] = img
        for k, img in enumerate(images):
            if img is None:  # PNG, CMYK, other formats, bad files: decoded as by the workers
                img, labels[k] = self.dataset.files.decoded(index[k])
                images[k] = img.to(self.device)
        return pad_batch([_shrink(img, self.max_side) for img in images], self.device)

    def __iter__(self):
        cuda = self.device.type == "cuda"
        extras = self._extras()
        for i, batch in enumerate(self.loader, start=self.start_iter):
            if self.decode_on == "device":
                data, labels, index = batch
                images, sizes = self._decode_batch(data, labels, index)
                if cuda:
                    sizes = sizes.pin_memory()
            else:
                images, sizes, labels = batch  # pinned by the DataLoader on CUDA
                images = images.to(self.device, non_blocking=True)
            sizes = sizes.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            yield self.transform(images, seed=self._seed(i), sizes=sizes, **next(extras)), labels


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
                       store_size=None, max_side=1024, extras_workers=None, decode_on=None,
                       **dataset_kwargs):
    """The loader of `split` of a dataset for one process; see the module docstring.

    backend: "tensor" or "pil". pil_transform: the method's PIL transform (the tensor backend
    builds its batched twin from it). device: the training device. memory_gb: the resident
    budget in GiB. extras_workers: processes drawing the batched transform's batch_extras
    ahead, when it has them (default min(num_workers, 4); 0: drawn inline). decode_on: where a
    streamed ImageFolder's JPEGs are decoded, "device" or "workers" (StreamingLoader; default:
    "device" on CUDA, "workers" on the CPU). memory_gb=0 streams every ImageFolder, so
    memory_gb=0, decode_on="device" runs the CUDA streaming path, on the CPU too.
    dataset_kwargs: passed to build_dataset (e.g. val_split, held out with `seed` as well).
    -> a loader with __len__ (batches per epoch), set_epoch(epoch, start_iter=0), start_iter,
    num_images, describe, and iteration over (views, labels)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown data backend '{backend}'; use one of {', '.join(BACKENDS)}")
    if not memory_gb >= 0:
        raise ValueError(f"--data_memory_gb {memory_gb} must be >= 0 (GiB per process)")
    if decode_on not in (None,) + DECODE_ON:
        raise ValueError(f"decode_on '{decode_on}' is unknown; use one of {', '.join(DECODE_ON)}")
    device = torch.device(device)
    common = dict(seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
                  drop_last=drop_last)
    if backend == "pil":
        dataset = build_dataset(dataset_name, data_path, split, pil_transform, seed=seed,
                                download=download, **dataset_kwargs)
        return PILLoader(dataset, batch_size, device, num_workers=num_workers, **common)

    transform = batched_transform(pil_transform)
    common["extras_workers"] = min(num_workers, 4) if extras_workers is None else extras_workers
    dataset = build_dataset(dataset_name, data_path, split, None, seed=seed, download=download,
                            **dataset_kwargs)
    budget = memory_gb * 2**30
    if _folder_samples(dataset) is not None and not store_size:
        return _folder_loader(dataset, transform, batch_size, device, budget, memory_gb,
                              num_workers, max_side, common, decode_on)
    n, c, h, w = stored_shape(dataset, store_size)
    fits = n * c * h * w <= budget
    if not fits and _folder_samples(dataset) is not None:
        return StreamingLoader(ImageFiles(dataset), transform, batch_size, device,
                               num_workers=num_workers, max_side=max_side, note=(
                                   f"streamed: {n} images stored at {h}x{w} (store_size) would "
                                   f"take {_gib(n * c * h * w)}, over --data_memory_gb "
                                   f"{memory_gb:g}"), decode_on=decode_on, **common)
    images, labels = decode_dataset(dataset, store_size, num_workers)
    if fits:
        images = images.to(device)
    elif device.type == "cuda":
        images = images.pin_memory()
    note = (f"every image resized to cover {h}x{w} and centre-cropped (store_size {store_size})"
            if store_size else "")
    return ResidentLoader(images, labels, transform, batch_size, device, note=note, **common)


def _gib(num_bytes):
    if num_bytes < 2**30:
        return f"{num_bytes / 2**20:.3g} MiB"
    return f"{num_bytes / 2**30:.3g} GiB"


def _folder_loader(dataset, transform, batch_size, device, budget, memory_gb, num_workers,
                   max_side, common, decode_on=None):
    """An ImageFolder on the tensor backend: resident at each image's own size (zero-padded to
    the largest) when that fits the budget, else streamed; the loader's describe says which
    and why."""
    files = ImageFiles(dataset)
    sizes, complete = header_sizes(files, budget, num_workers)
    known = [s for s in sizes if s is not None]
    h = max([1] + [s[0] for s in known])
    w = max([1] + [s[1] for s in known])
    need = len(files) * 3 * h * w
    if not complete or need > budget:
        distinct = len(set(known))
        what = (f"all {h}x{w}" if distinct == 1 and complete else
                f"padded to their largest size {h}x{w}" if complete else
                f"padded to the largest size among the first {len(sizes)}, {h}x{w},")
        note = (f"streamed: the {len(files)} images {what} would take "
                f"{'' if complete else 'at least '}{_gib(need)}, over --data_memory_gb "
                f"{memory_gb:g}")
        return StreamingLoader(files, transform, batch_size, device, num_workers=num_workers,
                               max_side=max_side, note=note, decode_on=decode_on, **common)
    images, stored_sizes, labels = decode_files(files, h, w, num_workers)
    note = _size_note(images, stored_sizes)
    return ResidentLoader(images.to(device), labels, transform, batch_size, device,
                          sizes=stored_sizes, note=note, **common)
