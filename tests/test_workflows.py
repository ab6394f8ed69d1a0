"""The five workflows of issue 21 (README's recipes, the systems this project replaces), each
run end to end at toy scale on the CPU: the commands a user types, in the order the README
gives them, with the sizes cut down (16-32px, a ViT of width 32-48 and depth 2, a few hundred
images, one epoch), and what that user would check afterwards: the model's shape, the rows of
the comparison table, the class names in the report, the per-step curves in the event files
(--print_freq 1: a point at every global step) and log_steps.txt.

Every command runs in this process as `python <script> ...` would (runpy with sys.argv, as
tests/test_vit_shape.py's ladder does); eval_compare.py's own child processes too.
"""
import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_compare

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["red", "green", "blue", "yellow"]
COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [210, 210, 40]])
RUN = ["--num_workers", "0", "--cpu"]  # every script's
EACH_STEP = ["--print_freq", 1]  # a progress line, and a point of every curve, at each step


def make_npy(root, size, splits, colours=COLOURS, names=None, seed=0):
    """uint8 NHWC arrays <root>/<split>/images.npy + labels.npy: one class per colour, a
    bright square at a random place and per-pixel noise; classes.txt with `names`."""
    rng = np.random.default_rng(seed)
    for split, n in splits.items():
        labels = np.arange(n) % len(colours)
        images = colours[labels][:, None, None, :] + rng.normal(0, 30, (n, size, size, 3))
        for img in images:
            y, x = rng.integers(0, size // 2, 2)
            img[y:y + size // 2, x:x + size // 2] += 60
        (root / split).mkdir(parents=True)
        np.save(root / split / "images.npy", images.clip(0, 255).astype(np.uint8))
        np.save(root / split / "labels.npy", labels)
    if names:
        (root / "classes.txt").write_text("\n".join(names) + "\n")
    return root


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory):
    """32px, splits train / val / test / probe (the iBOT workflow's arrays), named classes."""
    return make_npy(tmp_path_factory.mktemp("c32"), 32,
                    {"train": 128, "val": 32, "test": 32, "probe": 48}, names=NAMES)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """16px, train / val / test, named classes: the other workflows' toy CIFAR-10."""
    return make_npy(tmp_path_factory.mktemp("c16"), 16, {"train": 96, "val": 32, "test": 32},
                    names=NAMES, seed=1)


@pytest.fixture
def run(monkeypatch):
    """run(script, *flags): `python <script> <flags>` in this process, which must exit 0; also
    serves eval_compare.py's subprocess.run of the evaluation scripts."""
    def run_script(script, *flags):
        path = str(ROOT / script)
        monkeypatch.setattr(sys, "argv", [path, *map(str, flags)])
        monkeypatch.delenv("MASTER_PORT", raising=False)  # a fresh port per process group
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            assert e.code in (0, None), f"{script} exited with {e.code}"

    def child(cmd, **kwargs):
        assert cmd[0] == sys.executable and cmd[1].endswith(".py"), cmd
        run_script(Path(cmd[1]).name, *cmd[2:])
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(eval_compare.subprocess, "run", child)
    return run_script


def scalars(run_dir):
    """{tag: [(step, value)]} of the TensorBoard event files under <run_dir>/tb."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_curves(run_dir, steps, tags, epoch_tags=("train_epoch/loss",)):
    """The run's curves, as the user opens them: in TensorBoard each of `tags` has a point at
    every global step 0 .. steps-1 of the one epoch (--print_freq 1), each of `epoch_tags` one
    point, at epoch 0; every value finite; log_steps.txt holds a line per step."""
    found = scalars(run_dir)
    for tag in (*tags, *epoch_tags):
        assert tag in found, f"{tag} not among {sorted(found)}"
        assert all(math.isfinite(v) for _, v in found[tag]), (tag, found[tag])
    for tag in tags:
        assert [s for s, _ in found[tag]] == list(range(steps)), (tag, found[tag])
    for tag in epoch_tags:
        assert [s for s, _ in found[tag]] == [0], (tag, found[tag])
    lines = [json.loads(x) for x in (run_dir / "log_steps.txt").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(steps))
    return found


def table_rows(path):
    """The first cell of every row of a compare.md table."""
    return [line.split(" | ")[0][2:] for line in path.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| evaluation")]


def vit_shape(state, prefix=""):
    """(width, depth, patch size) of the ViT weights in a state dict."""
    w = state[f"{prefix}patch_embed.proj.weight"]
    depth = len({k[len(prefix):].split(".")[1] for k in state if k.startswith(f"{prefix}blocks.")})
    return w.shape[0], depth, w.shape[-1]


# ============ 1. iBOT ViT-S/4 on 32px arrays: probes, fine-tuning, per-class report ============

def test_ibot_vit_on_npy_splits_probes_finetune_and_named_report(cifar_like, tmp_path, run,
                                                                 capsys):
    pre = tmp_path / "ibot"
    run("train_ssl.py", "--method", "ibot", "--arch", "vit_small", "--embed_dim", 32, "--depth", 2,
        "--num_heads", 2, "--patch_size", 4, "--global_crops_size", 32, "--local_crops_size", 16,
        "--local_crops_number", 2, "--out_dim", 64, "--patch_out_dim", 64,
        "--data_path", cifar_like, "--batch_size_per_gpu", 32, "--epochs", 1,
        "--warmup_epochs", 0, "--knn_eval", "false", "--output_dir", pre, *EACH_STEP, *RUN)
    ckpt = torch.load(pre / "checkpoint.pth", weights_only=True)
    assert {k: ckpt["args"][k] for k in ("embed_dim", "depth", "num_heads")} == \
        {"embed_dim": 32, "depth": 2, "num_heads": 2}
    teacher = {k[len("backbone."):]: v for k, v in ckpt["teacher"].items()
               if k.startswith("backbone.")}
    assert vit_shape(teacher) == (32, 2, 4)
    assert not torch.equal(ckpt["teacher"]["backbone.cls_token"],
                           ckpt["student"]["backbone.cls_token"])  # the EMA teacher moved apart
    assert_curves(pre, 4, ["train/loss", "train/lr", "train/wd"])  # 128 images, batch 32

    weights = pre / "checkpoint.pth"
    common = ["--pretrained_weights", weights, "--data_path", cifar_like,
              "--batch_size_per_gpu", 32, *RUN]
    for head, extra in (("linear", []), ("mlp", ["--mlp_dims", 32, 16])):
        out = tmp_path / head
        run("eval_linear.py", *common, "--train_split", "probe", "--head", head, *extra,
            "--epochs", 1, "--cached_features", "true", "--n_last_blocks", 2,
            "--output_dir", out, *EACH_STEP)
        assert "Data loaded with 48 train imgs (probe/) and 32 val imgs (val/); 32 test imgs " \
               "(test/)" in capsys.readouterr().out
        res = json.loads((out / "results.json").read_text())
        assert res["splits"] == {"best_acc": "val/", "test_acc": "test/"}
        report = json.loads((out / "report.json").read_text())
        assert [r["class"] for r in report["per_class"]] == NAMES
        assert_curves(out, 2, ["train/loss", "train/lr"], ["train_epoch/loss", "val/top1_val"])
    probe = torch.load(tmp_path / "mlp" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    assert [tuple(v.shape) for k, v in probe.items() if k.endswith("weight") and v.ndim == 2] == \
        [(32, 64), (16, 32), (4, 16)]  # 2 blocks x 32 CLS -> 32 -> 16 -> 4 classes

    out = tmp_path / "ft"
    run("finetune.py", *common, "--backbone_lr", 1e-4, "--lr", 1e-3, "--epochs", 1,
        "--warmup_epochs", 0, "--save_predictions", 8, "--output_dir", out, *EACH_STEP)
    printed = capsys.readouterr().out
    assert "linear head lr 1.00e-03, backbone lr 1.00e-04" in printed
    report = (out / "report.txt").read_text()
    assert all(name in report for name in NAMES) and "precision" in report and "f1-score" in report
    per_class = json.loads((out / "report.json").read_text())["per_class"]
    assert [r["class"] for r in per_class] == NAMES
    assert {"precision", "recall", "f1"} <= set(per_class[0])
    assert (out / "predictions.png").is_file() and (out / "confusion_matrix.png").is_file()
    found = assert_curves(out, 4, ["train/loss", "train/lr_head", "train/lr_backbone"],
                          ["train_epoch/loss", "val/top1_val"])
    assert found["train/lr_head"][0][1] == pytest.approx(1e-3)  # no warmup: the set rates
    assert found["train/lr_backbone"][0][1] == pytest.approx(1e-4)


# ============ 2. SimCLR ResNet-18: linear and fine-tuning, pretrained vs scratch ============

def test_simclr_resnet18_linear_and_finetune_against_scratch_in_one_table(small, tmp_path, run):
    pre = tmp_path / "simclr"
    run("train_ssl.py", "--method", "simclr", "--arch", "resnet18", "--crop_size", 16,
        "--data_path", small, "--batch_size_per_gpu", 32, "--epochs", 1, "--warmup_epochs", 0,
        "--knn_eval", "false", "--output_dir", pre, *EACH_STEP, *RUN)
    assert_curves(pre, 3, ["train/loss", "train/lr", "train/acc1", "train/acc5"])

    out = tmp_path / "compare"
    run("eval_compare.py", "--pretrained_weights", pre / "checkpoint.pth", "--data_path", small,
        "--evals", "linear", "finetune", "--linear_epochs", 1, "--finetune_epochs", 1,
        "--batch_size_per_gpu", 32, "--finetune_args", "--save_predictions 8 --print_freq 1",
        "--linear_args", "--print_freq 1",
        "--output_dir", out, *RUN)
    assert table_rows(out / "compare.md") == [
        "linear probe top-1 (test/, 1 epoch)",
        "fine-tuning, all layers (test/, best-on-val of 1 epoch)"]
    assert "resnet18 on npy" in (out / "compare.md").read_text()
    rows = json.loads((out / "compare.json").read_text())
    for init in ("pretrained", "random_init"):  # each column is its own run's number
        ft = json.loads((out / init / "finetune" / "results.json").read_text())
        assert rows["finetune"][init] == ft["test_acc"]
        assert (out / init / "finetune" / "predictions.png").is_file()
        assert_curves(out / init / "finetune", 3, ["train/loss", "train/lr_head"],
                      ["train_epoch/loss", "val/top1_val"])
        assert_curves(out / init / "linear", 3, ["train/loss", "train/lr"],
                      ["train_epoch/loss", "val/top1_val"])
    assert (out / "compare.png").is_file()


# ============ 3. SimCLR ResNet-18, the 128px recipe's flags; an MLP fine-tuning head ============

def test_simclr_128px_recipe_flags_and_an_mlp_head(small, tmp_path, run, capsys):
    pre = tmp_path / "simclr"
    run("train_ssl.py", "--method", "simclr", "--arch", "resnet18", "--crop_size", 16,
        "--proj_hidden_dim", 512, "--proj_output_dim", 256, "--temperature", 0.07,
        "--optimizer", "adam", "--lr", 5e-4, "--lr_scaling", "none", "--weight_decay", 1e-6,
        "--weight_decay_end", 1e-6, "--data_path", small, "--batch_size_per_gpu", 32,
        "--epochs", 1, "--warmup_epochs", 0, "--knn_eval", "false", "--output_dir", pre,
        *EACH_STEP, *RUN)
    assert "base lr: 5.000e-04  actual lr: 5.000e-04  global batch: 32" in capsys.readouterr().out
    ckpt = torch.load(pre / "checkpoint.pth", weights_only=True)
    assert (ckpt["args"]["temperature"], ckpt["args"]["optimizer"]) == (0.07, "adam")
    head = [tuple(v.shape) for k, v in ckpt["model"].items()
            if k.startswith("head.") and k.endswith("weight") and v.ndim == 2]
    assert head == [(512, 512), (256, 512)]  # the projection 512-512-256
    records = [json.loads(x) for x in (pre / "log.txt").read_text().splitlines()]
    assert 0 <= records[0]["train_acc1"] <= records[0]["train_acc5"] <= 100
    assert_curves(pre, 3, ["train/acc5", "train/loss"])  # top-5 contrastive accuracy per step

    out = tmp_path / "ft"
    run("finetune.py", "--pretrained_weights", pre / "checkpoint.pth", "--data_path", small,
        "--head", "mlp", "--mlp_dims", 512, "--epochs", 1, "--warmup_epochs", 0,
        "--batch_size_per_gpu", 32, "--save_predictions", 8, "--output_dir", out, *EACH_STEP,
        *RUN)
    model = torch.load(out / "checkpoint_best.pth", weights_only=True)["model"]
    head = [tuple(v.shape) for k, v in model.items()
            if k.startswith("head.") and k.endswith("weight") and v.ndim == 2]
    assert head == [(512, 512), (4, 512)]  # the 512-512-classes head
    assert [r["class"] for r in json.loads((out / "report.json").read_text())["per_class"]] == NAMES
    assert_curves(out, 3, ["train/loss", "train/lr_head"], ["train_epoch/loss", "val/top1_val"])


# ============ 4. Rotation prediction with a ViT of any shape; the ladder in one table ============

def test_rotation_vit_shape_and_the_ladder(small, tmp_path, run):
    pre = tmp_path / "rotation"
    run("train_ssl.py", "--method", "rotation", "--arch", "vit_small", "--embed_dim", 32,
        "--depth", 2, "--num_heads", 4, "--patch_size", 4, "--crop_size", 16,
        "--optimizer", "adamw", "--adamw_betas", 0.9, 0.95, "--lr", 1.5e-4, "--weight_decay", 0.05,
        "--weight_decay_end", 0.05, "--data_path", small, "--batch_size_per_gpu", 32,
        "--epochs", 1, "--warmup_epochs", 0, "--knn_eval", "false", "--output_dir", pre,
        *EACH_STEP, *RUN)
    ckpt = torch.load(pre / "checkpoint.pth", weights_only=True)
    assert vit_shape(ckpt["model"], "backbone.") == (32, 2, 4)
    assert ckpt["args"]["num_heads"] == 4
    assert tuple(ckpt["optimizer"]["param_groups"][0]["betas"]) == (0.9, 0.95)
    assert_curves(pre, 3, ["train/loss", "train/lr"])

    out = tmp_path / "ladder"
    run("eval_compare.py", "--pretrained_weights", pre / "checkpoint.pth", "--data_path", small,
        "--evals", "linear", "probe_layers", "finetune",
        "--finetune_variants", "head", "last1", "last2", "--linear_epochs", 1,
        "--finetune_epochs", 1, "--batch_size_per_gpu", 32,
        "--finetune_args", "--save_predictions 0 --tensorboard false",
        "--linear_args", "--tensorboard false", "--output_dir", out, *RUN)
    assert table_rows(out / "compare.md") == [
        "linear probe top-1 (test/, 1 epoch)",
        "linear probe of block1 (test/, 1 epoch)", "linear probe of block2 (test/, 1 epoch)",
        "fine-tuning, head only (test/, best-on-val of 1 epoch)",
        "fine-tuning, last 1 block + head (test/, best-on-val of 1 epoch)",
        "fine-tuning, last 2 blocks + head (test/, best-on-val of 1 epoch)"]
    text = (out / "compare.md").read_text()
    assert "| evaluation | pretrained | random init | difference |" in text  # the scratch column
    assert "vit_small (embed_dim 32, depth 2, num_heads 4) on npy" in text
    run_args = torch.load(out / "random_init" / "finetune_last1" / "checkpoint.pth",
                          weights_only=True)["args"]
    assert (run_args["embed_dim"], run_args["depth"], run_args["num_heads"]) == (32, 2, 4)
    assert run_args["pretrained_weights"] == ""  # the from-scratch baseline


# ============ 5. DINO ViT-Tiny: k-NN both votes, linear, transfer, few-shot, attention ============

def test_dino_vit_tiny_knn_votes_transfer_few_shot_and_attention(small, tmp_path, run, capsys):
    pre = tmp_path / "dino"
    run("train_ssl.py", "--method", "dino", "--arch", "vit_tiny", "--embed_dim", 48, "--depth", 2,
        "--patch_size", 4, "--global_crops_size", 16, "--local_crops_size", 8,
        "--local_crops_number", 2, "--out_dim", 64, "--data_path", small,
        "--batch_size_per_gpu", 32, "--epochs", 1, "--warmup_epochs", 0, "--knn_eval", "false",
        "--output_dir", pre, *EACH_STEP, *RUN)
    weights = pre / "checkpoint.pth"
    ckpt = torch.load(weights, weights_only=True)
    assert ckpt["args"]["local_crops_number"] == 2 and ckpt["args"]["arch"] == "vit_tiny"
    assert vit_shape(ckpt["teacher"], "backbone.") == (48, 2, 4)
    assert_curves(pre, 3, ["train/loss", "train/lr", "train/teacher_entropy"])

    out = tmp_path / "compare"
    run("eval_compare.py", "--pretrained_weights", weights, "--data_path", small,
        "--evals", "knn", "linear", "--knn_k", 5, "--knn_votes", "weighted", "majority",
        "--linear_epochs", 1, "--batch_size_per_gpu", 32, "--output_dir", out, *RUN)
    assert table_rows(out / "compare.md") == [
        "5-NN top-1 (test/)", "5-NN top-1, majority vote (test/)",
        "linear probe top-1 (test/, 1 epoch)"]
    knn = {vote: json.loads((out / "pretrained" / key / "results.json").read_text())
           for vote, key in (("weighted", "knn"), ("majority", "knn_majority"))}
    assert {v: r["vote"] for v, r in knn.items()} == {v: v for v in ("weighted", "majority")}

    # transfer to another dataset (3 other colours): the CLS token against mean-pooled patches
    other = make_npy(tmp_path / "other", 16, {"train": 48, "test": 24},
                     colours=np.array([[120, 60, 200], [250, 140, 20], [20, 160, 160]]), seed=3)
    dims = {}
    for name, flags in (("cls", []), ("patches", ["--use_cls", "false", "--n_last_blocks", 2]),
                        ("avgpool", ["--avgpool_patchtokens", 1])):
        run("eval_knn.py", "--pretrained_weights", weights, "--data_path", other, "--nb_knn", 5,
            "--dump_features", tmp_path / name, "--output_dir", tmp_path / f"knn_{name}", *flags,
            *RUN)
        res = json.loads((tmp_path / f"knn_{name}" / "results.json").read_text())
        assert 0 <= res["knn"]["5"][0] <= 100 and res["split"] == "test/"
        dims[name] = torch.load(tmp_path / name / "features.pth",
                                weights_only=True)["train_features"].shape
    assert dims == {"cls": (48, 48), "patches": (48, 96), "avgpool": (48, 48)}

    # 5-shot 1-NN, majority vote too
    run("eval_knn.py", "--pretrained_weights", weights, "--data_path", small, "--n_shot", 5,
        "--nb_knn", 1, "--n_episodes", 3, "--knn_vote", "majority",
        "--output_dir", tmp_path / "fewshot", *RUN)
    res = json.loads((tmp_path / "fewshot" / "results.json").read_text())
    assert set(res["few_shot"]) == {"1-NN"} and len(res["few_shot"]["1-NN"]["accs"]) == 3
    assert "5-shot 1-NN classifier result" in capsys.readouterr().out

    # attention maps and masks per head (vit_tiny: 3 heads)
    attn = tmp_path / "attn"
    run("visualize_attention.py", "--pretrained_weights", weights, "--data_path", small,
        "--threshold", 0.6, "--output_dir", attn)
    for j in range(3):
        assert (attn / f"attn-head{j}.png").is_file()
        assert (attn / f"mask_th0.6_head{j}.png").is_file()
    assert not (attn / "attn-head3.png").exists() and (attn / "attention.png").is_file()
