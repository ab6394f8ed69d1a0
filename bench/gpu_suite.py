"""The whole GPU check in one command: environment, correctness of every method in every
precision, NCCL training and resume, throughput (step-only and end-to-end, eager and compiled,
MFU), the fast-by-default settings each measured off and on, and SimCLR time-to-accuracy with
the minutes left.

    python bench/gpu_suite.py --device cuda --minutes 9 --out runs/suite \
        --data_path /path/to/cifar10                                # on the GPU machine
    python bench/gpu_suite.py --device cpu --minutes 2 --out runs/suite_cpu   # tiny versions

Writes <out>/suite.md (the table to read) and <out>/suite.json, and prints every row as it is
done, in this order:
  environment       torch, CUDA, cuDNN, device, memory
  correctness       simclr and rotation on resnet18 and vit_tiny, dino and ibot on vit_tiny, dino
                    on resnet18, each in bf16, fp16 and fp32: ~20 steps of the real training step
                    on one fixed batch, loss finite and decreasing; then one fp32 step on the
                    device against the same step on the CPU (loss and gradient norm)
  distributed       `torchrun --nproc_per_node=1 train_ssl.py` (nccl on CUDA, gloo on CPU) for
                    one short epoch, then the same command resumes from its checkpoint
  throughput        SimCLR ResNet-18 32px, DINO and iBOT ViT-S/16 2x224 + 10x96, rotation ViT-S/16
                    160px: img/s of the step alone (bench/throughput.py) and end to end
                    (train_ssl.py's loader, tensor and pil backends, feeding the step), peak
                    memory, GFLOP per image and MFU, each eager and with --compile true
  settings          each fast default off and on: cudnn.benchmark, channels_last, fused
                    AdamW/SGD, DDP flags, the SDPA kernel, host-device syncs, pinned memory
  time-to-accuracy  SimCLR ResNet-18 on CIFAR-10 (bench/tta.py) in the background: k-NN top-1
                    against training wall time, with whatever minutes are left
On CPU (--device cpu) every row runs in a tiny version (tiny images, batches and step counts);
bf16/fp16 and CUDA-only settings are reported as such, never faked. tests/test_gpu_suite.py
runs it that way.

A GPU comes for runs of at most 10 minutes, so the suite is resumable: rows that passed are kept
in <out>/suite.json and skipped by the next run with the same --out, a row that does not fit in
the minutes left is marked "skipped (out of time)" and runs next time, and the time-to-accuracy
training goes on in the background between runs (<out>/tta; the next run shows its progress).
Keep --out inside the checkout (runs/ is git-ignored) so it survives between calls.

CIFAR-10 (an ImageFolder of JPEGs with train/ and test/) comes from --data_path, or from
--data_pack packs/cifar10 (default when it exists): one file instead of 60,000 small ones for a
machine that gets only the checkout, <pack>.json listing [relative path, offset, length] of every
file and <pack>.bin their bytes one after another, unpacked into runs/data/cifar10-jpeg once.
Without either, the CIFAR-10 rows are reported as skipped.
"""
import argparse
import contextlib
import datetime
import gc
import io
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_ssl  # noqa: E402
from bench import throughput, tta  # noqa: E402
from core import amp, cli  # noqa: E402
from core import dist as distu  # noqa: E402
from core.logger import bool_flag  # noqa: E402
from core.optim import build_optimizer, get_params_groups, lr_for_batch  # noqa: E402
from data import dataset_info  # noqa: E402
from methods import METHODS  # noqa: E402

SECTIONS = ("environment", "correctness", "distributed", "throughput", "settings",
            "time-to-accuracy")

# Dense peak tensor throughput in TFLOP/s per precision, from NVIDIA's data sheets (the sheets
# print the 2:4-sparse figures, twice these): H100/H200 SXM "H100 Tensor Core GPU" and "H200
# Tensor Core GPU" data sheets, A100 "A100 Tensor Core GPU" data sheet. fp32 means TF32 tensor
# cores, which train_ssl.py enables for fp32 matmuls and convolutions. First match wins.
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

# Seconds a row needs at least (a row is skipped, to run next time, when fewer are left).
# Measured on the 2-core CPU for the tiny rows; for CUDA, estimates (compiling a ViT-S step is
# the slow part). CPU_COMPILE_S: compiling the tiny SimCLR ResNet-18 step on that CPU.
CPU_COMPILE_S = 230
NEED_S = {"cuda": {"correctness": 20, "distributed": 90, "throughput": 60, "compiled": 240,
                   "settings": 30, "tta": 120},
          "cpu": {"correctness": 5, "distributed": 30, "throughput": 5,
                  "compiled": CPU_COMPILE_S + 60, "settings": 3, "tta": 20}}


# ============ the table ============

class Suite:
    """Rows in order, written to suite.json / suite.md after each one. Rows that passed in an
    earlier run with the same --out (and the same device) are kept instead of run again."""

    def __init__(self, out, device, minutes, redo=False):
        self.out, self.device = Path(out), device
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.deadline = self.start + 60 * minutes
        old = tta._read_json(self.out / "suite.json", {})
        self.previous = {} if redo or old.get("device") != device else \
            {(r["section"], r["name"]): r for r in old.get("rows", [])}
        # the table keeps the rows of earlier runs (e.g. of sections not run now) until replaced
        self.rows = {k: {**r, "kept": True} for k, r in self.previous.items()}
        self.meta = {"device": device, "command": " ".join(["python", "bench/gpu_suite.py",
                                                            *sys.argv[1:]])}

    def left(self):
        return self.deadline - time.time()

    def row(self, section, name, fn, need_s=0, cache=True):
        """Run fn() -> (status, values, note) as one row; status is pass, fail, info or n/a."""
        key = (section, name)
        old = self.previous.get(key)
        if cache and old is not None and old["status"] in ("pass", "info", "n/a"):
            return self._add({**old, "kept": True})
        if need_s and self.left() < need_s:
            return self._add(dict(section=section, name=name, status="skipped", values={},
                                  note=f"out of time ({max(self.left(), 0):.0f} s left, needs "
                                       f"~{need_s:.0f} s): run the suite again to continue"))
        t, cpu = time.time(), cpu_seconds()
        try:
            status, values, note = fn()
        except Exception as e:  # noqa: BLE001 - a failing row is a result, the suite goes on
            status, values, note = "fail", {}, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        except SystemExit as e:  # train_one_epoch stops on a non-finite loss
            status, values, note = "fail", {}, f"exited with {e.code}"
        row = dict(section=section, name=name, status=status, values=values, note=note,
                   seconds=round(time.time() - t, 1), cpu_s=round(cpu_seconds() - cpu, 1),
                   date=datetime.date.today().isoformat())
        if self.device == "cuda":  # the next row gets the memory of this one (and of a failure)
            gc.collect()
            torch.cuda.empty_cache()
        return self._add(row)

    def _add(self, row):
        self.rows[(row["section"], row["name"])] = row
        values = "  ".join(f"{k}={v}" for k, v in row["values"].items())
        kept = " (kept from an earlier run)" if row.get("kept") else ""
        print(f"[{row['section']}] {row['name']}: {row['status'].upper()}{kept}  {values}  "
              f"{row['note']}".rstrip(), flush=True)
        self.write()
        return row

    def write(self):
        rows = sorted(self.rows.values(), key=lambda r: SECTIONS.index(r["section"]))
        meta = {**self.meta, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "wall_s": round(time.time() - self.start, 1)}
        tta._write_json(self.out / "suite.json", {**meta, "rows": rows})
        lines = [f"# minissl GPU suite: {meta['device']}", "",
                 f"{meta['date']}, `{meta['command']}`, {meta['wall_s']} s", ""]
        for section in dict.fromkeys(r["section"] for r in rows):
            sec = [r for r in rows if r["section"] == section]
            cols = list(dict.fromkeys(k for r in sec for k in r["values"]))
            lines += [f"## {section}", "", "| row | status | " + " | ".join(cols) + " | note |",
                      "|---|---|" + "---|" * len(cols) + "---|"]
            for r in sec:
                cells = [str(r["values"].get(c, "")) for c in cols]
                lines.append(f"| {r['name']} | {r['status']} | " + " | ".join(cells)
                             + f" | {r['note']} |")
            lines.append("")
        (self.out / "suite.md").write_text("\n".join(lines))


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
    args.input_size = METHODS[args.method].input_size(args, info)
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
    with contextlib.redirect_stdout(io.StringIO()):
        train_ssl.train_one_epoch(ddp_model, model, [batch] * n, optimizer, lrs, wds,
                                  args.epochs - 1, scaler, args)


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

def environment(device):
    v = {"torch": torch.__version__, "python": platform.python_version(),
         "cpus": os.cpu_count()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        v.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=p.name,
                 memory_GB=round(p.total_memory / 2**30, 1),
                 capability=f"{p.major}.{p.minor}")
    else:
        v.update(cuda="none (CPU run)", cpu=platform.processor() or platform.machine())
    return "info", v, ""


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
    except SystemExit:  # train_one_epoch stops on a non-finite loss
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
        flags = dict(tf32=torch.backends.cuda.matmul.allow_tf32,
                     cudnn_tf32=torch.backends.cudnn.allow_tf32,
                     bench=torch.backends.cudnn.benchmark, det=torch.backends.cudnn.deterministic)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        try:
            a = step_loss_and_grad_norm(args, batch, torch.device("cuda", 0))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = flags["tf32"]
            torch.backends.cudnn.allow_tf32 = flags["cudnn_tf32"]
            torch.backends.cudnn.benchmark = flags["bench"]
            torch.backends.cudnn.deterministic = flags["det"]
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


# ============ distributed ============

def make_tiny_digits(root, n_train=256, n_test=128):
    """A digits subset as .npy (32px uint8): small enough for a 2-core CPU to train an epoch of."""
    from data import build_dataset

    for split, n in (("train", n_train), ("test", n_test)):
        ds = build_dataset("digits", "", split)
        (root / split).mkdir(parents=True, exist_ok=True)
        np.save(root / split / "images.npy", np.asarray(ds.images[:n], dtype=np.uint8))
        np.save(root / split / "labels.npy", np.asarray(ds.targets[:n], dtype=np.int64))
    return root


def distributed(device, out, data_flags, tiny):
    """torchrun with one process for one epoch, then the same command for a second: it must
    find the checkpoint and start at epoch 1."""
    import shutil

    run_dir = out / "distributed"
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = small_flags("dino", "vit_tiny", 16 if tiny else 32)
    flags[flags.index("--patch_size") + 1] = "4" if tiny else "8"
    flags += [*data_flags, "--batch_size_per_gpu", "32" if tiny else "128", "--warmup_epochs", "0",
              "--num_workers", "0" if tiny else "4", "--knn_eval", "false", "--tensorboard",
              "false", "--output_dir", str(run_dir), "--print_freq", "5"]
    flags += ["--cpu"] if device == "cpu" else []
    backend = "nccl" if device == "cuda" else "gloo"
    times, outputs = [], []
    for epochs in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "train_ssl.py", *flags, "--epochs", str(epochs)]
        t = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=tta.clean_env(), capture_output=True,
                              text=True, timeout=600)
        times.append(round(time.time() - t, 1))
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            return "fail", {"run_s": times}, f"run {epochs} exited {proc.returncode}: " + \
                " / ".join(tail)
        outputs.append(proc.stdout)
    ckpt = torch.load(run_dir / "checkpoint.pth", map_location="cpu", weights_only=True)
    checks = {f"{backend} init": f"rank 0/1, {backend}" in outputs[0],
              "epoch 0 trained": "Starting dino training from epoch 0!" in outputs[0],
              "resumed": f"Found checkpoint at {run_dir / 'checkpoint.pth'}" in outputs[1]
              and "Starting dino training from epoch 1!" in outputs[1],
              "checkpoint epoch 2": ckpt["epoch"] == 2}
    failed = [k for k, ok in checks.items() if not ok]
    values = {"run_s": times, "backend": backend}
    return ("fail" if failed else "pass"), values, \
        ("failed: " + ", ".join(failed)) if failed else "DINO ViT-Tiny, 1 epoch then resume"


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

        def to_device(obj, dev, fmt=fmt):  # train_ssl.to_device with the chosen layout
            if torch.is_tensor(obj):
                obj = obj.to(dev)
                return obj.contiguous(memory_format=fmt) if obj.ndim == 4 else obj
            if isinstance(obj, (list, tuple)):
                return type(obj)(to_device(o, dev) for o in obj)
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
    besides those made once per --print_freq steps by design: the logging (core/logger.py,
    check_finite) and the SVD of the effective-rank diagnostic (core/diagnostics.py)."""
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
                 and not (w.filename.endswith("train_ssl.py") and "check_finite" in
                          _function_at(w.filename, w.lineno))}
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


# ============ data ============

def unpack_tree(pack, dest):
    """Unpack a pack of a folder tree (<pack>.json: [relative path, offset, length],
    <pack>.bin: the bytes) into dest, once (dest/.complete marks a finished unpack)."""
    dest = Path(dest)
    if (dest / ".complete").exists():
        return dest
    entries = json.loads(Path(f"{pack}.json").read_text())
    with open(f"{pack}.bin", "rb") as blob:
        for rel, offset, length in entries:
            path = dest / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            blob.seek(offset)
            path.write_bytes(blob.read(length))
    (dest / ".complete").write_text(f"{len(entries)} files from {pack}\n")
    return dest


def cifar10_path(args):
    """The CIFAR-10 ImageFolder for the end-to-end rows and time-to-accuracy, or None."""
    if args.data_path:
        return Path(args.data_path)
    pack = args.data_pack or ("packs/cifar10" if (REPO / "packs/cifar10.json").exists() else "")
    if pack:
        return unpack_tree(REPO / pack if not os.path.isabs(pack) else pack,
                           REPO / "runs/data/cifar10-jpeg")
    return None


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


def time_to_accuracy(suite, device, data_path, args):
    run_dir = suite.out / "tta"
    recipe = tta_recipe(device, repo_relative(data_path), args.tta_epochs)
    state = tta.read_state(run_dir)
    margin = 15 if device == "cpu" else 30  # to write the table and stop cleanly
    status = state.get("status", "not started")
    if status not in ("done", "failed"):
        if suite.left() - margin < NEED_S[device]["tta"] and not tta.is_running(run_dir):
            status = "skipped: no minutes left (run the suite again with more --minutes)"
        else:
            status = tta.start(run_dir, recipe, eval_every=args.tta_eval_every,
                               eval_workers=0 if device == "cpu" else 8)
            shown = 0
            while status == "running" and suite.left() > margin:
                progress = tta.read_progress(run_dir)
                for p in progress[shown:]:
                    print(f"[time-to-accuracy] epoch {p['epoch']}: train {p['train_s']} s, "
                          f"k-NN top-1 {p['knn_top1']}", flush=True)
                shown = len(progress)
                time.sleep(1 if device == "cpu" else 5)
                status = tta.read_state(run_dir).get("status", status)
                if status == "running" and not tta.is_running(run_dir):
                    status = tta.read_state(run_dir).get("status", "failed")
                    status = "failed" if status == "running" else status
            if status == "running" and not args.tta_keep_running:
                tta.stop(run_dir)
                status = "stopped"
    state = tta.read_state(run_dir)
    progress = tta.read_progress(run_dir)
    for p in progress:
        suite.row("time-to-accuracy", f"epoch {p['epoch']}", lambda p=p: (
            "info", {"train_s": p["train_s"], "knn_top1": p["knn_top1"],
                     "knn_top5": p["knn_top5"], "session": p["session"]}, ""), cache=False)
    last = progress[-1]["knn_top1"] if progress else None
    values = {"epochs_done": state.get("epoch", 0), "epochs": args.tta_epochs,
              "state": status, "knn_top1_last": last}
    note = "python train_ssl.py " + " ".join(recipe)
    if status == "running":
        note = f"still training in the background (pid {state.get('pid')}); the next suite run " \
               f"with --out {suite.out} picks it up. " + note
    row_status = "fail" if status == "failed" else "skipped" if status.startswith("skipped") \
        else "info"
    suite.row("time-to-accuracy", "run", lambda: (row_status, values, note), cache=False)


# ============ main ============

def get_args_parser():
    parser = cli.ArgumentParser("minissl GPU suite", formatter_class=cli.HelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda: the real suite; cpu: tiny versions of every row.")
    parser.add_argument("--minutes", default=9.0, type=float,
                        help="Wall-clock budget of this run; rows that do not fit are left for "
                             "the next run, time-to-accuracy gets what is left.")
    parser.add_argument("--out", default="runs/suite", type=str,
                        help="suite.md, suite.json, the time-to-accuracy run (tta/); keep it to "
                             "continue in a later run.")
    parser.add_argument("--redo", default=False, type=bool_flag,
                        help="Run every row again instead of keeping those that passed.")
    parser.add_argument("--sections", default=None, nargs="+",
                        choices=["correctness", "distributed", "throughput", "settings", "tta"],
                        help="Only these sections (default: all).")
    parser.add_argument("--cpu_compile", default=False, type=bool_flag,
                        help="With --device cpu: also run the compiled version of the first "
                             "tiny throughput row (minutes of compilation on a small CPU).")
    parser.add_argument("--data_pack", default="", type=str,
                        help="A pack of the CIFAR-10 ImageFolder: <pack>.json lists [relative path, "
                             "offset, length] per file, <pack>.bin holds the bytes "
                             "(packs/cifar10 when it exists).")
    parser.add_argument("--data_path", default="", type=str,
                        help="A CIFAR-10 ImageFolder to use instead of the pack.")
    parser.add_argument("--tta_epochs", default=None, type=int,
                        help="Epochs of the time-to-accuracy run, i.e. its cosine schedule "
                             "(default: 40 on CUDA, 2 on CPU).")
    parser.add_argument("--tta_eval_every", default=None, type=int,
                        help="k-NN every this many epochs (default: 4 on CUDA, 1 on CPU).")
    parser.add_argument("--tta_keep_running", default=None, type=bool_flag,
                        help="Leave the time-to-accuracy training running when the minutes are "
                             "up (default: true on CUDA, false on CPU).")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available; pass --device cpu for the "
                         "tiny CPU version")
    tiny = device == "cpu"
    args.tta_epochs = args.tta_epochs or (2 if tiny else 40)
    args.tta_eval_every = args.tta_eval_every or (1 if tiny else 4)
    if args.tta_keep_running is None:
        args.tta_keep_running = not tiny
    sections = set(args.sections or ["correctness", "distributed", "throughput", "settings",
                                     "tta"])
    suite = Suite(Path(args.out).resolve(), device, args.minutes, redo=args.redo)
    need = NEED_S[device]
    os.chdir(REPO)

    # one process group for the whole suite, as train_ssl.py builds one for a single process
    with contextlib.redirect_stdout(io.StringIO()):
        distu.init_distributed_mode(argparse.Namespace(cpu=tiny, dist_url="env://"))
    torch.backends.cudnn.benchmark = True  # train_ssl.py's settings
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # the background time-to-accuracy run would share the device with the measurements
    if tta.is_running(suite.out / "tta") and sections - {"tta"}:
        tta.stop(suite.out / "tta")
        print("[time-to-accuracy] paused the background training while measuring", flush=True)

    suite.row("environment", "versions", lambda: environment(device), cache=False)

    if tiny:
        data_dir = make_tiny_digits(suite.out / "data" / "digits-subset")
        data_flags = ["--dataset", "npy", "--data_path", str(data_dir)]
        cifar = None
    else:
        cifar = cifar10_path(args)
        data_flags = ["--dataset", "imagefolder", "--data_path", str(cifar)] if cifar else \
            ["--dataset", "digits"]

    if "correctness" in sections:
        for method, arch in CORRECTNESS:
            for precision in ("bf16", "fp16", "fp32"):
                suite.row("correctness", f"{method} {arch} {precision}",
                          lambda m=method, a=arch, p=precision:
                          correctness_losses(m, a, p, device, tiny), need["correctness"])
        for i, (method, arch) in enumerate(CORRECTNESS):
            name = f"{method} {arch} fp32 step, {device} vs cpu"
            if tiny and i > 0:  # a 2-thread step costs a loaded 2-core CPU seconds; one is enough
                suite.row("correctness", name, lambda: (
                    "n/a", {}, "CPU: the first row compares thread counts for all"))
                continue
            suite.row("correctness", name,
                      lambda m=method, a=arch: device_vs_cpu(m, a, device, tiny),
                      need["correctness"])

    if "distributed" in sections:
        # tiny: 64 images, 2 steps of 32 per epoch
        flags = ["--dataset", "npy", "--data_path", str(make_tiny_digits(
            suite.out / "data" / "digits-64", n_train=64, n_test=32))] if tiny \
            else ["--dataset", "digits"]
        suite.row("distributed", "torchrun --nproc_per_node=1, then resume",
                  lambda: distributed(device, suite.out, flags, tiny), need["distributed"])

    if "throughput" in sections:
        flops = {}
        for compiled in (False, True):  # every eager row first: they fit in a short run
            for label, flags, batches in THROUGHPUT[device]:
                for batch_size in batches:
                    name = f"{label}, batch {batch_size}, {'compiled' if compiled else 'eager'}"
                    if compiled and tiny and (label != THROUGHPUT["cpu"][0][0]
                                              or not args.cpu_compile):
                        note = "CPU: only the first tiny row is compiled" \
                            if label != THROUGHPUT["cpu"][0][0] else \
                            f"compiling takes ~{CPU_COMPILE_S} s on a 2-core CPU (measured); " \
                            "--cpu_compile true runs it"
                        suite.row("throughput", name, lambda note=note: ("n/a", {}, note))
                        continue
                    suite.row("throughput", name,
                              lambda lb=label, f=flags, b=batch_size, c=compiled:
                              throughput_row(lb, f, b, c, device, tiny, data_flags, flops),
                              need["compiled" if compiled else "throughput"])

    if "settings" in sections:
        for name, fn in (("cudnn.benchmark", setting_cudnn_benchmark),
                         ("channels_last (ResNet)", setting_channels_last),
                         ("fused AdamW", lambda d, t: setting_fused_optimizer(d, t, "adamw")),
                         ("fused SGD", lambda d, t: setting_fused_optimizer(d, t, "sgd")),
                         ("DDP buffer sync / gradient_as_bucket_view", setting_ddp),
                         ("SDPA attention kernel", setting_sdpa),
                         ("host-device syncs in the step", setting_host_sync),
                         ("pinned memory", setting_pinned)):
            cuda_only = fn in (setting_cudnn_benchmark, setting_host_sync, setting_pinned)
            suite.row("settings", name, lambda fn=fn: fn(device, tiny),
                      0 if tiny and cuda_only else need["settings"])  # n/a takes no time

    if "tta" in sections:
        if tiny:
            time_to_accuracy(suite, device, data_dir, args)
        elif cifar is None:
            suite.row("time-to-accuracy", "run", lambda: (
                "skipped", {}, "no CIFAR-10: pass --data_pack or --data_path"), cache=False)
        else:
            time_to_accuracy(suite, device, cifar, args)

    distu.cleanup()
    failed = [r for r in suite.rows.values() if r["status"] == "fail"]
    print(f"suite: {len(suite.rows)} rows, {len(failed)} failed, "
          f"{time.time() - suite.start:.0f} s; {suite.out / 'suite.md'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
