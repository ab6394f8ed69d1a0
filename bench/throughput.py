"""Training throughput of one method: images/s and peak memory of the FULL training step.

    python bench/throughput.py --method simclr --arch resnet18 --batch_size 64 256
    python bench/throughput.py --method simclr --arch vit_tiny --patch_size 4 --batch_size 64
    python bench/throughput.py --method dino --arch vit_tiny --patch_size 4 \
        --global_crops_size 32 --local_crops_size 16 --local_crops_number 6 --batch_size 64
    python bench/throughput.py --method simclr --arch vit_small --crop_size 224 \
        --device cuda --precision bf16 --batch_size 128 256 --steps 50

One line per batch size, e.g.
    method=simclr arch=resnet18 input=32 batch=64 device=cpu precision=fp32 img/s=... step_ms=...
    peak_mem_MB=...
img/s counts images of the batch (not views) per second. The step is train_ssl.train_one_epoch
itself, run on one synthetic batch repeated: forward, loss, backward, clipping, optimizer step
and the method's after_backward / after_step (EMA teacher) - nothing re-implemented, so the
numbers follow the training code. Views come from the method's own transform applied to random
PIL images and collated as the DataLoader does (multi-crop, masks, ...). Data loading is not
timed. Every train_ssl.py flag of the method is accepted (--method <name> --help lists them),
--precision / --use_fp16 included (train_ssl.py's default: bf16 on CUDA, fp32 on CPU).

--mode data / end2end compare the data backends (data/loaders.py) on the real train split:
    python bench/throughput.py --mode data --method simclr --arch resnet18 --batch_size 256 \
        --num_workers 2 --backends tensor pil
    python bench/throughput.py --mode end2end --method dino --arch vit_tiny --patch_size 4 \
        --global_crops_size 32 --local_crops_size 16 --local_crops_number 6 --batch_size 64 \
        --dataset imagefolder --data_path /path/to/cifar10 --num_workers 2
data: images/s of the loader alone (reading, decoding, augmenting, on the device); end2end:
images/s of the loader feeding train_ssl.train_one_epoch, the two in one loop as in training.
One line per backend and batch size (and repeat), then the tensor / pil ratio of the best
of --repeats. setup_s (building the loader: decoding a resident split) is reported apart and
not timed. bench/resized_crop.py and bench/ibot_masks.py time two design choices of the
tensor backend.

peak_mem_MB: on CUDA, torch.cuda.max_memory_allocated over the timed steps; on CPU, the peak
resident set size of the whole process so far (includes Python and torch, ~0.3-0.5 GB, and
never goes down, so list batch sizes in increasing order).
Run it as one plain process (not torchrun): it builds a world-size-1 process group, as
train_ssl.py does, for the methods that all-reduce.
"""
import contextlib
import io
import itertools
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import train_ssl  # noqa: E402
from core import amp, cli, preempt  # noqa: E402
from core import dist as distu  # noqa: E402
from core.optim import build_optimizer, get_params_groups, lr_for_batch  # noqa: E402
from data import dataset_info  # noqa: E402
from methods import METHODS  # noqa: E402


def get_args_parser(method):
    """train_ssl.py's parser for `method` (all its flags and defaults) plus the bench's own."""
    parser = cli.ArgumentParser(
        "minissl training throughput", allow_abbrev=False, formatter_class=train_ssl.HelpFormatter,
        parents=[train_ssl.get_args_parser(method, add_help=False)])
    group = parser.add_argument_group("Benchmark")
    group.add_argument("--batch_size", default=[64], type=int, nargs="+",
                       help="Per-process batch size(s); one output line each.")
    group.add_argument("--device", default=None, choices=["cpu", "cuda"],
                       help="Default: cuda when available, else cpu.")
    group.add_argument("--steps", default=20, type=int, help="Timed training steps.")
    group.add_argument("--warmup", default=5, type=int,
                       help="Untimed steps first (cudnn autotuning, allocator, lazy init).")
    group.add_argument("--mode", default="step", choices=["step", "data", "end2end"],
                       help="step (default): the training step on one synthetic batch; data: "
                            "the train loader alone; end2end: loader + training step.")
    group.add_argument("--backends", default=["tensor", "pil"], nargs="+",
                       choices=["tensor", "pil"],
                       help="Data backends compared by --mode data / end2end (--num_workers "
                            "workers for pil).")
    group.add_argument("--repeats", default=1, type=int,
                       help="--mode data / end2end: measure the backends this many times, "
                            "interleaved, and report the best of each (shared machines).")
    return parser


def parse_args(argv=None):
    args = train_ssl.parse_args(argv, make_parser=get_args_parser)
    if args.device is None:
        args.device_name = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        args.device_name = args.device
    if args.device_name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available; pass --device cpu")
    if args.steps < 1 or args.warmup < 0 or min(args.batch_size) < 2:
        raise ValueError("need --steps >= 1, --warmup >= 0 and every --batch_size >= 2; "
                         "fix the values")
    args.cpu = args.device_name == "cpu"  # read by init_distributed_mode
    amp.resolve_precision(args, args.device_name)  # again: --device may differ from the default
    args.knn_eval, args.tensorboard = False, False
    if args.mode == "step":
        args.num_workers = 0
    return args


def synthetic_batch(transform, batch_size, image_size, seed=0):
    """Views of `batch_size` random RGB images through the method's transform, collated as the
    DataLoader collates them; returns what train_ssl's loop unpacks: (views, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch_size, image_size, image_size, 3), dtype=np.uint8)
    samples = [(transform(Image.fromarray(img)), 0) for img in images]
    return torch.utils.data.default_collate(samples)


def build_training(args, niter):
    """The model / optimizer / scaler setup of train_ssl.train_ssl, for one process."""
    model, _, _ = train_ssl.build_networks(args, niter)
    optimizer = build_optimizer(args.optimizer, get_params_groups(model), args.device,
                                betas=args.adamw_betas)
    return model, optimizer, amp.grad_scaler(args.precision, args.device)


def measure(args, info, transform, batch_size):
    """(images/s, ms/step, peak MB) of `args.steps` training steps after `args.warmup`."""
    args.batch_size_per_gpu = batch_size
    niter = max(args.steps, args.warmup)
    torch.manual_seed(args.seed)
    model, optimizer, scaler = build_training(args, niter)
    batch = synthetic_batch(transform, batch_size, max(info.image_size, args.input_size))
    batch = train_ssl.to_device(batch, args.device)
    # Constant schedules; the steps run as the LAST epoch, so warmup-only behaviour (DINO's
    # frozen last layer, teacher temperature warmup) is over, as in most of a real run.
    lr = np.full(args.epochs * niter, lr_for_batch(args.lr, batch_size))
    wd = np.full(args.epochs * niter, args.weight_decay)
    epoch = args.epochs - 1
    cuda = args.device.type == "cuda"

    t = train_ssl.Training(model, model, optimizer, scaler, lr, wd, args)

    def run(n):
        with contextlib.redirect_stdout(io.StringIO()):  # train_one_epoch's progress lines
            train_ssl.train_one_epoch(t, epoch, preempt.ResumableRun(args, [batch] * n))

    if args.warmup:
        run(args.warmup)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run(args.steps)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    del model, optimizer, batch
    if cuda:
        torch.cuda.empty_cache()
    return batch_size * args.steps / elapsed, 1000 * elapsed / args.steps, peak


class _Batches:
    """The next n batches of an endless batch iterator, with the __len__ train_one_epoch reads."""

    def __init__(self, batches, n):
        self.batches, self.n = batches, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return itertools.islice(self.batches, self.n)


def _endless(loader):
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def measure_loader(args, transform, batch_size, backend, train):
    """(images/s, setup s) of `backend`'s train loader alone (train=False) or feeding the
    training step (train=True), over args.steps batches after args.warmup."""
    from data.loaders import build_train_loader

    args.batch_size_per_gpu = batch_size
    cuda = args.device.type == "cuda"
    start = time.perf_counter()
    loader = build_train_loader(backend, args.dataset, args.data_path or None, transform,
                                batch_size, device=args.device, seed=args.seed, rank=0,
                                world_size=1, num_workers=args.num_workers,
                                memory_gb=args.data_memory_gb, download=args.download)
    batches = _endless(loader)
    setup = time.perf_counter() - start
    if train:
        niter = args.warmup + args.steps
        torch.manual_seed(args.seed)
        model, optimizer, scaler = build_training(args, niter)
        lr = np.full(args.epochs * niter, lr_for_batch(args.lr, batch_size))
        wd = np.full(args.epochs * niter, args.weight_decay)

        t = train_ssl.Training(model, model, optimizer, scaler, lr, wd, args)

        def run(n):
            with contextlib.redirect_stdout(io.StringIO()):
                train_ssl.train_one_epoch(t, args.epochs - 1,
                                          preempt.ResumableRun(args, _Batches(batches, n)))
    else:
        def run(n):
            for views, _ in itertools.islice(batches, n):
                train_ssl.to_device(views, args.device)  # the pil batches still have to move

    if args.warmup:
        run(args.warmup)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(args.steps)
    if cuda:
        torch.cuda.synchronize()
    return batch_size * args.steps / (time.perf_counter() - start), setup


def main(argv=None):
    args = parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        distu.init_distributed_mode(args)
    torch.backends.cudnn.benchmark = True
    amp.set_tf32(args.tf32)  # train_ssl.py's --tf32 (default true)
    info = dataset_info(args.dataset, args.data_path or None)
    # the same order as train_ssl: input size, then the transform, then the networks
    train_ssl.resolve_input(args, info)  # input_size, cifar_stem: as train_ssl.py sets them
    transform = METHODS[args.method].build_transform(args, info)
    arch = f"{args.arch}/{args.patch_size}" if args.arch.startswith(("vit", "deit")) else args.arch
    if args.mode != "step":
        for batch_size in args.batch_size:
            rates = {}
            for _ in range(args.repeats):
                for backend in args.backends:
                    rate, setup = measure_loader(args, transform, batch_size, backend,
                                                 train=args.mode == "end2end")
                    rates[backend] = max(rate, rates.get(backend, 0))
                    print(f"mode={args.mode} backend={backend} method={args.method} arch={arch} "
                          f"dataset={args.dataset} input={args.input_size} batch={batch_size} "
                          f"device={args.device_name} workers={args.num_workers} "
                          f"img/s={rate:.1f} setup_s={setup:.1f}", flush=True)
            if len(rates) == 2:
                print(f"mode={args.mode} method={args.method} batch={batch_size} "
                      f"tensor/pil={rates['tensor'] / rates['pil']:.2f}", flush=True)
        distu.cleanup()
        return
    for batch_size in args.batch_size:
        img_s, step_ms, peak = measure(args, info, transform, batch_size)
        print(f"method={args.method} arch={arch} input={args.input_size} batch={batch_size} "
              f"device={args.device_name} precision={args.precision} img/s={img_s:.1f} "
              f"step_ms={step_ms:.1f} peak_mem_MB={peak:.0f}", flush=True)
    distu.cleanup()


if __name__ == "__main__":
    cli.run(main)
