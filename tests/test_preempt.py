"""Preemption (issue 10): a run killed at any moment and started again with the same command
ends with exactly the weights of an uninterrupted run.

- DINO on digits, one process: a SIGTERM (exit 0, resumable), a SIGKILL during a checkpoint
  write and a SIGKILL at a random moment, each time restarted with the same command; the
  final student, teacher and centre equal those of an uninterrupted run bit for bit, and so do
  the epochs' lines of log.txt. Then a truncated checkpoint.pth: one line and exit code 2 naming the
  snapshot to resume from, and --resume_from that snapshot ends at the same weights again.
- SimCLR with 2 gloo ranks: a SIGKILL of both, then SIGUSR1 to one rank only under a fake
  SLURM (the ranks agree, rank 0 saves and calls `scontrol requeue`, both exit 0).
- eval_linear.py and finetune.py stopped mid-epoch by a SIGTERM resume to the same weights.
- The pieces: load_resume's rules, stale temporary files, the signal flag and the requeue.

Every start is a fork of this test process running train_ssl.py's entry point (core.cli.run
around parse_args and train_ssl) with the same argv, so that a restart costs no interpreter
start and torch import (seconds each on a busy 2-core machine); the process is killed as any
other. Runs are tiny (32 or 48 digits at 16px, vit_nano/8, 2 epochs of 4 or 6 steps),
OMP_NUM_THREADS 1 and num_workers 0.
"""
import glob
import json
import multiprocessing as mp
import os
import random
import re
import signal
import socket
import sys
import time
from pathlib import Path

import matplotlib.backends.backend_agg  # noqa: F401 - for curves.png, inherited by every start
import matplotlib.figure  # noqa: F401
import matplotlib.ticker  # noqa: F401
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import eval_linear
import finetune
import train_ssl  # imported once here: every forked start inherits it
from core import amp, cli, preempt
from core.checkpoint import load_resume, remove_stale_tmp, save_atomic
from test_errors import start_lock_holder

STARTED = []  # every process a test started, killed at its end if a failure left it running


@pytest.fixture(autouse=True)
def no_orphans():
    yield
    for p in STARTED:
        if p.exitcode is None:
            p.kill()
            p.join()
    STARTED.clear()


def make_digits(root, n_train=48, n_test=16, size=16):
    """scikit-learn's 8x8 digits, upscaled to size x size RGB, as an npy dataset."""
    d = load_digits()
    images = np.kron((d.images / 16 * 255).astype(np.uint8), np.ones((size // 8, size // 8), np.uint8))
    images = np.repeat(images[..., None], 3, axis=3)
    for split, part in (("train", slice(0, n_train)), ("test", slice(n_train, n_train + n_test))):
        (root / split).mkdir(parents=True)
        np.save(root / split / "images.npy", images[part])
        np.save(root / split / "labels.npy", d.target[part])
    return root


# ============ starting and killing runs ============

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(argv, log, env):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    os.environ.update(env)
    out = open(log, "a", buffering=1)
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.stdout = sys.stderr = out
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP thread pool
    cli.run(lambda: train_ssl.train_ssl(train_ssl.parse_args(argv)))


class Run:
    """One start of a command: a process per rank (joined by gloo as torchrun would), each
    logging to <log>.rank<r>."""

    def __init__(self, argv, log, world_size=1, env=None):
        port = str(_free_port())
        self.logs = [Path(f"{log}.rank{r}") for r in range(world_size)]
        self.procs = []
        for r in range(world_size):
            e = dict(env or {})
            if world_size > 1:
                e.update(RANK=str(r), WORLD_SIZE=str(world_size), LOCAL_RANK=str(r),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            p = mp.get_context("fork").Process(target=_child, args=(argv, self.logs[r], e))
            p.start()
            self.procs.append(p)
            STARTED.append(p)

    def text(self, rank=0):
        return self.logs[rank].read_text() if self.logs[rank].exists() else ""

    def alive(self):
        return any(p.exitcode is None for p in self.procs)

    def wait_for(self, pred, timeout=120):
        """Poll until pred() or every process ended; True if pred() held."""
        end = time.time() + timeout
        while time.time() < end:
            if pred():
                return True
            if not self.alive():
                return pred()
            time.sleep(0.005)
        raise AssertionError(f"timed out; log:\n{self.text()[-3000:]}")

    def kill(self, sig=signal.SIGKILL, ranks=None):
        """Send `sig`; True if every targeted process was still running."""
        hit = True
        for r in ranks if ranks is not None else range(len(self.procs)):
            p = self.procs[r]
            if p.exitcode is None:
                os.kill(p.pid, sig)
            else:
                hit = False
        return hit

    def join(self, timeout=300):
        for p in self.procs:
            p.join(timeout)
            assert p.exitcode is not None, f"still running; log:\n{self.text()[-3000:]}"
        return [p.exitcode for p in self.procs]

    def finish(self):
        codes = self.join()
        assert codes == [0] * len(codes), f"exit codes {codes}; log:\n{self.text()[-3000:]}"


def tmp_files(out):
    return glob.glob(str(out / "*.tmp.*"))


def weights(out, keys):
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    return {f"{k}.{name}": v for k in keys for name, v in ckpt[k].items()}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def log_lines(out):
    return {json.loads(line)["epoch"]: line for line in (out / "log.txt").read_text().splitlines()}


# ============ DINO, one process: SIGKILL, SIGTERM, kills during writes, a bad checkpoint ============

def dino_argv(data, out):
    return ["--method", "dino", "--arch", "vit_nano", "--patch_size", "8",
            "--global_crops_size", "16", "--local_crops_size", "8", "--local_crops_number", "2",
            "--out_dim", "64", "--dataset", "npy", "--data_path", str(data), "--data_backend", "tensor",
            "--batch_size_per_gpu", "8", "--epochs", "2", "--warmup_epochs", "1", "--lr", "0.01",
            "--num_workers", "0", "--tensorboard", "false", "--knn_eval", "false",
            "--print_freq", "1", "--checkpoint_every_iters", "3", "--output_dir", str(out)]


DINO_KEYS = ("student", "teacher", "dino_loss")


STEP = re.compile(r"^Epoch: \[(\d+)/\d+\] \[(\d+)/(\d+)\]", re.M)


def steps_done(text):
    """Global steps this start has finished, from its progress lines (print_freq 1)."""
    found = STEP.findall(text)
    return max((int(e) * int(n) + int(i) + 1 for e, i, n in found), default=0)


def test_dino_killed_at_random_moments_ends_with_the_uninterrupted_weights(tmp_path):
    data = make_digits(tmp_path / "data", n_train=32)  # 2 epochs of 4 steps
    # uninterrupted, with a snapshot of epoch 1 for the bad-checkpoint case below
    reference = Run(dino_argv(data, tmp_path / "ref") + ["--saveckp_freq", "1"], tmp_path / "ref")
    reference.finish()

    out = tmp_path / "chaos"
    argv = dino_argv(data, out)
    rng = random.Random(0)
    kills = in_write = 0
    # (signal, moment), in this order:
    # - SIGTERM, the scheduler's polite request, right after the first step of a fresh start:
    #   the run finishes its step, saves mid-epoch (epoch 0, iteration 1 or 2) and exits 0;
    # - SIGKILL while a checkpoint is being written (held open 0.5 s by a test-only pause in
    #   save_atomic), in a start that resumed mid-epoch from there;
    # - SIGKILL at a random moment: after a random number of this start's steps (at least 2
    #   steps left) plus a random fraction of a step; this start first removes the killed
    #   write's file.
    plan = [("SIGTERM", "step"), ("SIGKILL", "write"), ("SIGKILL", "random")]
    for n, (sig, moment) in enumerate(plan):
        env = {"MINISSL_TEST_SAVE_PAUSE": "0.5"} if moment == "write" else {}
        run = Run(argv, tmp_path / f"chaos{n}", env=env)
        run.wait_for(lambda: "training from epoch" in run.text())
        start = re.search(r"training from epoch (\d+)(?:, iteration (\d+))?!", run.text())
        done = int(start[1]) * 4 + int(start[2] or 0)  # steps before this start
        if moment == "write":
            if not run.wait_for(lambda: tmp_files(out)):
                continue  # it ended without writing: nothing to kill
        elif moment == "step":
            run.wait_for(lambda: steps_done(run.text()) > done)
        else:
            target = done + rng.randint(1, max(1, 6 - done))  # at least 2 of the 8 steps left
            run.wait_for(lambda: steps_done(run.text()) >= target)
            time.sleep(rng.uniform(0.0, 0.05))
        if sig == "SIGTERM":
            assert run.kill(signal.SIGTERM), "the run ended before the signal"
            run.finish()  # exit code 0
            assert "Stopped by SIGTERM" in run.text(), run.text()[-2000:]
            ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
            assert ckpt["epoch"] * 4 + ckpt["iteration"] > done  # saved where it stopped
            continue
        if run.kill():
            kills += 1
            in_write += moment == "write"
            run.join()
            assert moment != "write" or tmp_files(out)  # the killed write's file stays ...
    last = Run(argv, tmp_path / "chaos_last")
    last.finish()
    text = "".join(Path(p).read_text() for p in sorted(glob.glob(str(tmp_path / "chaos*.rank0"))))
    assert "Removed 1 unfinished checkpoint write" in text  # ... until the next start
    assert not tmp_files(out)
    assert kills >= 2 and in_write >= 1, (kills, in_write)
    assert re.search(r"training from epoch \d+, iteration \d+!", text), "no mid-epoch resume"

    ref, got = weights(tmp_path / "ref", DINO_KEYS), weights(out, DINO_KEYS)
    assert all(torch.equal(ref[k], got[k]) for k in ref), max_diff(ref, got)
    # the epochs' logged averages too (running sums are checkpointed); a line can only be
    # missing, if a kill fell between the epoch's checkpoint and its log line
    ref_lines = log_lines(tmp_path / "ref")
    assert all(line == ref_lines[e] for e, line in log_lines(out).items())
    print(f"DINO chaos: {kills} SIGKILLs ({in_write} during a write) + 1 SIGTERM, largest weight "
          f"difference {max_diff(ref, got)}")

    # ============ a truncated checkpoint.pth: one line, exit 2, never a silent fallback ============
    bad = tmp_path / "bad"
    bad.mkdir()
    snapshot = bad / "checkpoint0001.pth"
    snapshot.write_bytes((tmp_path / "ref" / "checkpoint0001.pth").read_bytes())
    whole = (tmp_path / "ref" / "checkpoint.pth").read_bytes()
    (bad / "checkpoint.pth").write_bytes(whole[:len(whole) // 2])
    run = Run(dino_argv(data, bad), tmp_path / "bad0")
    assert run.join() == [2]
    errors = [line for line in run.text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in run.text(), run.text()[-3000:]
    for words in (str(bad / "checkpoint.pth"), "complete PyTorch", f"--resume_from {snapshot}"):
        assert words in errors[0], errors[0]
    assert errors[0].rstrip().endswith("start over")  # a whole sentence, not cut
    # the user asks for the snapshot: epoch 1 again, to the same weights
    argv = dino_argv(data, bad) + ["--resume_from", str(snapshot)]
    run = Run(argv, tmp_path / "bad1")
    run.finish()
    assert "cannot be read" in run.text() and "training from epoch 1!" in run.text()
    assert all(torch.equal(ref[k], v) for k, v in weights(bad, DINO_KEYS).items())
    # (the same command again continues its own checkpoint.pth: test_load_resume_...)


# ============ SimCLR, 2 gloo ranks: SIGKILL, then SIGUSR1 to one rank under a fake SLURM ============

def simclr_argv(data, out):
    return ["--method", "simclr", "--arch", "vit_nano", "--patch_size", "8", "--crop_size", "16",
            "--proj_hidden_dim", "64", "--dataset", "npy", "--data_path", str(data),
            "--data_backend", "pil", "--batch_size_per_gpu", "4", "--epochs", "2", "--warmup_epochs", "1",
            "--num_workers", "0", "--tensorboard", "false", "--knn_eval", "false",
            "--print_freq", "2", "--checkpoint_every_iters", "3", "--output_dir", str(out)]


def test_simclr_two_ranks_killed_and_requeued_ends_with_the_same_weights(tmp_path):
    data = make_digits(tmp_path / "data")
    reference = Run(simclr_argv(data, tmp_path / "ref"), tmp_path / "ref", world_size=2)
    reference.finish()

    out = tmp_path / "chaos"
    argv = simclr_argv(data, out)
    run = Run(argv, tmp_path / "kill", world_size=2)
    run.wait_for(lambda: "Epoch: [0/2] [4/6]" in run.text())  # after the checkpoint of step 3
    time.sleep(random.Random(1).uniform(0.0, 0.2))
    assert run.kill(), "the run ended before the kill"
    run.join()

    # SIGUSR1, as `#SBATCH --signal=USR1@120` sends before the time limit, to rank 1 only:
    # rank 0 learns it at the next agreement, saves, and requeues through scontrol
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol.txt"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {record}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = Run(argv, tmp_path / "usr1", world_size=2, env=env)
    run.wait_for(lambda: "Epoch: [" in run.text(0))  # (rank 1 prints nothing)
    assert run.kill(signal.SIGUSR1, ranks=[1])
    run.finish()
    assert "Stopped by SIGUSR1 on another rank" in run.text(0), run.text(0)[-2000:]
    assert record.read_text().split() == ["requeue", "4242"]  # rank 0 only, once

    last = Run(argv, tmp_path / "last", world_size=2)
    last.finish()
    assert "training from epoch" in last.text() and not tmp_files(out)
    ref, got = weights(tmp_path / "ref", ["model"]), weights(out, ["model"])
    diff = max_diff(ref, got)
    assert diff <= 1e-6, diff  # fp32 rounding at most; exact in practice
    print(f"SimCLR 2 ranks: 1 SIGKILL + 1 SIGUSR1, largest weight difference {diff}")


# ============ the tensor backend streaming an ImageFolder: SIGTERM, resume ============

def test_streamed_image_folder_resumes_exactly(tmp_path):
    """data/loaders.py's StreamingLoader (an ImageFolder above --data_memory_gb), with a
    DataLoader worker reading the files: the batches left in the epoch, the same views (seeded
    per batch, so workers do not matter), and no draw from torch's generator at another step
    than in an uninterrupted run (stochastic depth reads that stream)."""
    from PIL import Image
    digits = load_digits()
    for split, part in (("train", range(32)), ("test", range(32, 40))):
        for i in part:
            folder = tmp_path / "data" / split / str(digits.target[i] % 2)
            folder.mkdir(parents=True, exist_ok=True)
            img = (digits.images[i] / 16 * 255).astype(np.uint8)
            Image.fromarray(np.kron(img, np.ones((2, 2), np.uint8))).convert("RGB").save(folder / f"{i}.png")

    def argv(out):
        return ["--method", "simclr", "--arch", "vit_nano", "--patch_size", "8", "--crop_size", "16",
                "--proj_hidden_dim", "64", "--drop_path_rate", "0.1", "--dataset", "imagefolder",
                "--data_path", str(tmp_path / "data"), "--data_backend", "tensor",
                "--data_memory_gb", "0", "--batch_size_per_gpu", "8", "--epochs", "2",
                "--warmup_epochs", "1", "--num_workers", "1", "--tensorboard", "false",
                "--knn_eval", "false", "--print_freq", "1", "--output_dir", str(out)]
    reference = Run(argv(tmp_path / "ref"), tmp_path / "ref")
    reference.finish()
    assert "JPEG bytes read" in reference.text()  # the streaming path
    run = Run(argv(tmp_path / "run"), tmp_path / "run")
    run.wait_for(lambda: "Epoch: [1/2] [0/4]" in run.text())
    assert run.kill(signal.SIGTERM)
    run.finish()
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and 0 < ckpt["iteration"] < 4, (ckpt["epoch"], ckpt["iteration"])
    Run(argv(tmp_path / "run"), tmp_path / "resumed").finish()
    ref, got = weights(tmp_path / "ref", ["model"]), weights(tmp_path / "run", ["model"])
    assert all(torch.equal(ref[k], got[k]) for k in ref), max_diff(ref, got)


# ============ eval_linear.py and finetune.py: stopped mid-epoch, resumed to the same weights ============

def _sigterm_at_step(monkeypatch, module, attr, step):
    """Make the `step`-th call of module.attr send this process a SIGTERM (in the step: the
    loop finishes that step, saves, and stops)."""
    calls = {"n": 0}
    original = getattr(module, attr)

    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*a, **k)
    monkeypatch.setattr(module, attr, wrapped)


@pytest.mark.parametrize("script", ["eval_linear", "finetune"])
def test_eval_scripts_stop_on_sigterm_and_resume_mid_epoch(script, tmp_path, monkeypatch, capsys):
    make_digits(tmp_path / "data", n_train=64)
    flags = ["--arch", "vit_nano", "--patch_size", "8", "--image_size", "16", "--dataset", "npy",
             "--data_path", str(tmp_path / "data"), "--num_workers", "0", "--epochs", "2",
             "--batch_size_per_gpu", "16", "--tensorboard", "false", "--print_freq", "1",
             "--checkpoint_every_iters", "3", "--val_split", "16"]  # 48 train images: 3 steps
    if script == "eval_linear":
        parse, run = eval_linear.get_args_parser, eval_linear.run_linear
        flags += ["--n_last_blocks", "1"]
    else:
        parse, run = finetune.get_args_parser, finetune.run_finetune
        flags += ["--warmup_epochs", "1", "--save_predictions", "0",
                  "--drop_path", "0.1"]

    def args(out):
        a = parse().parse_args(flags + ["--output_dir", str(out)])
        a.rank, a.world_size, a.gpu, a.distributed = 0, 1, 0, False
        a.device = torch.device("cpu")
        return a

    def state(out):
        ckpt = torch.load(out / ("checkpoint.pth.tar" if script == "eval_linear" else "checkpoint.pth"),
                          weights_only=True)
        return ckpt["state_dict" if script == "eval_linear" else "model"], ckpt

    handler = signal.getsignal(signal.SIGTERM)
    assert run(args(tmp_path / "ref")) is not None
    with monkeypatch.context() as m:
        _sigterm_at_step(m, amp, "backward_step", 5)  # step 5 of 6 (epochs of 3 steps)
        assert run(args(tmp_path / "run")) is None  # stopped
    assert "Stopped by SIGTERM after iteration 4" in capsys.readouterr().out
    _, ckpt = state(tmp_path / "run")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 2)
    assert run(args(tmp_path / "run")) is not None
    assert "resuming from epoch 1, iteration 2" in capsys.readouterr().out
    ref, got = state(tmp_path / "ref")[0], state(tmp_path / "run")[0]
    assert all(torch.equal(ref[k], got[k]) for k in ref), max_diff(ref, got)
    assert signal.getsignal(signal.SIGTERM) == handler  # put back


# ============ the pieces ============

def test_load_resume_never_falls_back_silently(tmp_path, capsys):
    own = tmp_path / "checkpoint.pth"
    assert load_resume(str(own)) == (None, None)  # a fresh run
    save_atomic({"epoch": 1, "args": {}}, str(tmp_path / "checkpoint0001.pth"))
    save_atomic({"epoch": 3, "args": {}}, str(tmp_path / "checkpoint0003.pth"))
    (tmp_path / "checkpoint0004.pth").write_bytes(b"half a file")  # not a zip: skipped
    save_atomic({"epoch": 4, "args": {}}, str(own))
    assert load_resume(str(own))[1]["epoch"] == 4
    own.write_bytes(own.read_bytes()[:40])
    with pytest.raises(ValueError) as e:
        load_resume(str(own))
    msg = str(e.value)
    assert "\n" not in msg and str(own) in msg and "complete PyTorch .pth file" in msg
    assert f"--resume_from {tmp_path / 'checkpoint0003.pth'}" in msg
    # asked for: the snapshot, said so in one line
    snap = str(tmp_path / "checkpoint0003.pth")
    path, ckpt = load_resume(str(own), snap)
    assert (path, ckpt["epoch"]) == (snap, 3) and "cannot be read" in capsys.readouterr().out
    # a readable checkpoint.pth written before --resume_from was given: the snapshot wins ...
    save_atomic({"epoch": 5, "args": {"resume_from": ""}}, str(own))
    assert load_resume(str(own), snap)[1]["epoch"] == 3
    # ... one written by the run that resumed from it: the same command continues it
    save_atomic({"epoch": 5, "args": {"resume_from": snap}}, str(own))
    assert load_resume(str(own), snap)[1]["epoch"] == 5
    with pytest.raises(FileNotFoundError):
        load_resume(str(tmp_path / "new" / "checkpoint.pth"), str(tmp_path / "missing.pth"))


def test_stale_temporary_files_are_removed_and_writes_are_atomic(tmp_path, monkeypatch):
    for name in ("checkpoint.pth.tmp.123", "checkpoint.pth.tar.tmp.77", f"x.pth.tmp.{os.getpid()}"):
        (tmp_path / name).write_bytes(b"partial")
    keep = ["checkpoint.pth", "notes.tmp.txt", f"x.pth.tmp.{os.getpid()}"]
    (tmp_path / "checkpoint.pth").write_bytes(b"old")
    (tmp_path / "notes.tmp.txt").write_text("")
    assert remove_stale_tmp(str(tmp_path)) == ["checkpoint.pth.tar.tmp.77", "checkpoint.pth.tmp.123"]
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
    # a failing write leaves the old file and no temporary one
    with pytest.raises(Exception):
        save_atomic({"f": lambda: 0}, str(tmp_path / "checkpoint.pth"))
    assert (tmp_path / "checkpoint.pth").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_signal_sets_a_flag_and_sigusr1_requeues_under_slurm(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'called'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    previous = signal.getsignal(signal.SIGUSR1)
    stopper = preempt.Preemption(every_iters=5)
    try:
        assert not stopper.sync_due(0) and stopper.sync_due(4) and stopper.sync_due(9)
        assert stopper.agree(it=4).save and not stopper.agree(it=5).save
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
        assert stopper.signal == "SIGUSR1" and stopper.sync_due(1)  # one process: this step
        flags = stopper.agree(torch.tensor(0.0), it=1)
        assert flags.stop and flags.save and flags.nonfinite == 0
    finally:
        stopper.close()
    assert signal.getsignal(signal.SIGUSR1) == previous
    stopper.finish()
    assert (tmp_path / "called").read_text().split() == ["requeue", "99"]
    assert "Stopped by SIGUSR1 after iteration 1" in capsys.readouterr().out
    # SIGTERM (a preemption): no requeue, SLURM requeues preempted jobs itself
    (tmp_path / "called").unlink()
    stopper.agreed_signal = "SIGTERM"
    stopper.finish()
    assert not (tmp_path / "called").exists()


def test_resumable_run_agrees_every_print_freq_steps_and_stops_on_nan_or_signal(monkeypatch):
    """core/preempt.py's ResumableRun, the loop of all three training scripts, on a list of 7
    batches: the ranks' agreement (the one host read) only every print_freq steps, at each
    epoch's last step and after each epoch; a nan loss raises at the next agreement; a signal
    saves the position after the step in flight and ends the epoch; a resumed run starts at
    the checkpoint's iteration; the signal handlers are put back."""
    from types import SimpleNamespace
    args = SimpleNamespace(epochs=2, print_freq=3, device="cpu", checkpoint_every_iters=0,
                           checkpoint_every_minutes=0.0, seed=0, world_size=1,
                           batch_size_per_gpu=4)
    agreed, saved = [], []
    agree = preempt.Preemption.agree
    monkeypatch.setattr(preempt.Preemption, "agree",
                        lambda self, nonfinite=None, it=None: agreed.append(it) or
                        agree(self, nonfinite, it))
    handler = signal.getsignal(signal.SIGTERM)

    def train(run, nan_at=None, term_at=None):
        seen = []
        for epoch in run.epochs():
            steps = run.epoch(epoch)
            for it, batch in steps:
                seen.append((it, batch))
                if it == term_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                steps.update(torch.tensor(float("nan") if it == nan_at else 1.0))
            if steps.averages() is None:
                break
            run.save(epoch + 1)
        return seen

    save = lambda position: saved.append((position["epoch"], position["iteration"]))  # noqa: E731
    seen = train(preempt.ResumableRun(args, list("abcdefg"), save))
    assert seen == [(e * 7 + i, b) for e in range(2) for i, b in enumerate("abcdefg")]
    assert agreed == [0, 3, 6, None, 7, 10, 13, None] and saved == [(1, 0), (2, 0)]
    assert signal.getsignal(signal.SIGTERM) == handler

    agreed.clear()
    with pytest.raises(FloatingPointError, match=r"^loss is not finite \(nan/inf\) at epoch 1, "
                                                 r"iteration 3; stopping without saving\. Lower"):
        train(preempt.ResumableRun(args, list("abcdefg"), save), nan_at=8)
    assert agreed == [0, 3, 6, None, 7, 10] and signal.getsignal(signal.SIGTERM) == handler

    saved.clear()
    run = preempt.ResumableRun(args, list("abcdefg"), save)
    assert [it for it, _ in train(run, term_at=4)] == [0, 1, 2, 3, 4]  # one process: that step
    assert run.stopped and saved == [(0, 5)] and signal.getsignal(signal.SIGTERM) == handler
    run = preempt.ResumableRun(args, list("abcdefg"), save, resume={"epoch": 0, "iteration": 5})
    assert train(run) == [(5, "f"), (6, "g")] + [(7 + i, b) for i, b in enumerate("abcdefg")]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    save_atomic({"ranks": preempt.gather_rank_states()}, str(tmp_path / "c.pth"))
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    with preempt.keep_rng():
        torch.rand(5)  # consumed and given back
    ckpt = torch.load(tmp_path / "c.pth", weights_only=True)
    preempt.restore_rank_state(ckpt["ranks"])
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2:] == got[2:]


def test_resumable_sampler_skips_whole_batches_of_the_same_order():
    data = list(range(50))
    full = preempt.ResumableSampler(data, 4, num_replicas=2, rank=1, seed=3)
    full.set_epoch(2)
    part = preempt.ResumableSampler(data, 4, num_replicas=2, rank=1, seed=3)
    part.set_epoch(2, start_iter=3)
    assert list(part) == list(full)[12:] and len(part) == len(full) == 25


def test_a_mid_epoch_checkpoint_needs_the_same_ranks_and_batch():
    ckpt = {"epoch": 1, "iteration": 5, "sampler": {"world_size": 8, "batch_size": 64}}
    preempt.check_position(ckpt, 8, 64)
    preempt.check_position({**ckpt, "iteration": 0}, 4, 64)  # an epoch boundary: any
    with pytest.raises(ValueError, match="8 processes x --batch_size_per_gpu 64; this run has 4 x 64"):
        preempt.check_position(ckpt, 4, 64)


# ============ Ctrl-C (issue 18): the first saves and stops, a second stops at once ============

def test_ctrl_c_once_saves_mid_epoch_and_exits_130(tmp_path):
    """SIGINT used to print a KeyboardInterrupt traceback and lose the partial epoch, while
    SIGTERM saved. Now the first Ctrl-C finishes the step, saves the mid-epoch position and
    exits with 130 (an interrupted command: `train && eval` does not go on)."""
    data = make_digits(tmp_path / "data", n_train=32)
    argv = dino_argv(data, tmp_path / "out") + ["--checkpoint_every_iters", "0"]
    run = Run(argv, tmp_path / "int")
    run.wait_for(lambda: steps_done(run.text()) >= 2)
    assert run.kill(signal.SIGINT), "the run ended before the signal"
    assert run.join() == [130], run.text()[-3000:]
    text = run.text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert "Ctrl-C: finishing this step and saving; press Ctrl-C again to stop at once" in text
    assert re.search(r"Stopped by Ctrl-C after iteration \d+; checkpoint saved", text), text[-2000:]
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] * 4 + ckpt["iteration"] >= 2 and ckpt["iteration"] > 0, \
        (ckpt["epoch"], ckpt["iteration"])


def test_ctrl_c_twice_stops_at_once_without_a_traceback(tmp_path):
    """A second Ctrl-C (here while the first one's checkpoint is being written, held open by the
    test-only pause) stops at once: one line, exit 130, no traceback, no checkpoint.pth
    half-written (its temporary file is removed by the next start)."""
    data = make_digits(tmp_path / "data", n_train=32)
    out = tmp_path / "out"
    argv = dino_argv(data, out) + ["--checkpoint_every_iters", "0"]
    run = Run(argv, tmp_path / "int", env={"MINISSL_TEST_SAVE_PAUSE": "20"})
    run.wait_for(lambda: steps_done(run.text()) >= 1)
    assert run.kill(signal.SIGINT)
    run.wait_for(lambda: tmp_files(out))  # the first Ctrl-C's checkpoint is being written
    time.sleep(preempt.SAME_PRESS_S + 0.2)  # a new press, not the same one forwarded twice
    assert run.kill(signal.SIGINT)
    assert run.join(timeout=10) == [130], run.text()[-3000:]
    text = run.text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert "Ctrl-C again: stopping at once without saving; the last checkpoint is kept" in text
    assert not (out / "checkpoint.pth").exists() and tmp_files(out)


def test_ctrl_c_reaching_two_ranks_twice_at_once_is_one_press(tmp_path):
    """Under torchrun a Ctrl-C reaches every worker twice, milliseconds apart (from the terminal
    and forwarded by the launcher): one press. The ranks agree, rank 0 saves the mid-epoch
    position, and both exit with 130."""
    data = make_digits(tmp_path / "data", n_train=48)  # 6 steps an epoch (2 ranks x 4)
    argv = simclr_argv(data, tmp_path / "out") + ["--print_freq", "1", "--checkpoint_every_iters", "0"]
    run = Run(argv, tmp_path / "int", world_size=2)
    run.wait_for(lambda: "Epoch: [0/2] [1/6]" in run.text(0))
    for _ in range(2):
        assert run.kill(signal.SIGINT)
    assert run.join() == [130, 130], run.text(0)[-3000:] + run.text(1)[-3000:]
    assert re.search(r"Stopped by Ctrl-C after iteration \d+; checkpoint saved", run.text(0))
    assert "stopping at once" not in run.text(0) + run.text(1)
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and 0 < ckpt["iteration"] < 6, (ckpt["epoch"], ckpt["iteration"])


# ============ a full disk, a second run, another number of processes (issue 18) ============

def test_disk_full_mid_run_is_one_error_line_and_the_last_checkpoint_stays(tmp_path, monkeypatch):
    """The run's second checkpoint write fails with ENOSPC (patched before the fork, so the run
    inherits it): one `error:` line naming the file, the errno and the fix, exit code 2, and the
    first checkpoint intact, with no temporary file left."""
    import errno
    from core import checkpoint
    real_open, writes = open, []

    def full_disk(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if ".tmp." in str(path):
            writes.append(path)
            if len(writes) >= 2:  # the disk is full from the second checkpoint on
                f.close()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f
    monkeypatch.setattr(checkpoint, "open", full_disk, raising=False)
    data = make_digits(tmp_path / "data", n_train=32)
    out = tmp_path / "out"
    run = Run(dino_argv(data, out), tmp_path / "full")  # a checkpoint at step 3, then at 4
    assert run.join() == [2], run.text()[-3000:]
    text = run.text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert errors[0].startswith(f"error: could not write {out / 'checkpoint.pth'} (the previous "
                                "one is kept): ENOSPC (No space left on device); free space on "
                                f"the disk of {out} or pass another --output_dir"), errors[0]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 3) and not tmp_files(out)


def test_a_second_run_in_one_output_dir_is_refused(tmp_path):
    """Two train_ssl.py runs started in one --output_dir both trained and interleaved log.txt:
    the second stops before reading any data, exit code 2, with one line naming the folder and
    the first run's pid (here a process holding the folder's lock)."""
    data = make_digits(tmp_path / "data", n_train=32)
    out = tmp_path / "out"
    out.mkdir()
    holder, done = start_lock_holder(out)
    STARTED.append(holder)
    run = Run(dino_argv(data, out), tmp_path / "second")
    assert run.join() == [2], run.text()[-3000:]
    errors = [line for line in run.text().splitlines() if line.startswith("error:")]
    assert errors == [f"error: --output_dir {out} is in use by another run (pid {holder.pid} on "
                      f"{socket.gethostname()}); wait for it to end or stop it, or pass another "
                      "--output_dir"], run.text()[-3000:]
    assert "Data loaded" not in run.text() and not (out / "log.txt").exists()
    done.set()
    holder.join()


def _eval_args(script, data, out, *extra):
    flags = ["--arch", "vit_tiny", "--patch_size", "8", "--image_size", "16", "--dataset", "npy",
             "--data_path", str(data), "--num_workers", "0", "--batch_size_per_gpu", "16",
             "--tensorboard", "false", "--print_freq", "1", "--val_split", "16",
             "--output_dir", str(out), *extra]
    if script == "eval_linear":
        a = eval_linear.get_args_parser().parse_args(flags + ["--n_last_blocks", "1"])
    else:
        a = finetune.get_args_parser().parse_args(flags + ["--warmup_epochs", "0", "--save_predictions", "0"])
    a.rank, a.world_size, a.gpu, a.distributed = 0, 1, 0, False
    a.device = torch.device("cpu")
    return a


@pytest.mark.parametrize("script", ["eval_linear", "finetune"])
def test_eval_scripts_refuse_a_busy_folder_and_another_number_of_processes(script, tmp_path,
                                                                          monkeypatch, capsys):
    """eval_linear.py and finetune.py: a folder another live run holds is refused in one line;
    their checkpoint written by 2 processes is refused when resumed by one, and with
    --allow_world_size_change true the run goes on, saying the new global batch and lr, and
    eval_linear's probe then trains with the lr of the new global batch (the saved optimizer
    and schedule held the old one)."""
    from core.checkpoint import OutputDirInUse
    make_digits(tmp_path / "data", n_train=48)  # 32 train images: 2 steps of 16
    run = eval_linear.run_linear if script == "eval_linear" else finetune.run_finetune
    out = tmp_path / "out"
    out.mkdir()
    holder, done = start_lock_holder(out)
    STARTED.append(holder)
    with pytest.raises(OutputDirInUse, match=f"--output_dir {out} is in use by another run "
                                             f"\\(pid {holder.pid} on"):
        run(_eval_args(script, tmp_path / "data", out, "--epochs", "1"))
    done.set()
    holder.join()

    with monkeypatch.context() as m:  # stopped after epoch 0 of 2 (its last step)
        _sigterm_at_step(m, amp, "backward_step", 2)
        assert run(_eval_args(script, tmp_path / "data", out, "--epochs", "2")) is None
    name = "checkpoint.pth.tar" if script == "eval_linear" else "checkpoint.pth"
    ckpt = torch.load(out / name, weights_only=True)
    ckpt["args"]["world_size"] = ckpt["sampler"]["world_size"] = 2  # as if 2 processes wrote it
    if script == "eval_linear":  # ... with the lr of their global batch (2 x 16)
        for group in ckpt["optimizer"]["param_groups"]:
            group["lr"], group["initial_lr"] = 2 * group["lr"], 2 * group["initial_lr"]
        ckpt["scheduler"]["base_lrs"] = [2 * lr for lr in ckpt["scheduler"]["base_lrs"]]
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 0)
    torch.save(ckpt, out / name)
    with pytest.raises(ValueError, match="was written by 2 processes, this run has 1: that changes "
                                         "the run \\(global batch 32 -> 16"):
        run(_eval_args(script, tmp_path / "data", out, "--epochs", "2"))
    args = _eval_args(script, tmp_path / "data", out, "--epochs", "2", "--allow_world_size_change", "true")
    assert run(args) is not None
    if script == "eval_linear":
        lr = args.lr * 16 / 256  # the new global batch's, at the cosine's half-way point
        last = json.loads((out / "log.txt").read_text().splitlines()[-1])
        assert last["epoch"] == 1 and last["train_lr"] == pytest.approx(lr / 2, rel=1e-6), (last, lr)
    assert "lr unchanged" in capsys.readouterr().out if script == "finetune" else True


def test_eval_linear_keeps_an_absolute_lr_when_the_process_count_changes(tmp_path, monkeypatch):
    """With --lr_scaling none the lr is the one given, whatever the global batch: a probe
    written by 2 processes and resumed by one with --allow_world_size_change true keeps it
    (only the linear scaling rule rescales it)."""
    make_digits(tmp_path / "data", n_train=48)
    out = tmp_path / "out"
    flags = ("--epochs", "2", "--lr_scaling", "none")
    with monkeypatch.context() as m:  # stopped after epoch 0 of 2
        _sigterm_at_step(m, amp, "backward_step", 2)
        assert eval_linear.run_linear(_eval_args("eval_linear", tmp_path / "data", out, *flags)) is None
    ckpt = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    ckpt["args"]["world_size"] = ckpt["sampler"]["world_size"] = 2  # the same absolute lr
    torch.save(ckpt, out / "checkpoint.pth.tar")
    args = _eval_args("eval_linear", tmp_path / "data", out, *flags,
                      "--allow_world_size_change", "true")
    assert eval_linear.run_linear(args) is not None
    last = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert last["epoch"] == 1 and last["train_lr"] == pytest.approx(args.lr / 2, rel=1e-6), last
