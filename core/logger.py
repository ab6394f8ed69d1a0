"""Progress logging in the spirit of DINO's MetricLogger, without a device sync per step:
metrics arrive as tensors, are summed on the device, and are copied to the host only when a
line is printed: every `print_freq` iterations, and in between whenever waiting for the next one
would leave the user `print_secs` without news (slow CPU runs); and at the end of the epoch,
all-reduced over ranks. Reading the clock costs no device sync."""
import argparse
import datetime
import json
import os
import time

import torch
import torch.distributed as dist

from core.dist import get_world_size


def bool_flag(s):
    """Parse 'true/false' style flags, as DINO's utils.bool_flag."""
    if s.lower() in {"off", "false", "0", "no"}:
        return False
    if s.lower() in {"on", "true", "1", "yes"}:
        return True
    raise argparse.ArgumentTypeError("invalid value for a boolean flag (use true or false)")


def _stack(tensors):
    """One 1-D tensor of 0-d tensors that may live on the host (floats given to update, e.g. the
    lr) and on the device (losses): stacked on the device, where all_reduce needs them."""
    device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
    return torch.stack([t.to(device) for t in tensors])


class MetricLogger:
    """Accumulates per-step scalars; `log_every` yields the batches and prints
    'epoch [it/n] eta it/s img/s metric: last (avg) ... max mem' every print_freq steps, and
    also before a step that would end more than print_secs (None: never) after the last line."""

    def __init__(self, header="", print_freq=10, batch_size=None, print_secs=10.0,
                 on_print=None):
        self.header, self.print_freq, self.batch_size = header, print_freq, batch_size
        self.print_secs = print_secs
        self.on_print = on_print  # on_print(i, {name: this step's value}) at each printed line
        self.sums, self.last, self.count = {}, {}, 0

    def update(self, **metrics):
        """metrics: name -> 0-d tensor (kept on device) or float."""
        for k, v in metrics.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            self.last[k] = v
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def state_dict(self):
        """The running sums and count on the host (for a mid-epoch checkpoint)."""
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()}, "count": self.count}

    def load_state_dict(self, state, device=None):
        self.sums = {k: v.to(device) if device is not None else v for k, v in state["sums"].items()}
        self.last = dict(self.sums)
        self.count = state["count"]

    def _fmt(self, i):
        if not self.sums:
            return ""
        keys = list(self.sums)
        host = _stack([self.last[k] for k in keys] + [self.sums[k] for k in keys]).tolist()  # one sync
        n = len(keys)
        if self.on_print is not None:  # the values are on the host now: no extra sync
            self.on_print(i, dict(zip(keys, host[:n])))
        return "  ".join(f"{k}: {host[i]:.4g} ({host[n + i] / max(self.count, 1):.4g})"
                         for i, k in enumerate(keys))

    def log_every(self, iterable, n=None, start_iter=0):
        """Yields the items of `iterable`, numbered from start_iter (a resumed epoch) of n."""
        n = len(iterable) if n is None else n
        start = end = last_line = time.time()
        data_time = 0.0
        for i, obj in enumerate(iterable, start=start_iter):
            data_time += time.time() - end
            yield obj
            now = time.time()
            # the next line would come after one more step of the last one's length, or later
            late = self.print_secs is not None and 2 * now - end - last_line >= self.print_secs
            if i % self.print_freq == 0 or i == n - 1 or late:
                last_line = now
                elapsed = time.time() - start
                its = (i + 1 - start_iter) / max(elapsed, 1e-9)
                eta = datetime.timedelta(seconds=int((n - i - 1) / its))
                mem = ""
                if torch.cuda.is_available():
                    mem = f"  max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB"
                imgs = ""
                if self.batch_size:
                    imgs = f"  img/s: {its * self.batch_size * get_world_size():.1f}"
                print(f"{self.header} [{i}/{n}]  eta: {eta}  it/s: {its:.2f}{imgs}  "
                      f"data: {data_time / (i + 1 - start_iter):.3f}s  {self._fmt(i)}{mem}", flush=True)
            end = time.time()
        self.total_time = time.time() - start

    def global_averages(self):
        """Epoch averages, all-reduced over ranks (one sync per epoch)."""
        if not self.sums:
            return {}
        keys = list(self.sums)
        t = _stack([self.sums[k] for k in keys]) / max(self.count, 1)
        if get_world_size() > 1:
            dist.all_reduce(t)
            t /= get_world_size()
        return dict(zip(keys, t.tolist()))


class StepLog:
    """The per-step curves of a run: each line a MetricLogger prints also goes to TensorBoard
    (`writer`, tag prefix/<name>, the global step on the x-axis) and, as one JSON line, to
    <output_dir>/log_steps.txt (core/curves.py plots it under the per-epoch averages of
    log.txt). Rank 0 only; the values arrive on the host, so this adds no device sync.

        steps = StepLog(args.output_dir, writer, prefix="train")
        MetricLogger(..., on_print=steps.for_epoch(epoch, niter))"""

    FILE = "log_steps.txt"

    def __init__(self, output_dir, writer=None, prefix="train", main_process=True):
        self.path = os.path.join(output_dir, self.FILE) if main_process else None
        self.writer, self.prefix = writer, prefix

    def for_epoch(self, epoch, niter):
        """The on_print callback of one epoch of niter steps (epoch counted from 0)."""
        def log(i, values):
            self.log(epoch, i, niter, values)
        return log if self.path is not None else None

    def log(self, epoch, i, niter, values):
        step = epoch * niter + i
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "iter": i, "niter": niter, "step": step,
                                **{f"{self.prefix}_{k}": v for k, v in values.items()}}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{self.prefix}/{k}", v, step)
