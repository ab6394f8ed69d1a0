"""End to end, through the command lines users type: a 2-process gloo torchrun SimCLR run on a
tiny .npy dataset, its resume, k-NN evaluation of the checkpoint, and the one-line errors for
bad input. Every command is a subprocess with OMP_NUM_THREADS=1 and --num_workers 0."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _start(args):
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _run(args, timeout=60):
    proc = _start(args)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def make_npy_dataset(root, n_train=64, n_test=32, size=16, num_classes=4):
    """uint8 N x H x W x 3 images whose class sets the bright channel and a stripe pattern."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % num_classes
        images = rng.integers(0, 60, size=(n, size, size, 3)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, :, :, c % 3] += 150
            if c >= 3:
                images[i, ::2] = 255
        (root / split).mkdir(parents=True)
        np.save(root / split / "images.npy", images)
        np.save(root / split / "labels.npy", labels)
    return root


def train_cmd(data, out, epochs):
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_ssl.py",
            "--method", "simclr", "--arch", "resnet18", "--crop_size", "16",
            "--dataset", "npy", "--data_path", str(data), "--output_dir", str(out),
            "--batch_size_per_gpu", "8", "--epochs", str(epochs), "--warmup_epochs", "0",
            "--num_workers", "0", "--tensorboard", "false", "--knn_eval", "false",
            "--proj_hidden_dim", "256", "--print_freq", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch with 2 processes, then the same command with --epochs 2 (resumes)."""
    tmp = tmp_path_factory.mktemp("train")
    data = make_npy_dataset(tmp / "data")
    out = tmp / "out"
    runs = []
    for epochs in (1, 2):
        rc, stdout, stderr = _run(train_cmd(data, out, epochs))
        assert rc == 0, stdout[-2000:] + stderr[-3000:]
        runs.append(stdout)
    return data, out, runs


def test_two_process_training_resumes_and_logs(trained):
    data, out, (first, second) = trained
    assert "Starting simclr training from epoch 0!" in first
    assert "global batch: 16 (8 x 2)" in first
    # the second run picked up the first run's checkpoint instead of starting over
    assert f"Found checkpoint at {out / 'checkpoint.pth'}" in second
    assert "=> loaded 'model'" in second and "=> loaded 'optimizer'" in second
    assert "Starting simclr training from epoch 1!" in second
    assert "Epoch: [0/2]" not in second and "Epoch: [1/2]" in second

    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["epochs"] == 2 and ckpt["args"]["world_size"] == 2
    assert {"model", "optimizer", "epoch", "args"} <= set(ckpt)
    assert any(k.startswith("backbone.") for k in ckpt["model"])
    assert not list(out.glob("*.tmp*"))

    lines = (out / "log.txt").read_text().splitlines()
    stats = [json.loads(line) for line in lines]  # rank 0 only: one line per epoch
    assert [s["epoch"] for s in stats] == [0, 1]
    for s in stats:
        assert np.isfinite(s["train_loss"]) and 0 <= s["train_acc1"] <= s["train_acc5"] <= 100
        assert s["train_wd"] == pytest.approx(1e-6)  # SimCLR's constant weight decay


def test_eval_knn_on_the_checkpoint(trained):
    data, out, _ = trained
    rc, stdout, stderr = _run(["eval_knn.py", "--pretrained_weights", str(out / "checkpoint.pth"),
                               "--dataset", "npy", "--data_path", str(data), "--nb_knn", "1", "5",
                               "--num_workers", "0"])
    assert rc == 0, stderr[-3000:]
    results = dict(re.findall(r"^(\d+)-NN classifier result: Top1: ([\d.]+), Top5: [\d.]+$",
                              stdout, re.M))
    assert set(results) == {"1", "5"}, stdout[-2000:]
    assert all(0 <= float(v) <= 100 for v in results.values())


def _assert_one_line_error(proc, *words):
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, out[-1000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_inputs_exit_with_one_clear_line(trained, tmp_path):
    data, out, _ = trained
    nan_out = tmp_path / "nan"
    cases = [
        (["train_ssl.py", "--dataset", "imagefolder"], ["--data_path"]),
        (["eval_knn.py", "--pretrained_weights", str(out / "checkpoint.pth"), "--arch", "vit_tiny",
          "--dataset", "npy", "--data_path", str(data), "--num_workers", "0"], ["--arch"]),
        (["train_ssl.py", "--dataset", "npy", "--data_path", str(data), "--crop_size", "16",
          "--batch_size_per_gpu", "8", "--num_workers", "0", "--tensorboard", "false",
          "--knn_eval", "false", "--output_dir", str(nan_out), "--epochs", "2",
          "--warmup_epochs", "0", "--optimizer", "sgd", "--lr", "1e30", "--print_freq", "1"],
         ["not finite"]),
    ]
    procs = [_start(cmd) for cmd, _ in cases]  # side by side: mostly spent importing torch
    for proc, (_, words) in zip(procs, cases):
        _assert_one_line_error(proc, *words)
    assert not (nan_out / "checkpoint.pth").exists()  # stopped without saving


# Errors found while parsing the command line are raised before anything else runs, so they
# are checked in this process (a SystemExit with a message prints just that line).

def test_command_line_errors(capsys):
    import train_ssl

    for argv, words in ((["--method", "byol"], ["unknown --method 'byol'", "simclr"]),
                        (["--epochs", "2", "--warmup_epochs", "2"], ["--warmup_epochs (2)"])):
        with pytest.raises(SystemExit) as e:
            train_ssl.parse_args(argv)
        msg = str(e.value.code)
        assert msg.startswith("error: ") and "\n" not in msg and all(w in msg for w in words)
    with pytest.raises(SystemExit) as e:  # argparse: usage block, then one error line
        train_ssl.parse_args(["--arch", "resnet999"])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument --arch: invalid choice: 'resnet999'" in last


def test_bench_throughput_smoke():
    """bench/throughput.py drives train_ssl.train_one_epoch: keep it in step with it."""
    rc, stdout, stderr = _run(["bench/throughput.py", "--method", "simclr", "--arch", "resnet18",
                               "--crop_size", "16", "--proj_hidden_dim", "64", "--batch_size", "4",
                               "6", "--steps", "1", "--warmup", "1", "--device", "cpu"])
    assert rc == 0, stderr[-3000:]
    lines = stdout.strip().splitlines()
    assert len(lines) == 2, stdout
    for line, batch in zip(lines, (4, 6)):
        fields = dict(kv.split("=") for kv in line.split())
        assert fields["method"] == "simclr" and fields["arch"] == "resnet18"
        assert fields["input"] == "16" and fields["batch"] == str(batch)
        assert fields["dtype"] == "fp32" and float(fields["img/s"]) > 0
        assert float(fields["step_ms"]) > 0 and float(fields["peak_mem_MB"]) > 0
