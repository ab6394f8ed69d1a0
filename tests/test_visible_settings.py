"""Behaviour a user can see and set (issue 19): every boolean is a true/false flag (`--cpu` and
`--evaluate` alone still mean true), the final random-init k-NN pass and cudnn.benchmark are
flags with their defaults in --help, and each script prints its flags once they are final: the
listing equals the args its checkpoint stores. Tiny 16px .npy data, tiny ViTs, in this process."""
import json
import re

import pytest
import torch

import eval_compare
import eval_knn
import eval_linear
import finetune
import train_ssl
from test_eval import local, npy_root  # noqa: F401  (the fixture: 4 colour classes, 20 + 8 a class)

TINY_VIT = ["--arch", "vit_small", "--embed_dim", "32", "--depth", "1", "--num_heads", "2",
            "--patch_size", "4"]


def listing(args):
    """What core/cli.print_args prints for these args (a dict of them)."""
    return "\n".join(f"{k}: {v}" for k, v in sorted(args.items()))


# ============ true/false flags ============

@pytest.mark.parametrize("parse,flag", [
    (lambda argv: train_ssl.parse_args(["--method", "simclr", *argv]), "cpu"),
    (lambda argv: eval_knn.get_args_parser().parse_args(argv), "cpu"),
    (lambda argv: eval_linear.get_args_parser().parse_args(argv), "cpu"),
    (lambda argv: finetune.get_args_parser().parse_args(argv), "cpu"),
    (lambda argv: eval_compare.get_args_parser().parse_args(argv), "cpu"),
    (lambda argv: eval_linear.get_args_parser().parse_args(argv), "evaluate"),
    (lambda argv: finetune.get_args_parser().parse_args(argv), "evaluate"),
])
def test_boolean_flags_take_true_false_and_alone_mean_true(parse, flag):
    opt = f"--{flag}"
    assert parse([]).__dict__[flag] is False
    for argv, value in (([opt], True), ([opt, "true"], True), ([opt, "false"], False),
                        ([opt, "1"], True), ([opt, "no"], False)):
        assert parse(argv).__dict__[flag] is value, argv
    args = parse([opt, "--num_workers", "3"])  # alone before another flag: still true
    assert args.__dict__[flag] is True and args.num_workers == 3
    with pytest.raises(SystemExit):
        parse([opt, "maybe"])


def test_help_shows_the_new_flags_with_their_defaults(capsys):
    with pytest.raises(SystemExit):
        train_ssl.parse_args(["--method", "simclr", "--help"])
    out = capsys.readouterr().out
    entries = {e.split()[0]: " ".join(e.split())
               for e in re.split(r"\n  (?=--)", out[out.index("options:"):])[1:]}
    for flag in ("--knn_random_init", "--cudnn_benchmark"):
        assert "(default: true)" in entries[flag], entries[flag]
    assert entries["--cpu"].startswith("--cpu [CPU]") and "(`--cpu` alone: true)" in entries["--cpu"]
    assert "(default: false)" in entries["--cpu"]


# ============ the listing of the flags equals the checkpoint's args ============

def test_train_ssl_prints_the_args_its_checkpoint_stores(npy_root, tmp_path, capsys):
    """Printed after the data decided input_size and cifar_stem (they used to be set after the
    listing); --knn_random_init false scores the trained backbone only; --cudnn_benchmark sets
    torch's flag."""
    before = torch.backends.cudnn.benchmark
    try:
        args = train_ssl.parse_args(TINY_VIT + [
            "--method", "dino", "--global_crops_size", "16", "--local_crops_number", "0",
            "--out_dim", "32", "--dataset", "npy", "--data_path", str(npy_root), "--epochs", "1",
            "--warmup_epochs", "0", "--batch_size_per_gpu", "40", "--num_workers", "0",
            "--output_dir", str(tmp_path), "--tensorboard", "false", "--knn_k", "5",
            "--knn_random_init", "false", "--cudnn_benchmark", "false", "--cpu"])
        train_ssl.train_ssl(args)
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before
    out = capsys.readouterr().out
    stored = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["args"]
    assert stored["input_size"] == 16 and stored["cifar_stem"] is True  # 16px: on
    assert listing(stored) in out
    assert stored == train_ssl.vars_plain(args)  # nothing changed after the checkpoint either
    # the trained backbone's k-NN only: no second pass over the data at random init
    assert "(pretrained)" in out and "(random init)" not in out
    last = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])
    assert "knn_top1_pretrained" in last and "knn_top1_random_init" not in last


def test_eval_scripts_print_the_args_their_checkpoints_store(npy_root, tmp_path, capsys):
    common = TINY_VIT + ["--dataset", "npy", "--data_path", str(npy_root), "--num_workers", "0",
                         "--batch_size_per_gpu", "40"]
    # eval_linear.py: the model flags, precision, num_labels, output folder all resolved first
    args = local(eval_linear.get_args_parser().parse_args(common + [
        "--epochs", "1", "--n_last_blocks", "1", "--output_dir", str(tmp_path / "linear"),
        "--tensorboard", "false"]))
    eval_linear.run_linear(args)
    out = capsys.readouterr().out
    stored = torch.load(tmp_path / "linear" / "checkpoint.pth.tar", weights_only=True)["args"]
    assert stored["num_labels"] == 4 and stored["image_size"] == 16 and stored["precision"]
    assert listing(stored) in out
    # finetune.py
    args = local(finetune.get_args_parser().parse_args(common + [
        "--epochs", "1", "--warmup_epochs", "0", "--val_split", "16", "--save_predictions", "0",
        "--output_dir", str(tmp_path / "ft"), "--tensorboard", "false"]))
    finetune.run_finetune(args)
    out = capsys.readouterr().out
    stored = torch.load(tmp_path / "ft" / "checkpoint.pth", weights_only=True)["args"]
    assert stored["num_labels"] == 4 and stored["cifar_stem"] is not None
    assert listing(stored) in out
    # eval_knn.py stores no checkpoint: its listing has the flags the weights decide
    args = local(eval_knn.get_args_parser().parse_args(common + ["--nb_knn", "5"]))
    eval_knn.run_knn(args)
    out = capsys.readouterr().out
    assert listing(vars(args)) in out
    assert "\nimage_size: 16\n" in out and "\nnorm_mean: [" in out
