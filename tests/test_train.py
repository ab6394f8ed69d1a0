"""End to end, through the command lines users type: a 2-process gloo torchrun SimCLR run on a
tiny .npy dataset, its resume, k-NN evaluation of the checkpoint, the one-line errors for bad
input, and `--help` with each method's recipe. Every training command is a subprocess with
OMP_NUM_THREADS=1 and --num_workers 0."""
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
    assert "global batch: 16 (8 x 2; --lr_scaling linear)" in first
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
        assert np.isfinite(s["train_loss"]) and s["train_acc1"] <= s["train_acc5"]
        # percent of anchors averaged over 4 steps and 2 ranks of 2 x 8 anchors each: a whole
        # number of the 128 anchors of the epoch (a fraction, or a mean over the wrong
        # count, would not be)
        for k in ("train_acc1", "train_acc5"):
            anchors = s[k] / 100 * 128
            assert anchors == pytest.approx(round(anchors), abs=1e-3), (k, s[k])
        assert s["train_wd"] == pytest.approx(1e-6)  # SimCLR's constant weight decay


def test_resume_guard_reads_the_real_checkpoint(trained, capsys):
    """The 2-process SimCLR run's checkpoint.pth: the same command resumes (more epochs are
    fine); a DINO run or another --arch in that folder stops with one line before any data."""
    import train_ssl
    from core import cli

    data, out, _ = trained
    argv = train_cmd(data, out, 5)[train_cmd(data, out, 5).index("train_ssl.py") + 1:]
    train_ssl.check_output_dir(train_ssl.parse_args(argv))
    dino = ["--method", "dino", "--arch", "vit_tiny", "--patch_size", "4", "--global_crops_size",
            "16", "--local_crops_size", "8", "--data_path", str(data), "--output_dir", str(out)]
    for bad, words in ((dino, "--method simclr, this command has --method dino"),
                       (argv + ["--arch", "resnet34"], "--arch resnet18, this command has --arch resnet34")):
        args = train_ssl.parse_args(bad)
        with pytest.raises(SystemExit) as e:
            cli.run(lambda: train_ssl.check_output_dir(args))
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err, err


def test_eval_knn_on_the_checkpoint(trained):
    data, out, _ = trained
    rc, stdout, stderr = _run(["eval_knn.py", "--pretrained_weights", str(out / "checkpoint.pth"),
                               "--dataset", "npy", "--data_path", str(data), "--nb_knn", "1", "5",
                               "--num_workers", "0"])
    assert rc == 0, stderr[-3000:]
    results = dict(re.findall(r"^(\d+)-NN classifier result: Top1: ([\d.]+), Top5: [\d.]+ \(on test/\)$",
                              stdout, re.M))
    assert set(results) == {"1", "5"}, stdout[-2000:]
    # the 4 classes differ in their bright channel (and stripes): any working feature
    # extractor separates them, so k-NN is far above chance (25 %) unless features and labels
    # got out of step
    assert all(float(v) >= 90 for v in results.values()), results


def _assert_one_line_error(proc, code, *words):
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, out[-1000:] + err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_inputs_exit_with_one_clear_line(trained, tmp_path):
    """Through `python <script>`: a library's error is one line and exit code 2, found before
    any training; a loss that turns non-finite stops training with one line and exit code 1.
    (The other bad command lines go through the same edge in this process, below.)"""
    data, _, _ = trained
    nan_out = tmp_path / "nan"
    cases = [
        (["train_ssl.py", "--dataset", "digits"], 2, ["pass --method"]),
        (["train_ssl.py", "--method", "simclr", "--data_path", str(data), "--crop_size", "16",
          "--batch_size_per_gpu", "8", "--num_workers", "0", "--tensorboard", "false",
          "--knn_eval", "false", "--output_dir", str(nan_out), "--epochs", "2",
          "--warmup_epochs", "0", "--optimizer", "sgd", "--lr", "1e30", "--print_freq", "1"], 1,
         ["not finite", "--lr"]),
    ]
    procs = [_start(cmd) for cmd, _, _ in cases]  # side by side: mostly spent importing torch
    for proc, (_, code, words) in zip(procs, cases):
        _assert_one_line_error(proc, code, *words)
    assert not (nan_out / "checkpoint.pth").exists()  # stopped without saving


# Every other bad command line, in this process through the same edge as `__main__`
# (core.cli.run around parse_args): exit code 2 and one line on stderr.
BAD_COMMAND_LINES = [
    (["--method", "byol"], ["unknown --method 'byol'", "simclr"]),
    (["--arch", "vit_small"], ["pass --method", "dino, ibot, rotation, simclr"]),
    (["--method", "simclr", "--epochs", "2", "--warmup_epochs", "2"], ["--warmup_epochs (2)"]),
    (["--method", "simclr", "--precision", "bf16", "--use_fp16", "true"],
     ["--precision bf16 contradicts --use_fp16 true"]),
    (["--method", "dino", "--precision", "fp16", "--use_fp16", "false"], ["give only one"]),
    (["--method", "dino", "--global_crops_scale", "0.5", "0.2"], ["--global_crops_scale 0.5 0.2"]),
    (["--method", "dino", "--arch", "vit_tiny", "--patch_size", "16", "--local_crops_size", "8"],
     ["--local_crops_size 8", "--patch_size 16"]),
    (["--method", "ibot", "--pred_ratio", "0.3", "--pred_ratio_var", "0.5"],
     ["--pred_ratio 0.3 with --pred_ratio_var 0.5"]),
    (["--method", "ibot", "--norm_in_head", "gn"], ["--norm_in_head gn"]),
    (["--method", "ibot", "--arch", "resnet18"], ["iBOT predicts patch tokens", "use a ViT"]),
    (["--method", "simclr", "--temperature", "0"], ["--temperature 0"]),
    (["--method", "rotation", "--crop_size", "-1"], ["--crop_size -1"]),
    (["--method", "simclr", "--data_path", "{tmp}/missing"], ["does not exist"]),
    (["--method", "simclr", "--data_path", "{tmp}/two"], ["several datasets", "cifar10, stl10"]),
    (["--method", "simclr", "--dataset", "digits", "--data_path", "{tmp}"],
     ["--dataset digits", "drop --data_path"]),
    (["--method", "simclr", "--dataset", "cifar10"], ["cifar10 needs its location"]),
    (["--method", "simclr", "--dataset", "imagefolder"], ["--data_path"]),
    (["--method", "simclr", "--data_path", "{tmp}/unknown"], ["cannot tell which dataset", "--dataset"]),
]


@pytest.mark.parametrize("argv,words", BAD_COMMAND_LINES, ids=lambda v: " ".join(v)[:50])
def test_bad_command_line_gives_exit_2_and_one_line(argv, words, tmp_path, capsys):
    import train_ssl
    from core import cli

    for name in ("cifar-10-batches-py", "stl10_binary"):
        (tmp_path / "two" / name).mkdir(parents=True)
    (tmp_path / "unknown").mkdir()
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: train_ssl.parse_args(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in words), err


def test_argparse_errors_keep_argparse_format(capsys):
    import train_ssl

    with pytest.raises(SystemExit) as e:  # argparse's error line, without the usage block
        train_ssl.parse_args(["--method", "simclr", "--arch", "resnet999"])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error: argument --arch: invalid choice: 'resnet999'" in lines[0]


# ============ recipes and --help ============

def test_every_recipe_sets_every_recipe_flag():
    import train_ssl
    from methods import METHODS, dino, ibot

    for name, method in METHODS.items():
        assert set(method.RECIPE) == set(train_ssl.RECIPE_FLAGS), name
        args = train_ssl.parse_args(["--method", name])
        assert all(getattr(args, k) == method.RECIPE[k] for k in train_ssl.RECIPE_FLAGS), name
    assert ibot.RECIPE == {**dino.RECIPE, "batch_size_per_gpu": 128, "saveckp_freq": 40}
    # a flag on the command line still beats the recipe
    assert train_ssl.parse_args(["--method", "dino", "--lr", "0.01"]).lr == 0.01


def _help_entries(method, capsys):
    """{flag: its help text, whitespace-normalised} from `--method <method> --help`."""
    import train_ssl

    with pytest.raises(SystemExit) as e:
        train_ssl.parse_args(["--method", method, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage:" in out
    body = out[out.index("options:"):]
    entries = re.split(r"\n  (?=--)", body)[1:]
    return {e.split()[0]: " ".join(e.split()) for e in entries}


@pytest.mark.parametrize("method", ["dino", "ibot"])
def test_help_shows_every_effective_default(method, capsys):
    entries = _help_entries(method, capsys)
    recipe = {"dino": dict(lr="0.0005", optimizer="adamw", batch_size_per_gpu="64",
                           out_dim="65536", saveckp_freq="20", local_crops_number="8"),
              "ibot": dict(lr="0.0005", optimizer="adamw", batch_size_per_gpu="128",
                           out_dim="8192", saveckp_freq="40", local_crops_number="0")}[method]
    for flag, value in recipe.items():
        assert f"(default: {value}" in entries[f"--{flag}"], entries[f"--{flag}"]
    assert "(default: vit_small, the method's recipe)" in entries["--arch"]
    assert "(default: 0.4 1)" in entries["--global_crops_scale"] or method == "ibot"
    # every flag states its default: a value, or (default None) in its own words
    for flag, text in entries.items():
        assert "default" in text.lower(), text


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
        assert fields["precision"] == "fp32" and float(fields["img/s"]) > 0
        assert float(fields["step_ms"]) > 0 and float(fields["peak_mem_MB"]) > 0
