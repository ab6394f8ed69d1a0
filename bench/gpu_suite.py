"""The whole GPU check in ONE call of 9 minutes: environment, correctness, the multi-process
paths, the fast-by-default settings, a short time-to-accuracy run, throughput; every row
written to --out the moment it exists.

    python tools/pack_imagefolder.py /path/to/cifar10-jpeg packs/cifar10.pack  # once, anywhere
    python bench/gpu_suite.py --device cuda --minutes 9 --out runs/suite         # on the GPU
    python bench/gpu_suite.py --device cpu --minutes 2 --out runs/suite_cpu      # tiny versions

Sections, in order of what a minute of them proves (so a call cut short loses the least):
  environment       torch, CUDA, cuDNN, GPU, TF32; the data: packs/cifar10.pack unpacked into
                    runs/data/cifar10 once (tools/pack_imagefolder.py; --data_path instead)
  correctness       simclr and rotation on resnet18 and vit_tiny, dino and ibot on vit_tiny, dino
                    on resnet18, each in bf16, fp16 and fp32: 20 real training steps on one fixed
                    batch, loss finite and falling; one fp32 step on the device against the same
                    step on the CPU (TF32 off); the streaming JPEG path of data/loaders.py forced
                    with --data_memory_gb 0.0001 (train_ssl.py, one epoch of a CIFAR-10 subset)
  multi-process     torchrun --nproc_per_node=1 (NCCL) one epoch, then resume; 2 processes on the
                    one GPU over gloo (--dist_backend gloo) one epoch, then resume; 2 ranks x B/2
                    against 1 x B (bench/two_ranks.py): DDP, SyncBatchNorm, SimCLR's gathered
                    negatives
  settings          each fast default off and on: cudnn.benchmark, channels_last, fused AdamW/SGD,
                    DDP flags, the SDPA kernel, host-device syncs, pinned memory, TF32
  time-to-accuracy  SimCLR ResNet-18 on CIFAR-10 for --tta_epochs (bench/tta.py), the k-NN top-1
                    of its checkpoints against training wall time
  throughput        SimCLR ResNet-18 32px, DINO and iBOT ViT-S/16 2x224 + 10x96, rotation ViT-S/16
                    160px: img/s of the step alone and end to end (train_ssl.py's loader, tensor
                    and pil backends), peak memory, GFLOP per image, MFU; eager
  compiled          the throughput rows with --compile true: only with --compiled true (minutes
                    of compilation each), and last

Budget (--minutes 9, the default: one call on a lent GPU, which allows 10): estimated, not yet
measured on a GPU, about 20 s environment, 90 s correctness, 150 s multi-process, 60 s settings,
150 s time-to-accuracy, and the throughput rows in what is left. The budget is a hard limit:
every row runs in a worker process with its own time limit (ROW_LIMIT_S; --row_limit caps them
all), and a row over its limit is killed with its whole process tree and reported "timeout",
so one slow compile cannot eat the call; when the minutes are up the running row is killed and
the rest are reported "not run". Nothing the suite started outlives it, including when it is
stopped by SIGTERM/SIGINT (then the running row reads "killed"); the checkpoints its training
rows write live in a temporary folder that is deleted when it returns.

--out gets, rewritten atomically after every row (the suite lists every row first, "pending"):
  suite.json   {device, command, state, wall_s, rows: [{section, name, status, values, note,
               seconds, limit_s}]}; status: pass, fail, info, n/a, skipped, timeout, killed,
               not run (pending / running while the suite is still going)
  suite.md     the same as one table per section
  logs/        the worker's output and each subprocess row's (train_ssl.py, torchrun)
On CPU (--device cpu) every row runs in a tiny version (tiny images, batches and step counts;
bf16/fp16 and CUDA-only settings reported as such, never faked); tests/test_gpu_suite.py runs
it with --minutes 2 and kills one midway.
"""
import argparse
import contextlib
import ctypes
import datetime
import gc
import io
import json
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from unittest import mock

T0 = time.time()  # the budget starts here, before torch's import (seconds on a busy machine)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_ssl  # noqa: E402
from bench import throughput, tta, two_ranks  # noqa: E402
from core import amp, cli, preempt  # noqa: E402
from core import dist as distu  # noqa: E402
from core.checkpoint import load_file  # noqa: E402
from core.logger import bool_flag  # noqa: E402
from core.optim import build_optimizer, get_params_groups, lr_for_batch  # noqa: E402
from data import dataset_info  # noqa: E402
from methods import METHODS  # noqa: E402
from tools import pack_imagefolder  # noqa: E402

SECTIONS = ("environment", "correctness", "multi-process", "settings", "time-to-accuracy",
            "throughput", "compiled")
OPTIONAL_SECTIONS = SECTIONS[1:]

# Seconds each row may take (its worker is killed after this plus GRACE_S), by device. CUDA:
# generous estimates (no GPU measured yet); CPU: the tiny rows on a loaded 2-core machine.
ROW_LIMIT_S = {
    "cuda": {"versions": 60, "data": 120, "correctness": 60, "vs_cpu": 90, "streaming": 120,
             "torchrun": 150, "two_ranks": 90, "settings": 90, "tta": 180, "throughput": 120,
             "compiled": 300},
    "cpu": {"versions": 60, "data": 60, "correctness": 60, "vs_cpu": 60, "streaming": 90,
            "torchrun": 120, "two_ranks": 90, "settings": 60, "tta": 120, "throughput": 90,
            "compiled": 400},
}
TTA_MIN_S = {"cuda": 60, "cpu": 30}  # time-to-accuracy is not started with less than this left
GRACE_S = 5            # past a row's limit before its worker is killed (it may be writing)
WORKER_START_S = 120   # a worker must start its first row within this (imports, CUDA init)
FAILED_ROW_EXIT = 3    # a worker's exit code after a failed row (the next row gets a new one)
END_S = 5              # kept at the end of --minutes to stop the worker and write the table
MARKER_ENV = "MINISSL_SUITE_OUT"  # set for every process the suite starts (tests find them)

# Dense peak tensor throughput in TFLOP/s per precision, from NVIDIA's data sheets (the sheets
# print the 2:4-sparse figures, twice these): H100/H200 SXM "H100 Tensor Core GPU" and "H200
# Tensor Core GPU" data sheets, A100 "A100 Tensor Core GPU" data sheet. fp32 means TF32 tensor
# cores (fp32 matmuls and convolutions run on them with TF32 on). First match wins.
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 417.5}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
]

# (method, arch) pairs of the correctness rows: every method on both backbone families it supports
CORRECTNESS = [("simclr", "resnet18"), ("simclr", "vit_tiny"), ("rotation", "resnet18"),
               ("rotation", "vit_tiny"), ("dino", "vit_tiny"), ("ibot", "vit_tiny"),
               ("dino", "resnet18")]

# Throughput configurations: (label, train_ssl flags, batch sizes). The tiny ones keep method,
# backbone family and crop layout, at a size a 2-core CPU steps through in seconds.
THROUGHPUT = {
    "cuda": [
        ("SimCLR ResNet-18 32px", ["--method", "simclr", "--arch", "resnet18", "--crop_size", "32"],
         [256, 512]),
        ("DINO ViT-S/16 2x224+10x96", ["--method", "dino", "--arch", "vit_small", "--patch_size",
                                       "16", "--local_crops_number", "10"], [64, 128]),
        ("iBOT ViT-S/16 2x224+10x96", ["--method", "ibot", "--arch", "vit_small", "--patch_size",
                                       "16", "--local_crops_number", "10"], [64, 128]),
        ("rotation ViT-S/16 160px", ["--method", "rotation", "--arch", "vit_small", "--patch_size",
                                     "16", "--crop_size", "160"], [128, 256]),
    ],
    "cpu": [
        ("SimCLR ResNet-18 8px", ["--method", "simclr", "--arch", "resnet18", "--crop_size", "8",
                                  "--proj_hidden_dim", "256"], [8]),
        ("DINO ViT-Tiny/4 2x16+2x8", ["--method", "dino", "--arch", "vit_tiny", "--patch_size", "4",
                                      "--global_crops_size", "16", "--local_crops_size", "8",
                                      "--local_crops_number", "2", "--out_dim", "1024"], [8]),
        ("iBOT ViT-Tiny/4 2x16+2x8", ["--method", "ibot", "--arch", "vit_tiny", "--patch_size", "4",
                                      "--global_crops_size", "16", "--local_crops_size", "8",
                                      "--local_crops_number", "2", "--out_dim", "1024",
                                      "--patch_out_dim", "1024"], [8]),
        ("rotation ViT-Tiny/4 16px", ["--method", "rotation", "--arch", "vit_tiny", "--patch_size",
                                      "4", "--crop_size", "16"], [8]),
    ],
}


# ============ shared pieces ============

def cpu_seconds():
    """CPU time of this process and its finished children (a loaded machine's wall time says
    little about what a row costs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_args(argv, device):
    """bench/throughput.py's parse (train_ssl.py's flags and checks) for one process on
    `device`, inside the process group the suite set up."""
    args = throughput.parse_args([*argv, "--device", device])
    args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
    args.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    info = dataset_info(args.dataset, args.data_path or None)
    train_ssl.resolve_input(args, info)  # input_size, cifar_stem: as train_ssl.py sets them
    return args, info, METHODS[args.method].build_transform(args, info)


def fixed_batch(args, info, transform, batch_size, device=None):
    """One synthetic batch through the method's transform, the same in every run (the
    transforms draw from torch's and Python's generators)."""
    torch.manual_seed(0)
    random.seed(0)
    batch = throughput.synthetic_batch(transform, batch_size, max(info.image_size, args.input_size))
    return train_ssl.to_device(batch, device or args.device)


class LossRecorder:
    """Stands in for the DDP module of train_ssl.train_one_epoch: calls the model and keeps every
    step's loss on the device (read once at the end, so the step is not changed)."""

    def __init__(self, model):
        self.model, self.losses = model, []

    def train(self):
        self.model.train()

    def __call__(self, *args):
        loss, stats = self.model(*args)
        self.losses.append(loss.detach().float())
        return loss, stats


def run_steps(ddp_model, model, batch, optimizer, scaler, args, n, lr):
    """n real training steps (train_ssl.train_one_epoch) on one batch, constant lr and the
    recipe's weight decay, as the last epoch of the run (warmup-only behaviour over)."""
    lrs = np.full(args.epochs * n, lr)
    wds = np.full(args.epochs * n, args.weight_decay)
    t = train_ssl.Training(ddp_model, model, optimizer, scaler, lrs, wds, args)
    with contextlib.redirect_stdout(io.StringIO()):
        train_ssl.train_one_epoch(t, args.epochs - 1, preempt.ResumableRun(args, [batch] * n))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, n=1):
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t) / n


def tiny_size(arch):
    """Image size of the tiny CPU rows: a ResNet's cost grows with the pixels, a ViT/4's is
    mostly per-layer overhead at these sizes (16px: 16 patches)."""
    return 16 if arch.startswith("vit") else 8


def small_flags(method, arch, size, out_dim=1024):
    """train_ssl.py flags of a small run: `size` px (global crops; local crops half of it)."""
    flags = ["--method", method, "--arch", arch, "--patch_size", "4", "--drop_path_rate", "0"]
    if method in ("dino", "ibot"):
        flags += ["--global_crops_size", str(size), "--local_crops_size", str(size // 2),
                  "--local_crops_number", "2", "--out_dim", str(out_dim)]
        flags += ["--patch_out_dim", str(out_dim)] if method == "ibot" else []
    else:
        flags += ["--crop_size", str(size)]
        flags += ["--proj_hidden_dim", "256"] if method == "simclr" else []
    return flags


# ============ environment ============

def environment(ctx):
    v = {"torch": torch.__version__, "python": platform.python_version(),
         "cpus": os.cpu_count(), "tf32": tf32_state()}
    if ctx.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        v.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=p.name,
                 memory_GB=round(p.total_memory / 2**30, 1),
                 capability=f"{p.major}.{p.minor}")
    else:
        v.update(cuda="none (CPU run)", cpu=platform.processor() or platform.machine())
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    v["commit"] = commit or "unknown (no .git)"
    return "info", v, ""


def set_tf32(on):
    """TF32 for fp32 matmuls and convolutions, through torch's fp32_precision API."""
    value = "tf32" if on else "ieee"
    torch.backends.cuda.matmul.fp32_precision = value
    torch.backends.cudnn.conv.fp32_precision = value


def tf32_state():
    return f"matmul {torch.backends.cuda.matmul.fp32_precision}, " \
        f"conv {torch.backends.cudnn.conv.fp32_precision}"


@contextlib.contextmanager
def exact_fp32():
    """TF32 off, cuDNN deterministic and not autotuned, restored afterwards."""
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    set_tf32(False)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved[0]
        torch.backends.cudnn.conv.fp32_precision = saved[1]
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2:]


# ============ correctness ============

def correctness_losses(method, arch, precision, device, tiny):
    """Loss finite and decreasing over `steps` real training steps on one fixed batch."""
    if device == "cpu" and precision != "fp32":
        return "n/a", {}, "cuda only: CPU runs fp32 (core/amp.py)"
    size, batch_size, steps = (tiny_size(arch), 4, 6) if tiny else (32, 32, 20)
    args, info, transform = bench_args([*small_flags(method, arch, size), "--precision", precision,
                                        "--optimizer", "adamw"], device)
    args.batch_size_per_gpu = batch_size
    torch.manual_seed(0)
    model, optimizer, scaler = throughput.build_training(args, steps)
    # DINO/iBOT: the centre stays at its start. On one fixed batch the centre alone drives
    # the teacher's targets to uniform within ~10 steps (the loss then rises to log(out_dim)
    # whatever the student does); with it fixed, and the teacher's EMA momentum at ~1 in the
    # last epoch, the targets are fixed and the loss falls exactly when the student learns.
    for m in model.modules():
        for name in ("center_momentum", "center_momentum2"):
            if hasattr(m, name):
                setattr(m, name, 1.0)
    batch = fixed_batch(args, info, transform, batch_size)
    recorder = LossRecorder(model)
    try:
        # AdamW at a constant 1e-4 for every method: the check is about the code path and the
        # precision (20 steps of each recipe's warmup-scaled lr barely move on a small batch)
        run_steps(recorder, model, batch, optimizer, scaler, args, steps, lr=1e-4)
    except FloatingPointError:  # train_one_epoch stops on a non-finite loss
        pass
    losses = torch.stack(recorder.losses).cpu().tolist()
    k = max(2, len(losses) // 4)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    finite = bool(np.isfinite(losses).all()) and len(losses) == steps
    ok = finite and last < first
    values = {"steps": len(losses), "loss_first": round(first, 4), "loss_last": round(last, 4)}
    note = "" if ok else ("non-finite loss" if not finite else "loss did not decrease")
    return ("pass" if ok else "fail"), values, note


def step_loss_and_grad_norm(args, batch, device):
    """Loss and global gradient norm of one fp32 forward/backward of a fresh model (seed 0)."""
    args.device = device
    torch.manual_seed(0)
    model, _, _ = train_ssl.build_networks(args, 1)
    model.train()
    views, _ = batch
    loss, _ = model(train_ssl.to_device(views, device), args.epochs - 1, 0)
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()
                          if p.grad is not None))
    return loss.item(), norm.item()


# Tolerances of the device-vs-CPU fp32 step, relative. TF32 is off for it (10-bit mantissa, 1e-3
# relative error per product); what remains is fp32 rounding (eps 6e-8) accumulated in a
# different order by cuBLAS/cuDNN and by the CPU kernels: reductions of up to ~5k products per
# output (3x3x512 convolutions, 2048-wide heads), dozens of layers deep, where BatchNorm and the
# softmax temperatures (DINO's teacher at 0.04) amplify differences. Expected (not yet measured
# on a GPU): ~1e-6 on the loss, ~1e-5 on the gradient norm, so the limits leave ~100x room,
# while a real bug (a wrong kernel, a wrong reduction, a missing scale, TF32 left on) moves
# them by 1e-3 to 1e-1. cudnn.deterministic for the comparison: no atomics-ordered sums.
LOSS_RTOL, GRAD_RTOL = 1e-4, 1e-3


def device_vs_cpu(method, arch, device, tiny):
    size, batch_size = (tiny_size(arch), 4) if tiny else (32, 32)
    args, info, transform = bench_args([*small_flags(method, arch, size), "--precision", "fp32"],
                                       "cpu")
    batch = fixed_batch(args, info, transform, batch_size, device=torch.device("cpu"))
    if device == "cuda":
        with exact_fp32():
            a = step_loss_and_grad_norm(args, batch, torch.device("cuda", 0))
        b = step_loss_and_grad_norm(args, batch, torch.device("cpu"))
        against = "cuda (TF32 off) vs cpu"
    else:  # no second device: the CPU against itself, with 1 and with 2 threads
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            a = step_loss_and_grad_norm(args, batch, torch.device("cpu"))
            torch.set_num_threads(1)
            b = step_loss_and_grad_norm(args, batch, torch.device("cpu"))
        finally:
            torch.set_num_threads(threads)
        against = "cpu, 2 threads vs 1 thread"
    loss_rel = abs(a[0] - b[0]) / max(abs(b[0]), 1e-12)
    grad_rel = abs(a[1] - b[1]) / max(abs(b[1]), 1e-12)
    ok = loss_rel <= LOSS_RTOL and grad_rel <= GRAD_RTOL
    values = {"loss": f"{b[0]:.6g}", "loss_rel_diff": f"{loss_rel:.1e}",
              "grad_norm": f"{b[1]:.6g}", "grad_rel_diff": f"{grad_rel:.1e}"}
    return ("pass" if ok else "fail"), values, \
        f"{against}; limits {LOSS_RTOL:g} (loss), {GRAD_RTOL:g} (grad norm)"




# ============ the data ============

def cifar10_dir(args):
    """The CIFAR-10 ImageFolder of the rows that train on real images: --data_path, else where
    the data row unpacks --data_pack, else None."""
    if args.data_path:
        return Path(args.data_path).resolve()
    if args.data_pack and (REPO / args.data_pack).is_file():
        return REPO / "runs" / "data" / "cifar10"
    return None


def cifar10_ready(ctx):
    """The CIFAR-10 folder, once the data row has made it (or --data_path names it); else None."""
    if ctx.cifar is None:
        return None
    if ctx.args.data_path:
        return ctx.cifar if ctx.cifar.is_dir() else None
    return ctx.cifar if (ctx.cifar / pack_imagefolder.MARKER).is_file() else None


def make_tiny_digits(root, n_train=256, n_test=128):
    """A digits subset as .npy (32px uint8): small enough for a 2-core CPU to train an epoch of.
    Made once, in a sibling folder renamed when complete."""
    from data import build_dataset

    root = Path(root)
    if root.is_dir():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    for split, n in (("train", n_train), ("test", n_test)):
        ds = build_dataset("digits", "", split)
        (tmp / split).mkdir(parents=True, exist_ok=True)
        np.save(tmp / split / "images.npy", np.asarray(ds.images[:n], dtype=np.uint8))
        np.save(tmp / split / "labels.npy", np.asarray(ds.targets[:n], dtype=np.int64))
    os.replace(tmp, root)
    return root


def make_tiny_jpeg_folder(root, n_train=64, n_test=20):
    """Digits as a JPEG ImageFolder (root/{train,test}/<class>/*.jpg), for the streaming row."""
    from PIL import Image

    from data import build_dataset

    root = Path(root)
    if root.is_dir():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    for split, n in (("train", n_train), ("test", n_test)):
        ds = build_dataset("digits", "", split)
        for i in range(n):
            folder = tmp / split / str(int(ds.targets[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(ds.images[i], dtype=np.uint8)).save(folder / f"{i}.jpg")
    os.replace(tmp, root)
    return root


def cifar10_subset(cifar, root, per_class_train=256, per_class_test=20):
    """The first images of every CIFAR-10 class, linked into a new ImageFolder (one short epoch)."""
    root = Path(root)
    if root.is_dir():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        for folder in sorted(p for p in (cifar / split).iterdir() if p.is_dir()):
            (tmp / split / folder.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(folder.iterdir())[:n]:
                (tmp / split / folder.name / f.name).symlink_to(f)
    os.replace(tmp, root)
    return root


def data_row(ctx):
    if ctx.tiny:
        t = time.time()
        make_tiny_digits(ctx.scratch / "digits-256")
        make_tiny_digits(ctx.scratch / "digits-64", n_train=64, n_test=32)
        make_tiny_jpeg_folder(ctx.scratch / "jpeg-tiny")
        return "info", {"made_s": round(time.time() - t, 1)}, \
            "CPU: digits subsets (256 and 64 images, .npy) and 84 digits as JPEGs"
    if ctx.args.data_path:
        if not ctx.cifar.is_dir():
            return "fail", {}, f"--data_path {ctx.cifar} is not a folder"
        return "info", {"data_path": str(ctx.cifar)}, "--data_path"
    if ctx.cifar is None:
        return "skipped", {}, f"no {ctx.args.data_pack} (tools/pack_imagefolder.py makes it) " \
            "and no --data_path: the rows that need CIFAR-10 skip, end to end uses digits"
    t = time.time()
    pack = REPO / ctx.args.data_pack
    index = pack_imagefolder.info(pack)
    fresh = not (ctx.cifar / pack_imagefolder.MARKER).is_file()
    pack_imagefolder.unpack(pack, ctx.cifar)
    return "info", {"files": index["files"], "MiB": round(index["pack_bytes"] / 2**20, 1),
                    "unpack_s": round(time.time() - t, 1)}, \
        f"{ctx.args.data_pack} -> {ctx.cifar.relative_to(REPO)}" + ("" if fresh else " (kept)")


# ============ subprocess rows ============

def run_logged(cmd, log):
    """Run cmd in the checkout, its output appended to `log` and returned. It runs in this
    process group, so the conductor's kill of a row over its limit takes it along (torchrun's
    workers, in sessions of their own, die with their launcher: core/dist.exit_with_launcher)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    header = f"$ {' '.join(map(str, cmd))}\n"
    with open(log, "a") as f:
        f.write(header)
        f.flush()
        rc = subprocess.run(list(map(str, cmd)), cwd=REPO, env=tta.clean_env(), stdout=f,
                            stderr=subprocess.STDOUT).returncode
    text = log.read_text(errors="replace")
    return rc, text[text.rindex(header) + len(header):]


def tail(text, n=3):
    return " / ".join(line.strip() for line in text.strip().splitlines()[-n:])[:400]


def flag_missing(text, flag):
    """True when train_ssl.py refused `flag` as unknown (a branch without it)."""
    return flag in text and ("unrecognized arguments" in text or "unrecognised" in text)


# ============ correctness: the streaming data path ============

def streaming_row(ctx):
    """train_ssl.py for one epoch with a resident budget so small that data/loaders.py streams
    the JPEGs (decoded on the GPU with nvJPEG on CUDA), the path ImageNet takes."""
    if ctx.tiny:
        data, flags = ctx.scratch / "jpeg-tiny", ["--crop_size", "8", "--batch_size_per_gpu",
                                                  "16", "--num_workers", "0", "--cpu"]
        make_tiny_jpeg_folder(data)
    else:
        cifar = cifar10_ready(ctx)
        if cifar is None:
            return "skipped", {}, "no CIFAR-10 (see the data row)"
        data = cifar10_subset(cifar, ctx.scratch / "cifar10-subset")
        flags = ["--crop_size", "32", "--batch_size_per_gpu", "256", "--num_workers", "8"]
    run_dir = ctx.scratch / "streaming"
    cmd = [sys.executable, "train_ssl.py", "--method", "simclr", "--arch", "resnet18",
           "--dataset", "imagefolder", "--data_path", data, *flags, "--epochs", "1",
           "--warmup_epochs", "0", "--data_memory_gb", "0.0001", "--knn_eval", "false",
           "--tensorboard", "false", "--print_freq", "5", "--output_dir", run_dir]
    t = time.time()
    rc, text = run_logged(cmd, ctx.logs / "streaming.log")
    shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoint
    values = {"run_s": round(time.time() - t, 1)}
    if rc != 0:
        return "fail", values, f"exited {rc}: {tail(text)}"
    loaded = [line for line in text.splitlines() if line.startswith("Data loaded")]
    values["images"] = loaded[0].split("there are ")[1].split()[0] if loaded else "?"
    streamed = bool(loaded) and "JPEG bytes" in loaded[0]
    on_gpu = bool(loaded) and "nvJPEG" in loaded[0]
    ok = streamed and (ctx.tiny or on_gpu) and "Averaged stats" in text
    note = loaded[0].split("(", 1)[-1].rstrip(").") if loaded else "no 'Data loaded' line"
    return ("pass" if ok else "fail"), values, note if ok else "not streamed: " + note


# ============ multi-process ============

def torchrun_row(ctx, nproc, backend_flags=()):
    """torchrun with `nproc` processes on the one device for one epoch of DINO ViT-Tiny, then
    the same command for a second: it must find the checkpoint and start at epoch 1."""
    parser = train_ssl.get_args_parser("dino")
    missing = [f for f in backend_flags[:1] if f not in parser._option_string_actions]
    if missing:  # a branch without the flag: say so at once, not after starting torchrun
        return "skipped", {}, f"flag missing: train_ssl.py has no {missing[0]} yet"
    run_dir = ctx.scratch / f"torchrun{nproc}"
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = small_flags("dino", "vit_tiny", 16 if ctx.tiny else 32)
    flags[flags.index("--patch_size") + 1] = "4" if ctx.tiny else "8"
    data = ["--dataset", "npy", "--data_path",
            str(make_tiny_digits(ctx.scratch / "digits-64", 64, 32))] if ctx.tiny \
        else ["--dataset", "digits"]
    batch = (32 if ctx.tiny else 128) // nproc
    flags += [*data, "--batch_size_per_gpu", str(batch), "--warmup_epochs", "0",
              "--num_workers", "0" if ctx.tiny else "4", "--knn_eval", "false", "--tensorboard",
              "false", "--output_dir", str(run_dir), "--print_freq", "5", *backend_flags]
    flags += ["--cpu"] if ctx.tiny else []
    backend = "gloo" if ctx.tiny or "gloo" in backend_flags else "nccl"
    log = ctx.logs / f"torchrun{nproc}.log"
    times, outputs = [], []
    for epochs in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "train_ssl.py", *flags, "--epochs", str(epochs)]
        t = time.time()
        rc, text = run_logged(cmd, log)
        times.append(round(time.time() - t, 1))
        if rc != 0:
            shutil.rmtree(run_dir, ignore_errors=True)
            if backend_flags and flag_missing(text, backend_flags[0]):
                return "skipped", {}, f"flag missing: train_ssl.py has no {backend_flags[0]} yet"
            return "fail", {"run_s": times}, f"run {epochs} exited {rc}: {tail(text)}"
        outputs.append(text)
    epoch = load_file(str(run_dir / "checkpoint.pth"))["epoch"]
    shutil.rmtree(run_dir, ignore_errors=True)  # the checkpoints
    # every rank prints its init line, in whatever order (and torchrun may join two lines)
    init = [line for line in outputs[0].splitlines() if "distributed init" in line]
    checks = {f"rank 0/{nproc} over {backend}": any(f"rank 0/{nproc}, {backend}" in line
                                                    for line in init),
              "epoch 0 trained": "Starting dino training from epoch 0!" in outputs[0],
              "resumed": f"Found checkpoint at {run_dir / 'checkpoint.pth'}" in outputs[1]
              and "Starting dino training from epoch 1!" in outputs[1],
              "checkpoint epoch 2": epoch == 2}
    failed = [k for k, ok in checks.items() if not ok]
    values = {"run_s": times, "backend": backend}
    note = (init[0].strip("| ") if init else "") + "; DINO ViT-Tiny, 1 epoch then resume"
    return ("fail" if failed else "pass"), values, ("failed: " + ", ".join(failed)) if failed \
        else note


def two_ranks_row(ctx, check):
    """bench/two_ranks.py: the 1 x B reference here, then 2 ranks x B/2 under torchrun."""
    ref, out = ctx.scratch / f"two_ranks_{check}.pth", ctx.scratch / f"two_ranks_{check}.json"
    two_ranks.reference(check, ctx.device, ctx.tiny, ref)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "bench/two_ranks.py", "--check", check, "--device", ctx.device, "--ref", ref,
           "--out", out, *(["--tiny"] if ctx.tiny else [])]
    rc, text = run_logged(cmd, ctx.logs / f"two_ranks_{check}.log")
    if rc != 0 or not out.is_file():
        return "fail", {}, f"exited {rc}: {tail(text)}"
    r = json.loads(out.read_text())
    ok = r["loss_rel"] <= two_ranks.LOSS_RTOL and r["grad_rel"] <= two_ranks.GRAD_RTOL and \
        r["worst_tensor_rel"] <= two_ranks.TENSOR_RTOL
    values = {"loss_rel": f"{r['loss_rel']:.1e}", "grad_rel": f"{r['grad_rel']:.1e}",
              "worst_tensor_rel": f"{r['worst_tensor_rel']:.1e}", "backend": r["backend"]}
    method, arch = two_ranks.CHECKS[check]
    return ("pass" if ok else "fail"), values, \
        f"{method} {arch}, 2 ranks on {r['device']} vs 1 process; limits " \
        f"{two_ranks.LOSS_RTOL:g} (loss), {two_ranks.GRAD_RTOL:g} (gradients), " \
        f"{two_ranks.TENSOR_RTOL:g} (worst tensor)"


# ============ throughput ============

def peak_tflops(device, precision):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks[precision]
    return None


def step_flops(args, info, transform, batch_size):
    """FLOPs of one training step (forward and backward; the optimizer's are negligible),
    counted by torch.utils.flop_counter on the eager model: matmuls, convolutions, attention."""
    from torch.utils.flop_counter import FlopCounterMode

    args.batch_size_per_gpu = batch_size
    torch.manual_seed(args.seed)
    compile_flag, args.compile = args.compile, False
    try:
        model, _, _ = throughput.build_training(args, 1)
    finally:
        args.compile = compile_flag
    batch = fixed_batch(args, info, transform, batch_size)
    counter = FlopCounterMode(display=False)
    with counter:  # one block: entering the mode again would reset its counts
        with amp.autocast(args.precision, args.device):
            loss, _ = model(batch[0], args.epochs - 1, 0)
        loss.backward()
    del model, batch
    return counter.get_total_flops()


def throughput_row(label, flags, batch_size, compiled, device, tiny, data_flags, flops_cache):
    steps, warmup = (1, 1) if tiny else (20, 5 if not compiled else 8)
    workers = 0 if tiny else min(16, os.cpu_count() or 1)
    args, info, transform = bench_args([*flags, "--compile", str(compiled).lower(),
                                        "--steps", str(steps), "--warmup", str(warmup)], device)
    img_s, step_ms, peak = throughput.measure(args, info, transform, batch_size)
    values = {"step_img_s": round(img_s, 1), "step_ms": round(step_ms, 1),
              "peak_MB": round(peak), "precision": args.precision}
    key = (label, batch_size)
    if key not in flops_cache:
        flops_cache[key] = step_flops(args, info, transform, batch_size)
    flops = flops_cache[key]
    values["GFLOP_per_img"] = round(flops / batch_size / 1e9, 2)
    peak_tf = peak_tflops(args.device, args.precision)
    values["MFU_%"] = round(100 * flops / (step_ms / 1000) / (peak_tf * 1e12), 1) if peak_tf \
        else "n/a"
    # end to end: train_ssl.py's loader (data/loaders.py) feeding the step, on real images;
    # the default tensor backend, and (eager rows) the PIL reference path
    e2e_args, _, e2e_transform = bench_args([*flags, *data_flags, "--compile",
                                             str(compiled).lower(), "--mode", "end2end",
                                             "--steps", str(steps), "--warmup", str(warmup),
                                             "--num_workers", str(workers)], device)
    for backend in ("tensor",) if compiled or tiny else ("tensor", "pil"):
        img_s, _ = throughput.measure_loader(e2e_args, e2e_transform, batch_size, backend,
                                             train=True)
        values[f"e2e_{backend}_img_s"] = round(img_s, 1)
    values["e2e_data"] = e2e_args.dataset
    if device == "cuda":
        torch.cuda.empty_cache()
    note = "peak_MB: CPU peak RSS of the suite process" if device == "cpu" else ""
    return "info", values, note


# ============ settings, each off and on ============

def _ab(off_s, on_s, unit="ms"):
    scale = 1000 if unit == "ms" else 1
    return {f"off_{unit}": round(off_s * scale, 2), f"on_{unit}": round(on_s * scale, 2),
            "speedup": round(off_s / on_s, 2)}


def _steps_ms(args, info, transform, batch_size, n, model_fn=None, ddp_kwargs=None):
    """Seconds per real training step after 2 warm-up steps; model_fn(model) -> model and
    ddp_kwargs (a world-size-1 DDP wrapper) set what is compared."""
    args.batch_size_per_gpu = batch_size
    torch.manual_seed(0)
    model, optimizer, scaler = throughput.build_training(args, n + 2)
    if model_fn is not None:
        model = model_fn(model)
    ddp_model = model
    if ddp_kwargs is not None:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[0] if args.device.type == "cuda" else None, **ddp_kwargs)
    batch = fixed_batch(args, info, transform, batch_size)
    lr = lr_for_batch(args.lr, batch_size)
    run_steps(ddp_model, model, batch, optimizer, scaler, args, 2, lr)
    return timed(lambda: run_steps(ddp_model, model, batch, optimizer, scaler, args, n, lr),
                 args.device) / n


def setting_cudnn_benchmark(device, tiny):
    if device == "cpu":
        return "n/a", {}, "cuda only"
    args, info, transform = bench_args(["--method", "simclr", "--arch", "resnet18", "--crop_size",
                                        "32"], device)
    res = []
    for on in (False, True):
        torch.backends.cudnn.benchmark = on
        res.append(_steps_ms(args, info, transform, 256, 10))
    torch.backends.cudnn.benchmark = True
    return "info", _ab(*res), "SimCLR ResNet-18 32px, batch 256, step time"


def setting_channels_last(device, tiny):
    size, batch_size, n = (8, 8, 1) if tiny else (32, 256, 10)
    args, info, transform = bench_args(["--method", "simclr", "--arch", "resnet18", "--crop_size",
                                        str(size), "--proj_hidden_dim", "256"], device)
    res = []
    for on in (False, True):
        fmt = torch.channels_last if on else torch.contiguous_format

        def to_device(obj, dev, channels_last=False, fmt=fmt):  # with the chosen layout
            if torch.is_tensor(obj):
                obj = obj.to(dev)
                return obj.contiguous(memory_format=fmt) if obj.ndim == 4 else obj
            if isinstance(obj, (list, tuple)):
                return type(obj)(to_device(o, dev, fmt=fmt) for o in obj)
            return obj
        with mock.patch.object(train_ssl, "to_device", to_device):
            res.append(_steps_ms(args, info, transform, batch_size, n,
                                 model_fn=lambda m, fmt=fmt: m.to(memory_format=fmt)))
    note = "SimCLR ResNet-18, step time; train_ssl.py uses it on CUDA only"
    return "info", _ab(*res), note


def setting_fused_optimizer(device, tiny, name):
    """optimizer.step() alone, the for-each implementation against the fused one."""
    size, n = (16, 3) if tiny else (224, 20)
    args, info, transform = bench_args(["--method", "dino", "--arch", "vit_tiny" if tiny else
                                        "vit_small", "--patch_size", "4" if tiny else "16",
                                        "--global_crops_size", str(size), "--local_crops_number",
                                        "0", "--out_dim", "1024" if tiny else "65536"], device)
    torch.manual_seed(0)
    model, _, _ = throughput.build_training(args, 1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    res = []
    for fused in (False, True):
        kw = {"fused": True} if fused else {"foreach": True}
        groups = get_params_groups(model)  # fresh dicts: an optimizer writes its defaults in
        opt = torch.optim.AdamW(groups, lr=1e-4, **kw) if name == "adamw" else \
            torch.optim.SGD(groups, lr=1e-4, momentum=0.9, **kw)
        opt.step()  # state allocation
        res.append(timed(opt.step, args.device, n))
    used = build_optimizer(name, get_params_groups(model), args.device).defaults.get("fused")
    note = f"optimizer.step() alone on DINO {args.arch}'s trainable parameters; " \
           f"train_ssl.py: fused={bool(used)} on {device}"
    return "info", _ab(*res), note


def setting_ddp(device, tiny):
    size, batch_size, n = (8, 8, 1) if tiny else (32, 256, 10)
    args, info, transform = bench_args(["--method", "simclr", "--arch", "resnet18", "--crop_size",
                                        str(size), "--proj_hidden_dim", "256"], device)
    on_kwargs = train_ssl.ddp_kwargs(buffers_in_sync=True)  # train_ssl.py's on CUDA
    off_kwargs = {**train_ssl.ddp_kwargs(buffers_in_sync=False), "gradient_as_bucket_view": False}
    off = _steps_ms(args, info, transform, batch_size, n, ddp_kwargs=off_kwargs)
    on = _steps_ms(args, info, transform, batch_size, n, ddp_kwargs=on_kwargs)
    return "info", _ab(off, on), "SimCLR ResNet-18 in a world-size-1 DDP: off = buffers " \
        "broadcast every forward, gradients copied to the buckets; on = train_ssl.py's " \
        f"({', '.join(f'{k}={v}' for k, v in on_kwargs.items())})"


def setting_sdpa(device, tiny):
    """Which attention kernel the ViT step reaches (the aten op SDPA dispatches to), and the
    step's time against the math (unfused) kernel. Passes on CUDA in bf16/fp16 when a fused
    flash kernel runs (PyTorch's own or cuDNN's)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    size, batch_size, n = (16, 8, 1) if tiny else (224, 64, 10)
    args, info, transform = bench_args(["--method", "rotation", "--arch", "vit_tiny" if tiny else
                                        "vit_small", "--patch_size", "4" if tiny else "16",
                                        "--crop_size", str(size)], device)
    args.batch_size_per_gpu = batch_size
    torch.manual_seed(0)
    model, optimizer, scaler = throughput.build_training(args, 1)
    batch = fixed_batch(args, info, transform, batch_size)
    run_steps(model, model, batch, optimizer, scaler, args, 1, 1e-4)
    with OpNames() as seen:
        run_steps(model, model, batch, optimizer, scaler, args, 1, 1e-4)
    ops = sorted(op for op in seen.names if op.startswith(
        ("_scaled_dot_product", "_flash_attention", "_efficient_attention", "_cudnn_attention")))
    kernel = ", ".join(o.replace("_scaled_dot_product_", "") for o in ops) or "none seen"
    default = timed(lambda: run_steps(model, model, batch, optimizer, scaler, args, n, 1e-4),
                    args.device) / n
    with sdpa_kernel([SDPBackend.MATH]):
        math = timed(lambda: run_steps(model, model, batch, optimizer, scaler, args, n, 1e-4),
                     args.device) / n
    flash = any("flash" in o or "cudnn" in o for o in ops)
    ok = flash or device == "cpu" or args.precision == "fp32"
    values = {"kernel": kernel, "precision": args.precision, **_ab(math, default)}
    note = f"rotation {args.arch}, step time; off = math kernel, on = default"
    return ("pass" if ok else "fail"), values, note if ok else note + "; flash not reached"


class OpNames(TorchDispatchMode):
    """Records the name of every aten op that runs (forward and backward) while active: the
    op SDPA dispatches to names its kernel (flash, efficient, cudnn, math)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def setting_host_sync(device, tiny):
    """Synchronising CUDA calls inside train_one_epoch (torch.cuda.set_sync_debug_mode),
    besides those made once per --print_freq steps by design: the logging (core/logger.py), the
    ranks' agreement that reads the non-finite-loss count (core/preempt.py agree) and the SVD
    of the effective-rank diagnostic (core/diagnostics.py)."""
    if device == "cpu":
        return "n/a", {}, "cuda only (torch.cuda.set_sync_debug_mode)"
    found = {}
    for method, arch in (("simclr", "resnet18"), ("dino", "vit_tiny"), ("ibot", "vit_tiny"),
                         ("rotation", "vit_tiny")):
        args, info, transform = bench_args(small_flags(method, arch, 32), device)
        args.batch_size_per_gpu = 32
        args.print_freq = 1000  # logs (and syncs) at the first and last step only
        torch.manual_seed(0)
        model, optimizer, scaler = throughput.build_training(args, 8)
        batch = fixed_batch(args, info, transform, 32)
        run_steps(model, model, batch, optimizer, scaler, args, 2, 1e-4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run_steps(model, model, batch, optimizer, scaler, args, 6, 1e-4)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        where = {f"{Path(w.filename).name}:{w.lineno}" for w in caught
                 if "synchroniz" in str(w.message)
                 and not w.filename.endswith(("core/logger.py", "core/diagnostics.py"))
                 and not (w.filename.endswith("core/preempt.py") and
                          _function_at(w.filename, w.lineno) == "agree")}
        if where:
            found[f"{method}/{arch}"] = sorted(where)
    values = {"methods": 4, "with_syncs": len(found)}
    return ("fail" if found else "pass"), values, \
        ("; ".join(f"{k}: {v}" for k, v in found.items()) if found
         else "no sync outside the every-print_freq logging (bf16, recipe optimizers)")


def _function_at(path, lineno):
    """Name of the function whose body holds line `lineno` of `path` (for sync attribution)."""
    lines = Path(path).read_text().splitlines()[:lineno]
    for line in reversed(lines):
        if line.lstrip().startswith("def "):
            return line.split("def ")[1].split("(")[0]
    return ""


def setting_pinned(device, tiny):
    if device == "cpu":
        return "n/a", {}, "cuda only"
    # one DINO ViT-S/16 batch of 64: 2 x 224^2 + 10 x 96^2 crops, float32, 148 MB
    x = torch.randn(64, 3 * (2 * 224 * 224 + 10 * 96 * 96))
    gb = x.numel() * 4 / 1e9
    res = []
    for pinned in (False, True):
        src = x.pin_memory() if pinned else x
        src.to("cuda", non_blocking=pinned)
        res.append(timed(lambda: src.to("cuda", non_blocking=pinned), torch.device("cuda"), 5))
    return "info", {"off_GB_s": round(gb / res[0], 1), "on_GB_s": round(gb / res[1], 1),
                    "speedup": round(res[0] / res[1], 2)}, \
        "host-to-device copy of a 148 MB DINO batch, pageable vs pinned (what the pil " \
        "backend's DataLoader and host-resident arrays use)"




def setting_tf32(device, tiny):
    """fp32 training steps with TF32 off and on: what --precision fp32 costs without it."""
    if device == "cpu":
        return "n/a", {}, "cuda only (TF32 is a tensor-core format)"
    args, info, transform = bench_args(["--method", "simclr", "--arch", "resnet18", "--crop_size",
                                        "32", "--precision", "fp32"], device)
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    res = []
    try:
        for on in (False, True):
            set_tf32(on)
            res.append(_steps_ms(args, info, transform, 256, 10))
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved
    return "info", _ab(*res), "SimCLR ResNet-18 32px in fp32, batch 256, step time"


# ============ time-to-accuracy ============

def repo_relative(path):
    """`path` relative to the checkout when inside it: the run's flags then hold on any machine
    that has the checkout somewhere else (the time-to-accuracy run keeps its first flags)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def tta_recipe(device, data_path, epochs):
    """SimCLR ResNet-18 on CIFAR-10, the fastest recipe we can justify without a GPU measurement:
    solo-learn's CIFAR SimCLR (scripts/pretrain/cifar/simclr.yaml: temperature 0.2, a 2048-256
    projector, weight decay 1e-4, min crop scale 0.08, no blur at 32px) with this repository's
    LARS recipe (lr 0.3 per 256, google-research/simclr), bf16 and channels_last, batch 512
    (the step is too small to fill an H100 at 256), and a cosine schedule that ENDS inside the
    budget (--epochs): a schedule cut short mid-way leaves the lr high and the k-NN low."""
    if device == "cpu":  # the tiny version: a 256-image digits subset at 8px, two epochs
        return ["--method", "simclr", "--arch", "resnet18", "--dataset", "npy", "--data_path",
                str(data_path), "--crop_size", "8", "--batch_size_per_gpu", "64", "--epochs",
                str(epochs), "--warmup_epochs", "0", "--optimizer", "adamw", "--lr", "2e-3",
                "--weight_decay", "1e-4", "--weight_decay_end", "1e-4", "--temperature", "0.2",
                "--proj_hidden_dim", "256", "--num_workers", "0", "--knn_eval", "false",
                "--tensorboard", "false", "--print_freq", "50", "--cpu"]
    return ["--method", "simclr", "--arch", "resnet18", "--dataset", "imagefolder", "--data_path",
            str(data_path), "--crop_size", "32", "--batch_size_per_gpu", "512", "--epochs",
            str(epochs), "--warmup_epochs", str(max(1, epochs // 20)), "--optimizer", "lars",
            "--lr", "0.3", "--weight_decay", "1e-4", "--weight_decay_end", "1e-4",
            "--temperature", "0.2", "--proj_output_dim", "256", "--precision", "bf16",
            "--num_workers", str(min(16, os.cpu_count() or 1)), "--knn_eval", "false",
            "--print_freq", "50"]




def tta_row(ctx):
    """The recipe for --tta_epochs, trained and evaluated by bench/tta.py (in this row's process
    group, so a killed row stops it), until done or the row's time is up."""
    if ctx.tiny:
        data = make_tiny_digits(ctx.scratch / "digits-256")
    else:
        data = cifar10_ready(ctx)
        if data is None:
            return "skipped", {}, "no CIFAR-10 (see the data row)"
    run_dir = ctx.scratch / "tta"
    recipe = tta_recipe(ctx.device, repo_relative(data), ctx.args.tta_epochs)
    t = time.time()
    budget_cut = ctx.deadline >= ctx.args.worker_deadline  # the suite's minutes end first
    if budget_cut and ctx.deadline - t < TTA_MIN_S[ctx.device]:
        return "not run", {}, "out of time (--minutes)"
    tta.start(run_dir, recipe, eval_every=ctx.args.tta_eval_every,
              eval_workers=0 if ctx.tiny else 8, new_session=False)
    shown = 0
    while time.time() < ctx.deadline - (8 if ctx.tiny else 20) and tta.is_running(run_dir):
        progress = tta.read_progress(run_dir)
        for p in progress[shown:]:
            print(f"[time-to-accuracy] epoch {p['epoch']}: train {p['train_s']} s, "
                  f"k-NN top-1 {p['knn_top1']}", flush=True)
        shown = len(progress)
        time.sleep(0.5 if ctx.tiny else 2)
    stopped = tta.stop(run_dir, timeout=5 if ctx.tiny else 15)
    state, progress = tta.read_state(run_dir), tta.read_progress(run_dir)
    for name in ("train.log", "progress.jsonl"):
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, ctx.logs / f"tta_{name}")
    shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoints
    values = {"epochs_done": state.get("epoch", 0), "epochs": ctx.args.tta_epochs,
              "run_s": round(time.time() - t, 1)}
    if progress:
        last = progress[-1]
        values.update(knn_top1=last["knn_top1"], at_train_s=last["train_s"],
                      curve=", ".join(f"e{p['epoch']} {p['knn_top1']}% @{p['train_s']:.0f}s"
                                      for p in progress))
    note = "python train_ssl.py " + " ".join(recipe)
    if state.get("status") == "done":
        ok = bool(progress) and progress[-1]["knn_top1"] > 20  # 10 classes: chance is 10 %
        return ("pass" if ok else "fail"), values, \
            note if ok else "k-NN top-1 not above 2x chance; " + note
    if stopped or state.get("status") == "stopped":  # the curve so far is the result
        why = "out of time (--minutes)" if budget_cut else "at the row's time limit"
        return ("info" if progress else "killed" if budget_cut else "timeout"), values, \
            f"stopped {why} after {values['epochs_done']} epochs; {note}"
    log = ctx.logs / "tta_train.log"
    return "fail", values, f"training {state.get('status', 'failed')}: " + \
        (tail(log.read_text(errors="replace")) if log.is_file() else state.get("error", ""))


# ============ throughput rows ============

FLOPS = {}  # (label, batch size) -> FLOPs of a step, counted once per worker process


def throughput_rows(ctx, label, flags, batch_size, compiled):
    if ctx.tiny:
        data_flags = ["--dataset", "npy", "--data_path", str(make_tiny_digits(
            ctx.scratch / "digits-256"))]
    else:
        cifar = cifar10_ready(ctx)
        data_flags = ["--dataset", "imagefolder", "--data_path", str(cifar)] if cifar \
            else ["--dataset", "digits"]
    return throughput_row(label, flags, batch_size, compiled, ctx.device, ctx.tiny, data_flags,
                          FLOPS)


# ============ the plan: every row, in order ============

Row = types.SimpleNamespace


def plan(args):
    """Every row of this run, in order: Row(section, name, fn(ctx) -> (status, values, note),
    limit_s). The conductor and its workers build the same plan from the same flags."""
    device, tiny = args.device, args.device == "cpu"
    limit = ROW_LIMIT_S[device]
    sections = set(args.sections or [s for s in OPTIONAL_SECTIONS if s != "compiled"])
    if args.compiled:
        sections.add("compiled")
    rows = []

    def add(section, name, fn, kind):
        if section == "environment" or section in sections:
            rows.append(Row(section=section, name=name, fn=fn, limit_s=limit[kind]))

    add("environment", "versions", environment, "versions")
    add("environment", "data", data_row, "data")
    for method, arch in CORRECTNESS:
        for precision in ("bf16", "fp16", "fp32"):
            add("correctness", f"{method} {arch} {precision}",
                lambda c, m=method, a=arch, p=precision: correctness_losses(m, a, p, device, tiny),
                "correctness")
    for i, (method, arch) in enumerate(CORRECTNESS):
        name = f"{method} {arch} fp32 step, {device} vs cpu"
        if tiny and i > 0:  # a 2-thread step costs a loaded 2-core CPU seconds; one is enough
            add("correctness", name,
                lambda c: ("n/a", {}, "CPU: the first row compares thread counts for all"),
                "vs_cpu")
        else:
            add("correctness", name, lambda c, m=method, a=arch: device_vs_cpu(m, a, device, tiny),
                "vs_cpu")
    add("correctness", "streaming JPEG path (--data_memory_gb 0.0001), one epoch", streaming_row,
        "streaming")

    add("multi-process", "torchrun --nproc_per_node=1, then resume",
        lambda c: torchrun_row(c, 1), "torchrun")
    add("multi-process", "torchrun --nproc_per_node=2 --dist_backend gloo on one device, "
        "then resume", lambda c: torchrun_row(c, 2, ("--dist_backend", "gloo")), "torchrun")
    for check, what in (("ddp", "DDP"), ("syncbn", "SyncBatchNorm"),
                        ("simclr", "SimCLR gathered negatives")):
        add("multi-process", f"2 ranks x B/2 vs 1 x B: {what}",
            lambda c, k=check: two_ranks_row(c, k), "two_ranks")

    for name, fn in (("cudnn.benchmark", setting_cudnn_benchmark),
                     ("channels_last (ResNet)", setting_channels_last),
                     ("fused AdamW", lambda d, t: setting_fused_optimizer(d, t, "adamw")),
                     ("fused SGD", lambda d, t: setting_fused_optimizer(d, t, "sgd")),
                     ("DDP buffer sync / gradient_as_bucket_view", setting_ddp),
                     ("SDPA attention kernel", setting_sdpa),
                     ("host-device syncs in the step", setting_host_sync),
                     ("pinned memory", setting_pinned),
                     ("TF32 (fp32 steps)", setting_tf32)):
        add("settings", name, lambda c, fn=fn: fn(device, tiny), "settings")

    add("time-to-accuracy", "SimCLR ResNet-18, " + ("digits 8px" if tiny else "CIFAR-10"),
        tta_row, "tta")

    for compiled in (False, True):
        section = "compiled" if compiled else "throughput"
        for label, flags, batches in THROUGHPUT[device]:
            for batch_size in batches:
                name = f"{label}, batch {batch_size}, {section if compiled else 'eager'}"
                if compiled and tiny and label != THROUGHPUT["cpu"][0][0]:
                    add(section, name, lambda c: ("n/a", {}, "CPU: only the first tiny row is "
                                                  "compiled (minutes each)"), section)
                    continue
                add(section, name, lambda c, lb=label, f=flags, b=batch_size, cp=compiled:
                    throughput_rows(c, lb, f, b, cp), section)
    if "compiled" not in sections and (args.sections is None or "compiled" in args.sections):
        rows.append(Row(section="compiled", name="--compile true rows", limit_s=0,
                        fn=lambda c: ("skipped", {}, "opt-in: --compiled true runs them, last "
                                      "(minutes of compilation per row)")))
    return rows


# ============ the worker: runs rows in its own process group ============

def worker_main(args):
    """Run the rows args.worker_rows (indices into plan(args)) in order. For each, write
    <scratch>/rows/<i>.start, then <i>.json (atomically) with its result. Exits after a failed
    row, so that the next row gets a fresh process (and a fresh CUDA context)."""
    rows, scratch = plan(args), Path(args.scratch)
    # the conductor's death (even SIGKILL) reaches us as SIGTERM (PR_SET_PDEATHSIG); a kill
    # takes the whole process group: torchrun, the time-to-accuracy training, loaders
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(os.getpgrp(), signal.SIGKILL))
    if os.getppid() == 1:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    tiny = args.device == "cpu"
    with contextlib.redirect_stdout(io.StringIO()):
        distu.init_distributed_mode(argparse.Namespace(cpu=tiny, dist_url="env://"))
    torch.backends.cudnn.benchmark = True  # train_ssl.py's settings
    set_tf32(args.tf32)
    ctx = types.SimpleNamespace(device=args.device, tiny=tiny, args=args, out=Path(args.out),
                                logs=Path(args.out) / "logs", scratch=scratch,
                                cifar=cifar10_dir(args), deadline=0.0)
    ctx.logs.mkdir(parents=True, exist_ok=True)
    for i in map(int, args.worker_rows.split(",")):
        row = rows[i]
        start = time.time()
        ctx.deadline = min(start + row.limit_s, args.worker_deadline)
        (scratch / "rows" / f"{i}.start").write_text(f"{start}\n")
        print(f"--- [{row.section}] {row.name}", flush=True)
        cpu = cpu_seconds()
        try:
            status, values, note = row.fn(ctx)
        except Exception as e:  # noqa: BLE001 - a failing row is a result
            import traceback
            traceback.print_exc()
            status, values, note = "fail", {}, f"{type(e).__name__}: " \
                f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        except SystemExit as e:  # a script that ends with sys.exit
            status, values, note = "fail", {}, f"exited with {e.code}"
        result = dict(status=status, values=values, note=note,
                      seconds=round(time.time() - start, 1), cpu_s=round(cpu_seconds() - cpu, 1))
        tta._write_json(scratch / "rows" / f"{i}.json", result)
        if status == "fail":
            return FAILED_ROW_EXIT
        if args.device == "cuda":  # the next row gets the memory of this one
            gc.collect()
            torch.cuda.empty_cache()
    distu.cleanup()
    return 0


# ============ the conductor: the table, the workers, the clock ============

class Stop(Exception):
    """A signal asked the suite to stop."""


class Suite:
    """The table of every row, written to suite.json / suite.md whenever a row changes."""

    def __init__(self, args, rows):
        self.out, self.device, self.rows = Path(args.out), args.device, rows
        self.start = T0
        self.deadline = self.start + 60 * args.minutes - END_S
        self.results = [dict(section=r.section, name=r.name, status="pending", values={},
                             note="", seconds=None, limit_s=r.limit_s) for r in rows]
        self.meta = {"device": args.device, "minutes": args.minutes, "state": "running",
                     "command": " ".join(["python", "bench/gpu_suite.py", *sys.argv[1:]])
                     if args.argv is None else " ".join(["python", "bench/gpu_suite.py",
                                                         *args.argv])}

    def set(self, i, **kw):
        self.results[i].update(kw)
        r = self.results[i]
        if r["status"] not in ("pending", "running"):
            values = "  ".join(f"{k}={v}" for k, v in r["values"].items())
            print(f"[{r['section']}] {r['name']}: {r['status'].upper()}  {values}  "
                  f"{r['note']}".rstrip(), flush=True)
        self.write()

    def write(self):
        meta = {**self.meta, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "wall_s": round(time.time() - self.start, 1)}
        _write_text(self.out / "suite.json", json.dumps({**meta, "rows": self.results},
                                                        indent=1))
        counts = {}
        for r in self.results:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        lines = [f"# minissl GPU suite: {meta['device']}", "",
                 f"{meta['date']}, `{meta['command']}`, {meta['wall_s']} s of "
                 f"{60 * meta['minutes']:.0f}, {meta['state']}; "
                 + ", ".join(f"{n} {s}" for s, n in counts.items()), ""]
        for section in dict.fromkeys(r["section"] for r in self.results):
            sec = [r for r in self.results if r["section"] == section]
            cols = list(dict.fromkeys(k for r in sec for k in r["values"]))
            lines += [f"## {section}", "", "| row | status | s | " + " | ".join(cols)
                      + " | note |", "|---|---|---|" + "---|" * len(cols) + "---|"]
            for r in sec:
                cells = [str(r["values"].get(c, "")).replace("|", "/") for c in cols]
                secs = "" if r["seconds"] is None else str(r["seconds"])
                lines.append(f"| {r['name']} | {r['status']} | {secs} | " + " | ".join(cells)
                             + f" | {r['note'].replace('|', '/')} |")
            lines.append("")
        _write_text(self.out / "suite.md", "\n".join(lines))


def _write_text(path, text):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _die_with_parent():
    """In a worker, before exec: SIGTERM when the conductor dies, however it dies (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def start_worker(args, queue, scratch, log):
    cmd = [sys.executable, str(Path(__file__).resolve()), *(args.argv or sys.argv[1:]),
           "--out", args.out, "--data_path", args.data_path,  # absolute: the worker's cwd differs
           "--worker_rows", ",".join(map(str, queue)), "--scratch", str(scratch),
           "--worker_deadline", str(args.deadline)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_parent, env=tta.clean_env())


def marked_processes(marker):
    """Ids of the processes (but this one) whose environment holds MARKER_ENV=marker: every
    process this suite started, also those in sessions of their own (torchrun's workers) and
    orphans (Linux /proc; elsewhere none are found)."""
    entry = f"{MARKER_ENV}={marker}".encode()
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    found = []
    for name in names:
        if name.isdigit() and int(name) != os.getpid():
            try:
                if entry in Path(f"/proc/{name}/environ").read_bytes().split(b"\0"):
                    found.append(int(name))
            except OSError:
                continue
    return found


def kill_marked():
    """SIGKILL to every process of this suite (its marker is in this process's os.environ)."""
    marker = os.environ.get(MARKER_ENV)
    if marker:
        for pid in marked_processes(marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def kill_worker(proc):
    """SIGTERM to the worker (it SIGKILLs its process group), then SIGKILL to the group, then
    to whatever else of the suite still runs (a torchrun worker whose launcher was killed
    before it could ask to die with it)."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # children that outlived the leader
        os.killpg(proc.pid, signal.SIGKILL)
    kill_marked()


def conduct(args, suite, scratch):
    """Run every row through workers, each row within its limit, until done or out of time."""
    rows_dir = scratch / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    queue = list(range(len(suite.rows)))
    log = open(suite.out / "logs" / "worker.log", "a")
    suite.worker = None
    try:
        while queue:
            if suite.deadline - time.time() < 2:
                break
            suite.worker = proc = start_worker(args, queue, scratch, log)
            idle_since, started = time.time(), None  # when the worker last finished a row
            while queue:
                i = queue[0]
                done, start_file = rows_dir / f"{i}.json", rows_dir / f"{i}.start"
                if done.is_file():
                    suite.set(i, **json.loads(done.read_text()))
                    queue.pop(0)
                    idle_since, started = time.time(), None
                    continue
                if started is None and start_file.is_file():
                    started = float(start_file.read_text() or time.time())
                    suite.set(i, status="running", note=f"started {time.strftime('%H:%M:%S')}")
                rc, now = proc.poll(), time.time()
                if rc is not None:
                    if done.is_file():
                        continue
                    if rc == FAILED_ROW_EXIT and started is None:
                        break  # it stopped after a failed row: a fresh worker goes on
                    note = f"its worker exited ({rc}) " + ("in this row" if started else
                                                           "before this row") + "; logs/worker.log"
                    suite.set(i, status="fail", note=note,
                              seconds=round(now - started, 1) if started else None)
                    queue.pop(0)
                    break
                if now > suite.deadline:
                    kill_worker(proc)
                    suite.set(i, status="killed" if started else "not run",
                              note="out of time (--minutes)",
                              seconds=round(now - started, 1) if started else None)
                    queue.pop(0)
                    break
                if started is not None and now > started + suite.rows[i].limit_s + GRACE_S:
                    kill_worker(proc)
                    suite.set(i, status="timeout", seconds=round(now - started, 1),
                              note=f"killed at its limit of {suite.rows[i].limit_s} s "
                                   "(with its processes)")
                    queue.pop(0)
                    break
                if started is None and now > idle_since + WORKER_START_S:
                    kill_worker(proc)
                    suite.set(i, status="fail", note=f"its worker did not start it within "
                                                     f"{WORKER_START_S} s; logs/worker.log")
                    queue.pop(0)
                    break
                time.sleep(0.1)
            kill_worker(proc)
            suite.worker = None
        for i in queue:
            suite.set(i, status="not run", note="out of time (--minutes)")
    finally:
        log.close()


def get_args_parser():
    parser = cli.ArgumentParser(
        "minissl GPU suite", formatter_class=cli.HelpFormatter,
        description="Budget: ONE call of 9 minutes on a lent GPU (--minutes 9; the call allows "
                    "10). Every row runs with its own time limit in a worker process and is "
                    "written to --out as soon as it exists; nothing it started outlives it. See "
                    "the file's docstring for the sections and their estimated minutes.")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda: the real suite; cpu: tiny versions of every row.")
    parser.add_argument("--minutes", default=9.0, type=float,
                        help="Wall-clock budget of the whole run, a hard limit: the row running "
                             "when it is up is killed, the rows after it are 'not run'.")
    parser.add_argument("--out", default="runs/suite", type=str,
                        help="Where suite.md, suite.json and logs/ are written as the rows "
                             "finish (on a lent machine: a folder that is copied back).")
    parser.add_argument("--sections", default=None, nargs="+", choices=OPTIONAL_SECTIONS,
                        help="Only these sections, after the environment (default: all but "
                             "compiled).")
    parser.add_argument("--compiled", default=False, type=bool_flag,
                        help="Also the throughput rows with --compile true, last (minutes of "
                             "compilation each; on CPU the first tiny row only).")
    parser.add_argument("--row_limit", default=None, type=float,
                        help="Cap every row's time limit at this many seconds (default: the "
                             "per-row limits of ROW_LIMIT_S).")
    parser.add_argument("--tf32", default=True, type=bool_flag,
                        help="TF32 for fp32 matmuls and convolutions in the in-process rows, as "
                             "train_ssl.py's CUDA default (the fp32 device-vs-CPU and two-rank "
                             "comparisons always turn it off).")
    parser.add_argument("--data_pack", default="packs/cifar10.pack", type=str,
                        help="CIFAR-10 packed by tools/pack_imagefolder.py, relative to the "
                             "checkout; unpacked into runs/data/cifar10 once.")
    parser.add_argument("--data_path", default="", type=str,
                        help="A CIFAR-10 ImageFolder to use instead of the pack.")
    parser.add_argument("--tta_epochs", default=None, type=int,
                        help="Epochs of the time-to-accuracy run, i.e. its cosine schedule "
                             "(default: 12 on CUDA, 2 on CPU).")
    parser.add_argument("--tta_eval_every", default=None, type=int,
                        help="k-NN every this many epochs, and after the first and the last "
                             "(default: 4 on CUDA, 1 on CPU).")
    for name in ("--worker_rows", "--scratch", "--worker_deadline"):  # conductor -> worker
        parser.add_argument(name, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None):
    args = get_args_parser().parse_args(argv)
    args.argv = None if argv is None else list(argv)
    if args.minutes <= 0 or (args.row_limit is not None and args.row_limit <= 0):
        raise ValueError(f"--minutes {args.minutes} / --row_limit {args.row_limit} must be > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available; pass --device cpu for the "
                         "tiny CPU version")
    tiny = args.device == "cpu"
    args.tta_epochs = args.tta_epochs or (2 if tiny else 12)
    args.tta_eval_every = args.tta_eval_every or (1 if tiny else 4)
    args.out = str(Path(args.out).resolve())
    args.data_path = str(Path(args.data_path).resolve()) if args.data_path else ""
    if args.worker_deadline is not None:
        args.worker_deadline = float(args.worker_deadline)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.row_limit is not None:
        for kinds in ROW_LIMIT_S.values():
            for k in kinds:
                kinds[k] = min(kinds[k], args.row_limit)
    if args.worker_rows is not None:
        return worker_main(args)
    out = Path(args.out)
    for old in ("suite.json", "suite.md"):  # a run's --out holds that run's results only
        (out / old).unlink(missing_ok=True)
    shutil.rmtree(out / "logs", ignore_errors=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    os.environ[MARKER_ENV] = f"{os.getpid()}:{out}"  # inherited by every process it starts
    suite = Suite(args, plan(args))
    args.deadline = suite.deadline
    scratch = Path(tempfile.mkdtemp(prefix="minissl-suite-"))
    suite.meta["scratch"] = str(scratch)
    suite.write()  # every row listed, pending, before any runs

    def on_signal(signum, frame):
        raise Stop(signum)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in handled}
    stopped = None
    try:
        conduct(args, suite, scratch)
        suite.meta["state"] = "finished"
    except Stop as e:
        stopped = e.args[0]
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)  # the clean-up runs to its end
        kill_worker(getattr(suite, "worker", None))
        kill_marked()
        if stopped is not None:
            suite.meta["state"] = f"stopped by {signal.Signals(stopped).name}"
            for r in suite.results:
                if r["status"] in ("pending", "running"):
                    r.update(status="killed" if r["status"] == "running" else "not run",
                             note=f"the suite was stopped ({signal.Signals(stopped).name})")
        shutil.rmtree(scratch, ignore_errors=True)  # checkpoints, data copies, row files
        for ckpt in out.rglob("*.pth"):
            ckpt.unlink()
        suite.write()
        for s in handled:  # a second signal during the clean-up is dropped, not raised
            signal.signal(s, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
        for s, handler in previous.items():
            signal.signal(s, handler)
    failed = [r for r in suite.results if r["status"] in ("fail", "timeout")]
    left = [r for r in suite.results if r["status"] in ("killed", "not run")]
    print(f"suite: {len(suite.results)} rows, {len(failed)} failed or over their limit, "
          f"{len(left)} cut short by the budget, {time.time() - suite.start:.0f} s; "
          f"{out / 'suite.md'}", flush=True)
    if stopped is not None:
        return 128 + stopped
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
