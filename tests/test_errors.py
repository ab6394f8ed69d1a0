"""Bad or unlucky inputs (issue 12): each one is refused before anything starts, or ends in one
`error: ...` line naming the problem and the fix (exit code 2), and nothing wrong is computed
silently. In this process through core.cli.run, as every script's `__main__`; only the torchrun
launcher test needs subprocesses."""
import os
import signal
import subprocess
import textwrap
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import eval_linear
import finetune
import train_ssl
from core import cli
from core import dist as distu
from core.checkpoint import load_file, make_output_dir
from data import BadImageError, build_dataset
from test_eval import local, npy_root  # noqa: F401  (the fixture: 4 colour classes, 16px)
from test_eval_options import TINY_VIT, data

REPO = Path(__file__).resolve().parents[1]


def exits_with_one_line(fn, capsys, *words):
    """cli.run(fn) ends the process with exit code 2 and one stderr line holding `words`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(fn)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, err
    return err


# ============ train_ssl.py: never resume another run ... ============

SIMCLR = ["--method", "simclr", "--arch", "resnet18", "--crop_size", "16", "--epochs", "2",
          "--warmup_epochs", "0", "--num_workers", "0", "--proj_hidden_dim", "32"]


def _write_checkpoint(out, argv):
    """checkpoint.pth as train_ssl.py leaves it: the args after training (init_distributed_mode
    and the data section add rank, device, input_size, cifar_stem ...)."""
    args = train_ssl.parse_args(argv + ["--output_dir", str(out)])
    args.rank, args.world_size, args.gpu, args.distributed = 0, 2, 0, True
    args.device, args.input_size, args.cifar_stem = torch.device("cpu"), 16, True
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "epoch": 1, "args": train_ssl.vars_plain(args)}, out / "checkpoint.pth")


@pytest.mark.parametrize("argv,words", [
    (["--method", "dino", "--arch", "vit_tiny", "--patch_size", "4", "--global_crops_size", "16",
      "--local_crops_size", "8"], ["--method simclr, this command has --method dino"]),
    (SIMCLR + ["--arch", "resnet34"], ["--arch resnet18, this command has --arch resnet34"]),
    (SIMCLR + ["--proj_hidden_dim", "64"], ["--proj_hidden_dim 32, this command has --proj_hidden_dim 64"]),
    (SIMCLR + ["--lr", "0.1"], ["--lr 0.3, this command has --lr 0.1"]),
    (SIMCLR + ["--data_path", "{npy}"], ["--dataset digits, this command has --dataset npy"]),
    (SIMCLR + ["--batch_size_per_gpu", "32"], ["--batch_size_per_gpu 64, this command has"]),
], ids=["method", "arch", "head", "lr", "dataset", "batch"])
def test_train_ssl_refuses_another_runs_checkpoint(argv, words, tmp_path, capsys):
    """A DINO run (or another model, head, lr, dataset, batch) in a SimCLR run's folder stops
    before any data is read, naming the first flag that differs, instead of a raw optimizer
    ValueError / state-dict RuntimeError or, worse, silently training on from the other run."""
    (tmp_path / "npy" / "train").mkdir(parents=True)
    for name in ("images", "labels"):
        np.save(tmp_path / "npy" / "train" / f"{name}.npy", np.zeros(4, np.uint8))
    out = tmp_path / "out"
    _write_checkpoint(out, SIMCLR)
    args = train_ssl.parse_args([a.format(npy=tmp_path / "npy") for a in argv]
                                + ["--output_dir", str(out)])
    exits_with_one_line(lambda: train_ssl.check_output_dir(args), capsys, *words,
                        f"{out / 'checkpoint.pth'} was written by a run with",
                        "pass another --output_dir or delete that folder")


def test_train_ssl_resumes_its_own_run(tmp_path):
    """What a resumed run may change (--epochs to extend it, workers, logging, precision) and
    what it derives (input size, stem, ranks) do not block the resume; neither do a tuple and
    the list argparse makes of the same numbers, nor a relative and an absolute --data_path."""
    out = tmp_path / "out"
    _write_checkpoint(out, SIMCLR)
    same = ["--epochs", "5", "--num_workers", "3", "--print_freq", "1", "--tensorboard", "false",
            "--knn_eval", "false", "--knn_freq", "2", "--adamw_betas", "0.9", "0.999",
            "--precision", "fp32"]
    train_ssl.check_output_dir(train_ssl.parse_args(SIMCLR + same + ["--output_dir", str(out)]))


def test_train_ssl_refuses_a_checkpoint_without_args(tmp_path, capsys):
    torch.save({"model": {}}, tmp_path / "checkpoint.pth")
    args = train_ssl.parse_args(SIMCLR + ["--output_dir", str(tmp_path)])
    exits_with_one_line(lambda: train_ssl.check_output_dir(args), capsys, "no record of the flags")


# ============ flags that cannot work ... ============

BAD_FLAGS = [
    (["--method", "simclr", "--epochs", "-3"], ["--epochs -3 trains nothing", "--epochs >= 1"]),
    (["--method", "simclr", "--epochs", "0", "--warmup_epochs", "0"], ["--epochs 0 trains nothing"]),
    (["--method", "simclr", "--warmup_epochs", "-1"], ["--warmup_epochs (-1) must be >= 0"]),
    (["--method", "simclr", "--num_workers", "-1"], ["--num_workers -1 must be >= 0"]),
    (["--method", "simclr", "--batch_size_per_gpu", "0"], ["--batch_size_per_gpu 0 must be >= 1"]),
    (["--method", "simclr", "--print_freq", "0"], ["--print_freq 0 must be >= 1"]),
    (["--method", "simclr", "--knn_freq", "-1"], ["--knn_freq -1 must be >= 0"]),
    (["--method", "simclr", "--lr", "-0.1"], ["--lr -0.1 must be >= 0"]),
    # heads and temperatures that trained on silently (or stopped with a misleading NaN line)
    (["--method", "dino", "--out_dim", "0"], ["--out_dim 0 must be >= 1"]),
    (["--method", "dino", "--teacher_temp", "0"], ["--teacher_temp 0.0 must be positive"]),
    (["--method", "ibot", "--momentum_teacher", "1.5"], ["--momentum_teacher 1.5 must be in [0, 1]"]),
    (["--method", "ibot", "--teacher_patch_temp", "-1"], ["--teacher_patch_temp -1.0", "positive"]),
    (["--method", "simclr", "--proj_output_dim", "0"], ["--proj_output_dim 0 must be >= 1"]),
    (["--method", "simclr", "--data_path", __file__], ["is a file, not a folder"]),
    # the ViT would silently drop the pixels the patches do not cover
    (["--method", "simclr", "--arch", "vit_tiny", "--patch_size", "5", "--crop_size", "16"],
     ["--patch_size 5 does not divide --crop_size 16", "last 1 pixel", "e.g. 4 or 8 or 16"]),
    (["--method", "rotation", "--arch", "vit_tiny", "--patch_size", "3", "--crop_size", "32"],
     ["--patch_size 3 does not divide --crop_size 32"]),
    (["--method", "dino", "--arch", "vit_tiny", "--patch_size", "4", "--global_crops_size", "30",
      "--local_crops_size", "16"], ["--patch_size 4 does not divide --global_crops_size 30"]),
    (["--method", "ibot", "--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32",
      "--local_crops_size", "12", "--local_crops_number", "2"],
     ["--patch_size 8 does not divide --local_crops_size 12"]),
]


@pytest.mark.parametrize("argv,words", BAD_FLAGS, ids=lambda v: " ".join(v)[9:50])
def test_bad_flag_values_are_refused_at_parse_time(argv, words, capsys):
    exits_with_one_line(lambda: train_ssl.parse_args(argv), capsys, *words)


def test_patch_size_is_free_for_a_resnet_and_checked_for_eval_sizes(capsys):
    train_ssl.parse_args(["--method", "simclr", "--arch", "resnet18", "--patch_size", "5",
                          "--crop_size", "16"])  # a ResNet has no patches
    from core import model_flags
    import eval_knn
    args = eval_knn.get_args_parser().parse_args(["--arch", "vit_tiny", "--patch_size", "16",
                                                  "--image_size", "40", "--num_workers", "0"])
    exits_with_one_line(lambda: model_flags.load_backbone(args), capsys,
                        "--patch_size 16 does not divide --image_size 40")
    args = eval_knn.get_args_parser().parse_args(["--num_workers", "-1"])
    exits_with_one_line(lambda: eval_knn.check_args(args), capsys, "--num_workers -1 must be >= 0")


def test_argparse_errors_are_one_line_without_the_usage_block(capsys):
    import eval_linear
    for parse in (lambda: train_ssl.parse_args(["--method", "simclr", "--arch", "resnet99"]),
                  lambda: eval_linear.get_args_parser().parse_args(["--arch", "resnet99"])):
        with pytest.raises(SystemExit) as e:
            parse()
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "usage:" not in err, err
        assert "error: argument --arch: invalid choice: 'resnet99'" in err and "--help" in err


# ============ files ... ============

def test_empty_garbage_or_folder_weights_are_one_line(tmp_path, capsys):
    (tmp_path / "empty.pth").touch()
    (tmp_path / "text.pth").write_text("not a checkpoint")
    for path, words in ((tmp_path / "empty.pth", ["is empty (0 bytes)"]),
                        (tmp_path / "text.pth", ["could not read checkpoint", "Unsupported operand",
                                                 "complete PyTorch .pth"]),
                        (tmp_path, ["is a folder", "checkpoint.pth"])):
        exits_with_one_line(lambda: load_file(str(path)), capsys, str(path), *words)


def test_unwritable_output_dir_is_refused_before_training(tmp_path, capsys):
    """Checked by a real write before any data is read (os.access says yes to root)."""
    (tmp_path / "file").write_text("")
    args = train_ssl.parse_args(SIMCLR + ["--output_dir", str(tmp_path / "file" / "out")])
    exits_with_one_line(lambda: train_ssl.check_output_dir(args), capsys,
                        "--output_dir", "is not a writable folder", "pass a folder you can write to")
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o500)
        exits_with_one_line(lambda: make_output_dir(str(tmp_path / "ro")), capsys, "Permission denied")


def _image_folder(root, bad):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.png")
    for name in bad:
        (root / "train" / name).write_bytes(b"\x89PNG but not really")
    return root


def test_bad_image_names_the_file_even_from_a_loader_worker(tmp_path, capsys):
    root = _image_folder(tmp_path, ["a/3_bad.png"])
    ds = build_dataset("imagefolder", str(root), "train", T.ToTensor())
    bad = str(root / "train" / "a" / "3_bad.png")
    with pytest.raises(BadImageError):
        ds[3]
    # through a DataLoader worker, which re-raises it with its traceback as the message
    batches = iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1))
    exits_with_one_line(lambda: list(batches), capsys, f"cannot decode image {bad}",
                        "--skip_bad_images true")
    batches._shutdown_workers()  # now: left to the garbage collector it takes 5 s


def test_skip_bad_images_trains_on_and_counts_them(tmp_path, capfd):
    """Two bad files, met by two DataLoader workers: both named, counted once each in the
    dataset's shared counter, and replaced by the next image so batches keep their size."""
    root = _image_folder(tmp_path, ["a/3_bad.png", "b/3_bad.png"])
    ds = build_dataset("imagefolder", str(root), "train", T.ToTensor(), skip_bad_images=True)
    assert len(ds) == 8
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
    labels = [int(y) for _, y in loader]
    assert labels == [0, 0, 0, 1, 1, 1, 1, 0]  # a/3_bad -> b/0, b/3_bad -> a/0 (wrapping around)
    assert int(ds.skipped) == 2
    err = capfd.readouterr().err
    for name in ("a/3_bad.png", "b/3_bad.png"):
        assert f"warning: skipped {root / 'train' / name} (not an image file PIL can identify)" in err


# ============ torchrun ... ============

def _children(pid):
    """Pids of the live processes whose parent is `pid` (from /proc)."""
    kids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(d))
    return kids


def _alive(pid):
    try:  # a killed child not yet reaped by its new parent is a zombie ("Z"): gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_exit_when_torchrun_is_killed(tmp_path):
    """kill -9 of the launcher: its worker must not train on as an orphan (core/dist.py
    exit_with_launcher). Without it the worker was still alive 10 s later."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         "train_ssl.py", *SIMCLR, "--epochs", "1000", "--output_dir", str(tmp_path),
         "--tensorboard", "false", "--knn_eval", "false"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers = []
    try:
        for line in launcher.stdout:  # the worker has set up its death signal by then
            if line.startswith("| distributed init"):
                break
        workers = _children(launcher.pid)
        assert workers, "no worker found"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=10)
        deadline = time.time() + 5
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, workers)), "a worker outlived its launcher"
    finally:
        launcher.kill()
        for pid in filter(_alive, workers):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_whose_launcher_died_before_it_armed_the_death_signal_exits():
    """A torchrun worker whose launcher died while it was importing has been re-parented (to
    init or a subreaper) before exit_with_launcher runs: it must exit, not train on."""
    code = ("from core.dist import exit_with_launcher; exit_with_launcher(); print('trained on')")
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "orphan"}  # a worker's environment, no agent
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "trained on" not in out.stdout


# ============ issue 18: runs that change the run, a full disk, unsafe loading ============

def test_resume_by_another_number_of_processes_is_refused_or_said(tmp_path, capsys):
    """The checkpoint of a 2-process run (global batch 128) resumed by one process would train
    on with global batch 64 and half the lr, silently: refused with the fix, or with
    --allow_world_size_change true said in one line with the new global batch and lr."""
    out = tmp_path / "out"
    _write_checkpoint(out, SIMCLR)  # world size 2, --batch_size_per_gpu 64 (the recipe's)
    args = train_ssl.parse_args(SIMCLR + ["--output_dir", str(out)])
    args.world_size = 1
    exits_with_one_line(lambda: train_ssl.check_output_dir(args), capsys,
                        f"{out / 'checkpoint.pth'} was written by 2 processes, this run has 1",
                        "global batch 128 -> 64 (64 x 2 -> 64 x 1), lr 1.500e-01 -> 7.500e-02",
                        "start it with 2 processes", "--allow_world_size_change true")
    args = train_ssl.parse_args(SIMCLR + ["--output_dir", str(out), "--allow_world_size_change", "true"])
    args.world_size = 1
    capsys.readouterr()
    train_ssl.check_output_dir(args)
    assert "with 1 (--allow_world_size_change true): global batch 128 -> 64" in capsys.readouterr().out
    args.world_size = 2  # the same processes: nothing to say
    train_ssl.check_output_dir(args)
    assert "Resuming" not in capsys.readouterr().out
    # a checkpoint written mid-epoch cannot change its processes, flag or not
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    torch.save({**ckpt, "iteration": 3}, out / "checkpoint.pth")
    args.world_size = 4
    exits_with_one_line(lambda: train_ssl.check_output_dir(args), capsys,
                        "written mid-epoch", "resume with the same number of processes")


def _hold_lock(folder, ready, done):
    from core.checkpoint import lock_output_dir
    lock_output_dir(folder)
    ready.set()
    done.wait(60)


def start_lock_holder(folder):
    """A forked process holding `folder`'s lock (as a live run would), once it holds it.
    Returns (the process, an Event that lets it end)."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(folder), ready, done))
    holder.start()
    assert ready.wait(30)
    return holder, done


def test_an_output_dir_lock_refuses_a_second_run_until_the_first_is_gone(tmp_path, capsys):
    """core/checkpoint.lock_output_dir: a folder another live process holds is refused with one
    line naming it and the holder's pid; once the holder is gone (here SIGKILLed, its lock file
    left behind, a stale lock), the folder is free. The script-level runs:
    tests/test_preempt.py test_a_second_run_in_one_output_dir_is_refused."""
    from core.checkpoint import lock_output_dir, unlock_output_dir
    out = tmp_path / "out"
    out.mkdir()
    holder, _ = start_lock_holder(out)
    try:
        exits_with_one_line(lambda: lock_output_dir(str(out)), capsys,
                            f"--output_dir {out} is in use by another run (pid {holder.pid} on",
                            "wait for it to end or stop it, or pass another --output_dir")
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # kill -9: no chance to clean up
        holder.join()
    assert f"pid {holder.pid}" in (out / ".lock").read_text()  # the dead run's lock file stays
    assert lock_output_dir(str(out)) is not None  # ... and does not block
    assert (out / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    assert lock_output_dir(str(out)) is not None  # this process again (in-process runs)
    unlock_output_dir(str(out))
    assert (out / ".lock").exists()


class _FullDisk:
    """A file whose writes fail with `code` once `room` bytes were written (a disk filling up
    during torch.save), or whose fsync does (network file systems report it there)."""

    def __init__(self, path, mode, code, room, at="write"):
        self.f, self.code, self.room, self.at = open(path, mode), code, room, at

    def write(self, b):
        self.room -= len(b)
        if self.at == "write" and self.room < 0:
            raise OSError(self.code, os.strerror(self.code))
        return self.f.write(b)

    def fileno(self):
        if self.at == "fsync":
            raise OSError(self.code, os.strerror(self.code))
        return self.f.fileno()

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("code,at,room,words", [
    ("ENOSPC", "write", 0, ["free space on the disk of"]),
    ("ENOSPC", "write", 3000, ["free space on the disk of"]),  # mid-file: torch's RuntimeError
    ("EDQUOT", "fsync", 10 ** 9, ["disk quota"]),
    ("EROFS", "write", 0, ["read-only file system"]),
])
def test_a_refused_checkpoint_write_is_one_line_and_keeps_the_previous_one(
        code, at, room, words, tmp_path, monkeypatch, capsys):
    """Disk full while writing a checkpoint ended in a 37-line torch traceback whose first line
    hid `No space left on device`: one line naming the file, the errno and the fix; the previous
    checkpoint is intact and no temporary file stays."""
    import errno
    from core import checkpoint
    path = tmp_path / "checkpoint.pth"
    checkpoint.save_atomic({"epoch": 1, "w": torch.zeros(3)}, str(path))
    monkeypatch.setattr(checkpoint, "open", lambda p, mode: _FullDisk(p, mode, getattr(errno, code),
                                                                      room, at), raising=False)
    exits_with_one_line(lambda: checkpoint.save_atomic({"epoch": 2, "w": torch.zeros(2000)}, str(path)),
                        capsys, f"could not write {path} (the previous one is kept): {code} (",
                        "pass another --output_dir", *words)
    assert load_file(str(path))["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_no_torch_load_outside_the_safe_loader():
    """Every file is read through core/checkpoint.load_file (weights_only=True): torch 2.5, the
    lowest supported version, unpickles anything (code included) when torch.load is called
    without weights_only. Scans the product's source (scripts, core, data, methods, models,
    bench) for any other call of torch.load or import of it."""
    import ast
    found = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("tests/") or any(part.startswith(".") for part in path.relative_to(REPO).parts):
            continue
        source = path.read_text()
        for node in ast.walk(ast.parse(source, rel)):
            if isinstance(node, ast.Attribute) and node.attr == "load" \
                    and ast.unparse(node.value) in ("torch", "torch.serialization"):
                found.append((rel, source.splitlines()[node.lineno - 1].strip()))
            elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization") \
                    and any(a.name == "load" for a in node.names):
                found.append((rel, f"from {node.module} import load"))
    assert len(found) == 1 and found[0][0] == "core/checkpoint.py", found
    assert "weights_only=True" in found[0][1], found


def test_load_features_never_unpickles_code(tmp_path, monkeypatch, capsys):
    """eval_knn.py --load_features read features.pth with a bare torch.load: under torch 2.5's
    default (forced here with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) a crafted file ran its code.
    Now it is refused with one line naming the file and the class it would have run."""
    import eval_knn
    pwned = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return open, (str(pwned), "w")
    (tmp_path / "feats").mkdir()
    torch.save({"train_features": Evil()}, tmp_path / "feats" / "features.pth")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    args = eval_knn.get_args_parser().parse_args(["--load_features", str(tmp_path / "feats"),
                                                  "--num_workers", "0"])
    args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
    args.device = torch.device("cpu")
    exits_with_one_line(lambda: eval_knn.run_knn(args), capsys,
                        f"could not read features file '{tmp_path / 'feats' / 'features.pth'}'",
                        "Unsupported global", "io.open")
    assert not pwned.exists()
    args.load_features = str(tmp_path / "none")
    exits_with_one_line(lambda: eval_knn.run_knn(args), capsys, "features file",
                        "does not exist", "--dump_features folder")


def test_ctrl_c_outside_the_training_loop_is_one_line_and_exit_130(capsys):
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cli.run(interrupted)
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err.startswith("Stopped by Ctrl-C") and len(err.splitlines()) == 1, err


# ============ a loss gone nan/inf: one way in every training script (issue 19) ============

@pytest.mark.parametrize("script", ["train_ssl", "eval_linear", "finetune"])
def test_a_non_finite_loss_ends_every_training_script_alike(script, npy_root, tmp_path, capsys,
                                                            monkeypatch):
    """The first optimizer step diverges (here: leaves nan weights), so the second step's loss is
    nan. Every training script stops at the next agreement of the ranks (--print_freq 1: that
    step), before anything is saved, with the same one `error:` line (the epoch, the iteration,
    the script's flags to change) and exit code 1. Before: train_ssl.py exited 1, finetune.py
    raised a ValueError at the epoch's end (exit 2), eval_linear.py trained on and reported."""
    from core import amp
    step = amp.backward_step

    def diverging(loss, optimizer, *a, **k):
        step(loss, optimizer, *a, **k)
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.fill_(float("nan"))
    monkeypatch.setattr(amp, "backward_step", diverging)
    common = TINY_VIT + data(npy_root, tmp_path) + ["--epochs", "2", "--print_freq", "1"]
    if script == "train_ssl":
        args = train_ssl.parse_args(common + [
            "--method", "simclr", "--proj_hidden_dim", "32", "--crop_size", "16",
            "--dataset", "npy", "--warmup_epochs", "0", "--knn_eval", "false", "--cpu"])
        main, fix = lambda: train_ssl.train_ssl(args), train_ssl.NONFINITE_FIX
    elif script == "eval_linear":
        args = local(eval_linear.get_args_parser().parse_args(common + ["--n_last_blocks", "1"]))
        main, fix = lambda: eval_linear.run_linear(args), eval_linear.NONFINITE_FIX
    else:
        args = local(finetune.get_args_parser().parse_args(common + [
            "--warmup_epochs", "0", "--val_split", "16", "--save_predictions", "0"]))
        main, fix = lambda: finetune.run_finetune(args), finetune.NONFINITE_FIX
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            cli.run(main)
    finally:
        distu.cleanup()  # (train_ssl.py's process group)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: loss is not finite (nan/inf) at epoch 0, iteration 1; "
                                f"stopping without saving. {fix}"], err
    assert "--lr" in fix
    assert not list(tmp_path.glob("checkpoint*")), list(tmp_path.iterdir())


@pytest.mark.parametrize("body, code, stderr", [
    ("return None", 0, ""),
    ("sys.exit(130)", 130, ""),
    ("raise ValueError('--x 3 is wrong; use --x 2')", 2, "error: --x 3 is wrong; use --x 2"),
    ("raise RuntimeError('boom')", 1, "RuntimeError: boom"),
])
def test_a_rank_of_several_leaves_with_its_exit_status_and_without_teardown(body, code, stderr):
    """cli.run ends a rank of a multi-process run with os._exit (gloo's workers would abort the
    interpreter's teardown): the exit status and the error line or traceback are kept, and
    nothing after run() runs (an atexit hook does not print)."""
    program = textwrap.dedent(f"""
        import atexit, sys
        from core import cli, dist
        dist._ONE_OF_SEVERAL = True  # as init_distributed_mode sets it on a rank of several
        atexit.register(lambda: print("teardown ran"))
        def main():
            print("trained", flush=True)
            {body}
        cli.run(main)
        print("after run")
    """)
    out = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == code, out.stderr
    assert out.stdout == "trained\n"
    assert stderr in out.stderr
