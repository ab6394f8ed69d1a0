"""Options of the evaluation and training scripts that their users asked for (issue 21):
fine-tuning with an MLP head, --optimizer adam and --lr_scaling none (an absolute --lr), every
--help showing its defaults, and the small ones: the MLP probe's own log line, one epoch
numbering in finetune.py, no null test accuracy in results.json, eval_compare.py's one
--num_workers for every run and the network it names. Tiny .npy data of 16px images, tiny
ViTs at random init, in this process."""
import json
import re

import pytest
import torch

import eval_compare
import eval_knn
import eval_linear
import finetune
import train_ssl
import visualize_attention
from core.optim import build_optimizer, lr_for_batch
from models import MLPClassifier
from test_eval import local, npy_root  # noqa: F401  (the fixture: 4 colour classes, 20 + 8 a class)

TINY_VIT = ["--arch", "vit_small", "--embed_dim", "32", "--depth", "2", "--num_heads", "2",
            "--patch_size", "4"]


def data(npy_root, out):
    return ["--data_path", str(npy_root), "--num_workers", "0", "--batch_size_per_gpu", "16",
            "--output_dir", str(out), "--tensorboard", "false"]


# ============ finetune.py --head mlp, --optimizer adam ============

def test_finetune_with_an_mlp_head_and_adam(npy_root, tmp_path, capsys):
    args = local(finetune.get_args_parser().parse_args(TINY_VIT + data(npy_root, tmp_path) + [
        "--head", "mlp", "--mlp_dims", "24", "12", "--optimizer", "adam", "--epochs", "1",
        "--warmup_epochs", "0", "--val_split", "16", "--save_predictions", "0"]))
    res = finetune.run_finetune(args)
    out = capsys.readouterr().out
    best = torch.load(tmp_path / "checkpoint_best.pth", weights_only=True)["model"]
    # 32-d CLS -> 24 -> 12 -> 4 labels, Linear-BN-ReLU per hidden width: eval_linear.py's MLP
    assert [tuple(best[f"head.mlp.{i}.weight"].shape) for i in (0, 3, 6)] == [(24, 32), (12, 24), (4, 12)]
    assert "head.mlp.1.running_mean" in best and "head.weight" not in best
    assert eval_linear.MLPClassifier is MLPClassifier  # one head builder, shared
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert all(g["decoupled_weight_decay"] is False for g in groups)  # Adam, not AdamW
    assert 0 <= res["test_acc"] <= 100 and "mlp head lr 1.00e-03" in out
    # one epoch, numbered alike in every line (the file's "epoch" counts finished epochs)
    assert "Epoch: [0/1]" in out and "Validation accuracy at epoch 0 on " in out
    assert "Testing the best-on-validation model (epoch 0, " in out
    assert not re.search(r"epoch 1\b", out)


def test_finetune_param_groups_give_the_mlp_head_the_head_lr():
    from models import build_backbone
    backbone, _ = build_backbone("vit_small", patch_size=4, img_size=[16], embed_dim=32, depth=2,
                                 num_heads=2)
    model = finetune.Classifier(backbone, 4, head="mlp", mlp_dims=[8])
    groups = finetune.param_groups(model, backbone_lr=1e-4, head_lr=1e-3, weight_decay=0.05,
                                   layer_decay=1.0)
    head = {id(p) for p in model.head.parameters()}
    for g in groups:
        if any(id(p) in head for p in g["params"]):
            assert all(id(p) in head for p in g["params"]) and g["base_lr"] == 1e-3
    assert sum(len(g["params"]) for g in groups if g["base_lr"] == 1e-3) == len(head)


# ============ --optimizer adam and --lr_scaling ============

def test_adam_and_the_lr_scaling_rule():
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    opt = build_optimizer("adam", [{"params": params}], torch.device("cpu"), betas=(0.9, 0.95))
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert type(build_optimizer("adamw", [{"params": params}], torch.device("cpu"))) is torch.optim.AdamW
    assert lr_for_batch(5e-4, 512) == 1e-3 and lr_for_batch(5e-4, 512, "none") == 5e-4
    with pytest.raises(ValueError, match="--lr_scaling"):
        lr_for_batch(5e-4, 512, "sqrt")
    args = train_ssl.parse_args(["--method", "simclr", "--optimizer", "adam", "--lr", "5e-4",
                                 "--lr_scaling", "none"])
    assert (args.optimizer, args.lr_scaling) == ("adam", "none")
    assert train_ssl.parse_args(["--method", "dino"]).lr_scaling == "linear"  # DINO's rule


def test_train_ssl_adam_with_an_absolute_lr(npy_root, tmp_path, capsys):
    args = train_ssl.parse_args(TINY_VIT + [
        "--method", "dino", "--global_crops_size", "16", "--local_crops_number", "0",
        "--out_dim", "32", "--dataset", "npy", "--epochs", "1", "--warmup_epochs", "0",
        "--knn_eval", "false", "--optimizer", "adam", "--lr", "1e-3", "--lr_scaling", "none",
        "--cpu"] + data(npy_root, tmp_path))
    train_ssl.train_ssl(args)
    out = capsys.readouterr().out
    assert "base lr: 1.000e-03  actual lr: 1.000e-03  global batch: 16" in out  # not 6.25e-05
    groups = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["optimizer"]["param_groups"]
    assert all(g["decoupled_weight_decay"] is False for g in groups)


@pytest.mark.parametrize("scaling,lr", [("linear", 1e-3 * 16 / 256), ("none", 1e-3)])
def test_eval_linear_lr_scaling(npy_root, tmp_path, capsys, scaling, lr):
    eval_linear.run_linear(local(eval_linear.get_args_parser().parse_args(
        TINY_VIT + data(npy_root, tmp_path) + ["--epochs", "1", "--cached_features", "true",
                                               "--n_last_blocks", "1", "--lr_scaling", scaling])))
    assert f"base lr: 1.000e-03  actual lr: {lr:.3e}" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(lr)


# ============ the probe's log and results.json ============

def test_mlp_probe_log_and_results_without_nulls(npy_root, tmp_path, capsys):
    res = eval_linear.run_linear(local(eval_linear.get_args_parser().parse_args(
        TINY_VIT + data(npy_root, tmp_path / "mlp") + [
            "--epochs", "1", "--cached_features", "true", "--n_last_blocks", "1", "--head", "mlp",
            "--mlp_dims", "16"])))
    out = capsys.readouterr().out
    assert "Training of the supervised MLP classifier on frozen features completed." in out
    assert "linear classifier" not in out
    saved = json.loads((tmp_path / "mlp" / "results.json").read_text())
    # validated on the test split itself (DINO's protocol): its best is the test number
    assert saved["test_acc"] == saved["best_acc"] == res["best_acc"]
    assert saved["selected_on"] == "test" and "null" not in (tmp_path / "mlp" / "results.json").read_text()

    eval_linear.run_linear(local(eval_linear.get_args_parser().parse_args(
        TINY_VIT + data(npy_root, tmp_path / "layers") + [
            "--epochs", "1", "--cached_features", "true", "--probe_layers", "true",
            "--val_split", "16"])))
    text = (tmp_path / "layers" / "results.json").read_text()
    saved = json.loads(text)
    assert "null" not in text and saved["selected_on"] == "val"
    assert [x["name"] for x in saved["layers"]] == ["block1", "block2"]
    assert all(x["test_acc"] is not None and x["selected_on"] == "val" for x in saved["layers"])
    assert "Training of the supervised linear classifier" in capsys.readouterr().out


# ============ eval_compare.py ============

def test_eval_compare_one_num_workers_for_every_run(monkeypatch, tmp_path):
    parse = eval_compare.get_args_parser().parse_args
    monkeypatch.setattr(eval_compare, "available_cpus", lambda: 6)
    args = parse(["--pretrained_weights", "w.pth", "--nproc_per_node", "2"])
    eval_compare.check_args(args)
    assert args.num_workers == 3  # the machine's cores per process, not 10 on 6 cores
    monkeypatch.setattr(eval_compare, "available_cpus", lambda: 64)
    args = parse(["--pretrained_weights", "w.pth"])
    eval_compare.check_args(args)
    assert args.num_workers == 10
    args = parse(["--pretrained_weights", "w.pth", "--num_workers", "2", "--evals", "all",
                  "--finetune_variants", "head", "last1", "all", "--finetune_args", "--num_workers 1"])
    eval_compare.check_args(args)
    args.arch, args.patch_size, args.image_size, args.cifar_stem = "resnet18", 16, 32, True
    assert args.evals == ["knn", "linear", "mlp", "probe_layers", "finetune"]
    runs = eval_compare.runs(args, depth=4)
    assert [name for name, _, _ in runs] == ["knn", "linear", "mlp", "probe_layers",
                                             "finetune_head", "finetune_last1", "finetune"]
    for name, script, flags in runs:
        cmd = eval_compare.command(script, flags, "w.pth", str(tmp_path), args)
        workers = [cmd[i + 1] for i, c in enumerate(cmd) if c == "--num_workers"]
        assert workers == (["2", "1"] if name.startswith("finetune") else ["2"])  # *_args: last
    with pytest.raises(SystemExit):
        parse(["--pretrained_weights", "w.pth", "--finetune_variants", "half"])


# ============ --help ============

HELP_DEFAULTS = {
    eval_knn: {"--temperature": "0.07", "--n_episodes": "10", "--checkpoint_key": "teacher"},
    eval_linear: {"--lr": "0.001", "--n_last_blocks": "4", "--head": "linear",
                  "--mlp_dims": "512 256", "--lr_scaling": "linear", "--num_workers": "10"},
    finetune: {"--backbone_lr": "0.0001", "--head": "linear", "--mlp_dims": "512 256",
               "--optimizer": "adamw", "--smoothing": "0.1"},
    eval_compare: {"--finetune_variants": "all", "--evals": "knn linear finetune",
                   "--linear_epochs": "100", "--num_workers": "min(10, the CPU cores per process)"},
    visualize_attention: {"--sample_index": "0", "--tensorboard": "false"},
}


@pytest.mark.parametrize("script", list(HELP_DEFAULTS), ids=lambda m: m.__name__)
def test_every_help_shows_its_defaults(script):
    text = script.get_args_parser().format_help()
    body = text[text.index("options:"):]
    entries = {e.split()[0]: " ".join(e.split()) for e in re.split(r"\n  (?=--)", body)[1:]}
    for flag, value in HELP_DEFAULTS[script].items():
        assert f"(default: {value})" in entries[flag], entries[flag]
    for flag, help in entries.items():  # a value, or what unset means, in its own words
        assert "default" in help.lower(), help
