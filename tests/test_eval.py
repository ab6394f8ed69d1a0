"""CPU tests of the evaluation suite: eval_linear.py (frozen-backbone check, a probe that learns,
layer-wise probes), finetune.py (exactly the asked layers train, layer decay, mixup, the test
report equals scikit-learn's), eval_knn.py few-shot and patch-token features, eval_compare.py,
and one-line errors. Tiny .npy datasets of 16px images; runs in-process where possible."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import eval_knn
import eval_linear
import finetune
from core.report import classification_metrics, format_report
from models import build_backbone

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLASSES = 4


@pytest.fixture(scope="module")
def npy_root(tmp_path_factory):
    """4 classes told apart by colour (plus noise): 20 train and 8 test images per class."""
    root = tmp_path_factory.mktemp("npy")
    rng = np.random.default_rng(0)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [200, 200, 40]])
    for split, per_class in (("train", 20), ("test", 8)):
        labels = np.repeat(np.arange(CLASSES), per_class)
        images = colours[labels][:, None, None, :] + rng.normal(0, 25, (len(labels), 16, 16, 3))
        (root / split).mkdir()
        np.save(root / split / "images.npy", images.clip(0, 255).astype(np.uint8))
        np.save(root / split / "labels.npy", labels)
    return root


def local(args):
    """The distributed state of a single process without a process group."""
    args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
    args.device = torch.device("cpu")
    return args


def linear_args(npy_root, out, *extra):
    return local(eval_linear.get_args_parser().parse_args(
        ["--arch", "resnet18", "--cifar_stem", "true", "--dataset", "npy", "--data_path", str(npy_root),
         "--num_workers", "0", "--batch_size_per_gpu", "16", "--output_dir", str(out),
         "--tensorboard", "false", *extra]))


def one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert msg.startswith("error:") and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


# ============ eval_linear.py ============

def test_sanity_check_catches_changed_weights_and_buffers():
    model, _ = build_backbone("resnet18", cifar_stem=True)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    eval_linear.sanity_check(model, snapshot)  # unchanged: passes
    with torch.no_grad():
        model.layer4[1].conv2.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(AssertionError, match="layer4.1.conv2.weight"):
        eval_linear.sanity_check(model, snapshot)
    model.load_state_dict(snapshot)
    model.bn1.running_mean += 1.0  # a BatchNorm left in train mode would do this
    with pytest.raises(AssertionError, match="bn1.running_mean"):
        eval_linear.sanity_check(model, snapshot)


def test_linear_probe_learns_separable_problem_with_frozen_backbone(npy_root, tmp_path, capsys):
    args = linear_args(npy_root, tmp_path, "--cached_features", "true", "--epochs", "15", "--lr", "2.0")
    res = eval_linear.run_linear(args)
    out = capsys.readouterr().out
    assert "sanity check passed" in out and "Top-1 test accuracy" in out
    assert res["best_acc"] >= 95.0  # random-init features separate the four colours
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 15 and ckpt["state_dict"]["linear.weight"].shape == (CLASSES, 512)  # DINO's keys
    assert 0.005 < ckpt["state_dict"]["linear.weight"].std() < 1.0
    # --evaluate reads it back, also in DINO's released layout ('module.linear.*')
    torch.save({"state_dict": {f"module.{k}": v for k, v in ckpt["state_dict"].items()}}, tmp_path / "dino.pth")
    args = linear_args(npy_root, tmp_path, "--evaluate", "--linear_weights", str(tmp_path / "dino.pth"))
    last = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])
    assert eval_linear.run_linear(args)["best_acc"] == pytest.approx(last["test_acc1"])  # the last epoch's head


def test_frozen_check_runs_in_every_training_run(npy_root, tmp_path, monkeypatch):
    """Augmented (non-cached) training with the MLP head: a training step that moved the
    backbone must be caught by the check inside run_linear."""
    original = eval_linear.train_one_epoch

    def moving(model, *a, **kw):
        stats = original(model, *a, **kw)
        with torch.no_grad():
            model.conv1.weight.mul_(1.01)
        return stats
    monkeypatch.setattr(eval_linear, "train_one_epoch", moving)
    args = linear_args(npy_root, tmp_path, "--epochs", "1", "--head", "mlp", "--mlp_dims", "32")
    with pytest.raises(AssertionError, match="conv1.weight is changed"):
        eval_linear.run_linear(args)


def test_probe_shapes():
    probe = eval_linear.Probe([8, 8, 16], num_labels=5, head="mlp", mlp_dims=[12, 6])
    outs = probe(torch.randn(4, 32))
    assert [o.shape for o in outs] == [(4, 5)] * 3
    assert [type(m).__name__ for m in probe.heads[2].mlp] == ["Linear", "BatchNorm1d", "ReLU", "Linear",
                                                              "BatchNorm1d", "ReLU", "Linear"]


@pytest.mark.parametrize("arch,names,dims", [
    ("vit_tiny", [f"block{i}" for i in range(1, 13)], [192] * 12),
    ("resnet18", ["layer1", "layer2", "layer3", "layer4"], [64, 128, 256, 512])])
def test_layerwise_probe_table_and_plot(npy_root, tmp_path, arch, names, dims):
    args = linear_args(npy_root, tmp_path, "--arch", arch, "--patch_size", "4", "--probe_layers", "true",
                       "--cached_features", "true", "--epochs", "2", "--val_split", "16")
    res = eval_linear.run_linear(args)
    assert [x["name"] for x in res["layers"]] == names and [x["dim"] for x in res["layers"]] == dims
    assert all(0 <= x["test_acc"] <= 100 for x in res["layers"])  # best-on-val heads, on test
    table = (tmp_path / "probe_layers.md").read_text().splitlines()
    assert len(table) == 2 + len(names) and table[2].startswith(f"| {names[0]} | {dims[0]} |")
    png = Image.open(tmp_path / "probe_layers.png")
    assert png.format == "PNG" and png.size[0] > 40 * len(names)


def test_feature_batches_cover_each_item_once_and_are_seeded():
    feats, labels = torch.arange(50.).view(25, 2), torch.arange(25)
    fb = eval_linear.FeatureBatches(feats, labels, batch_size=8, seed=3)
    seen = torch.cat([y for _, y in fb])
    assert len(fb) == 4 and sorted(seen.tolist()) == list(range(25))
    assert torch.equal(seen, torch.cat([y for _, y in fb]))  # same epoch, same order
    fb.set_epoch(1)
    assert not torch.equal(seen, torch.cat([y for _, y in fb]))


def test_avgpool_flag_accepts_dino_and_ibot_values():
    p = eval_linear.get_args_parser()
    assert [p.parse_args(["--avgpool_patchtokens", v]).avgpool_patchtokens
            for v in ("false", "true", "0", "1", "2")] == [0, 2, 0, 1, 2]
    assert p.parse_args([]).n_last_blocks == 4 and p.parse_args([]).lr == 0.001


# ============ finetune.py ============

def small_vit():
    return build_backbone("vit_tiny", patch_size=4, img_size=[16])[0]


@pytest.mark.parametrize("kwargs,expected", [
    (dict(unfreeze_last_blocks=2), lambda n: n.startswith(("blocks.10.", "blocks.11.", "norm."))),
    (dict(unfreeze_last_blocks=0), lambda n: False),
    (dict(unfreeze_last_blocks=-1), lambda n: True),
    (dict(unfreeze_layers=["blocks.0", "pos_embed"]), lambda n: n.startswith("blocks.0.") or n == "pos_embed"),
])
def test_vit_freezes_exactly_the_asked_layers(kwargs, expected):
    model = small_vit()
    trainable = finetune.set_trainable(model, **kwargs)
    names = [n for n, _ in model.named_parameters()]
    assert trainable == [n for n in names if expected(n)]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


def test_resnet_partial_finetune_step_moves_only_unfrozen_layers():
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", cifar_stem=True)
    model = finetune.Classifier(backbone, CLASSES)
    trainable = finetune.set_trainable(backbone, unfreeze_layers=["layer4", "bn1"])
    assert trainable and all(n.startswith(("layer4.", "bn1.")) for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(finetune.param_groups(model, 1e-2, 1e-2, 0.05, 1.0), lr=1e-2)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"]
    finetune.train_mode(model)
    assert not model.backbone.layer1.training and not model.backbone.layer3[1].bn2.training
    assert model.backbone.layer4.training and model.backbone.bn1.training
    loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 16, 16)), torch.arange(8) % CLASSES)
    loss.backward()
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        moved = not torch.equal(v, after[k])
        should_move = k.startswith(("backbone.layer4.", "backbone.bn1.", "head.")) and "num_batches" not in k
        if k.endswith("num_batches_tracked"):
            continue
        assert moved == should_move, k  # frozen weights and frozen BN statistics stay put


def test_resnet_unfreeze_last_blocks_and_bad_names():
    backbone, _ = build_backbone("resnet18")
    assert {n.split(".")[0] for n in finetune.set_trainable(backbone, unfreeze_last_blocks=1)} == {"layer4"}
    assert {n.split(".")[0] for n in finetune.set_trainable(backbone, 2)} == {"layer3", "layer4"}
    with pytest.raises(SystemExit) as e:
        finetune.set_trainable(backbone, unfreeze_layers=["layer9"])
    one_line_error(e, "layer9", "layer4")
    with pytest.raises(SystemExit) as e:
        finetune.set_trainable(backbone, unfreeze_last_blocks=5)
    one_line_error(e, "0..4")


def test_layer_decay_learning_rates_and_weight_decay():
    model = finetune.Classifier(small_vit(), CLASSES)
    groups = finetune.param_groups(model, backbone_lr=1e-4, head_lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): (g["base_lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    L = 13  # 12 blocks + 1
    assert lr_of[id(named["backbone.patch_embed.proj.weight"])] == (1e-4 * 0.5 ** L, 0.05)
    assert lr_of[id(named["backbone.pos_embed"])] == (1e-4 * 0.5 ** L, 0.0)
    assert lr_of[id(named["backbone.cls_token"])][1] == 0.0
    assert lr_of[id(named["backbone.blocks.0.attn.qkv.weight"])] == (1e-4 * 0.5 ** 12, 0.05)
    assert lr_of[id(named["backbone.blocks.11.mlp.fc1.bias"])] == (1e-4 * 0.5, 0.0)
    assert lr_of[id(named["backbone.norm.weight"])] == (1e-4, 0.0)
    assert lr_of[id(named["head.weight"])] == (1e-3, 0.05)
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_mixup_and_cutmix_targets():
    np.random.seed(0)
    x = torch.arange(4.).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    t = torch.tensor([0, 1, 2, 3])
    off = argparse.Namespace(mixup=0.0, cutmix=0.0, mixup_prob=1.0, mixup_switch_prob=0.5, smoothing=0.1)
    xs, soft = finetune.mix_batch(x, t, 4, off)
    assert torch.equal(xs, x) and torch.allclose(soft.sum(1), torch.ones(4))
    assert soft[0].tolist() == pytest.approx([0.925, 0.025, 0.025, 0.025])
    for _ in range(5):
        cut = argparse.Namespace(**{**vars(off), "cutmix": 1.0, "smoothing": 0.0})
        xs, soft = finetune.mix_batch(x, t, 4, cut)
        pasted = (xs[0, 0] != x[0, 0]).float().mean().item()  # image 0 got pixels of image 3
        assert torch.all((xs[0] == 0) | (xs[0] == 3))
        assert soft[0, 0].item() == pytest.approx(1 - pasted) and soft[0, 3].item() == pytest.approx(pasted)
    mix = argparse.Namespace(**{**vars(off), "mixup": 0.8, "smoothing": 0.0})
    xs, soft = finetune.mix_batch(x, t, 4, mix)
    lam = soft[0, 0].item()
    assert torch.allclose(xs[0], lam * x[0] + (1 - lam) * x[3], atol=1e-6)


def test_report_numbers_equal_sklearn():
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)
    y_true[y_true == 3] = 2  # class 3 never occurs in the test labels
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 4, 200))
    m = classification_metrics(y_true, y_pred, 4, ["a", "b", "c", "d"])
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2, 3], zero_division=0)
    assert m["accuracy"] == pytest.approx(100 * (y_true == y_pred).mean())
    assert [c["precision"] for c in m["per_class"]] == pytest.approx(p.tolist())
    assert [c["recall"] for c in m["per_class"]] == pytest.approx(r.tolist())
    assert [c["f1"] for c in m["per_class"]] == pytest.approx(f.tolist())
    assert [c["support"] for c in m["per_class"]] == s.tolist() and s[3] == 0
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=[0, 1, 2, 3]).tolist()
    text = format_report(m)
    assert "Confusion matrix" in text and "macro avg" in text


def test_finetune_end_to_end_report_and_prediction_grid(npy_root, tmp_path, capsys):
    """From-scratch baseline (no --pretrained_weights): best-on-val checkpoint, test report
    equal to sklearn on the predictions of that checkpoint, and the prediction PNG."""
    args = local(finetune.get_args_parser().parse_args(
        ["--arch", "resnet18", "--cifar_stem", "true", "--dataset", "npy", "--data_path", str(npy_root),
         "--epochs", "2", "--warmup_epochs", "1", "--batch_size_per_gpu", "16", "--val_split", "16",
         "--num_workers", "0", "--output_dir", str(tmp_path), "--save_predictions", "6",
         "--unfreeze_last_blocks", "1", "--tensorboard", "false"]))
    res = finetune.run_finetune(args)
    out = capsys.readouterr().out
    assert "from-scratch baseline" in out and "Confusion matrix" in out
    report = json.loads((tmp_path / "report.json").read_text())
    # recompute the predictions of the saved best model and score them with sklearn
    from sklearn.metrics import f1_score, precision_score
    best = torch.load(tmp_path / "checkpoint_best.pth", weights_only=True)
    from core.checkpoint import load_file
    assert load_file(str(tmp_path / "checkpoint.pth"))["epoch"] == 2  # resumable (weights_only)
    backbone, _ = build_backbone("resnet18", cifar_stem=True)
    model = finetune.Classifier(backbone, CLASSES)
    model.load_state_dict(best["model"])
    from data import build_dataset, dataset_info, eval_transform
    info = dataset_info("npy", str(npy_root))
    test = build_dataset("npy", str(npy_root), "test", eval_transform(16, info.mean, info.std))
    preds = finetune.predict(model, test, args).argmax(1).numpy()
    y = np.asarray(test.targets)
    assert res["test_acc"] == pytest.approx(100 * (preds == y).mean())
    assert [c["precision"] for c in report["per_class"]] == pytest.approx(
        precision_score(y, preds, average=None, labels=range(CLASSES), zero_division=0).tolist())
    assert report["macro_avg"]["f1"] == pytest.approx(f1_score(y, preds, average="macro", zero_division=0))
    assert np.asarray(report["confusion_matrix"]).sum() == len(test)
    png = Image.open(tmp_path / "predictions.png")
    assert png.size == (6 * 128, 128 + 45)  # 6 panels of 128 px in a row, a caption band each
    assert Image.open(tmp_path / "confusion_matrix.png").size[0] > 300
    assert (tmp_path / "curves.png").is_file()


# ============ eval_knn.py: few-shot and patch-token features ============

def test_few_shot_sampling_is_balanced_and_seeded():
    labels = np.array([0] * 10 + [1] * 7 + [2] * 5 + [-1] * 4)
    a = eval_knn.sample_few_shot(labels, 3, seed=1)
    assert np.bincount(labels[a]).tolist() == [3, 3, 3] and len(set(a.tolist())) == 9
    assert np.array_equal(a, eval_knn.sample_few_shot(labels, 3, seed=1))
    assert not np.array_equal(a, eval_knn.sample_few_shot(labels, 3, seed=2))
    with pytest.raises(SystemExit) as e:
        eval_knn.sample_few_shot(labels, 6, seed=0)
    one_line_error(e, "class 2", "--n_shot")


def test_few_shot_eval_mean_std_and_logreg():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 3
    train_y, test_y = torch.arange(60) % 3, torch.arange(30) % 3
    train_f = nn.functional.normalize(centers[train_y] + torch.randn(60, 16, generator=g), dim=1)
    test_f = nn.functional.normalize(centers[test_y] + torch.randn(30, 16, generator=g), dim=1)
    res = eval_knn.few_shot_eval(train_f, train_y, test_f, test_y, 3, n_shot=2, n_episodes=4,
                                 nb_knn=[1, 2], logreg=True, seed=5)
    assert set(res) == {"1-NN", "2-NN", "logreg"}
    manual = []
    for e in range(4):
        idx = eval_knn.sample_few_shot(train_y.numpy(), 2, 5 + e)
        manual.append(eval_knn.knn_classifier(train_f[idx], train_y[idx], test_f, test_y, 1, 0.07, 3)[0])
    assert res["1-NN"]["accs"] == pytest.approx(manual)
    assert res["1-NN"]["mean"] == pytest.approx(np.mean(manual))
    assert res["1-NN"]["std"] == pytest.approx(np.std(manual, ddof=1))
    assert res["logreg"]["mean"] > 80 and res["1-NN"]["mean"] > 80


def test_use_cls_false_mean_pools_patch_tokens_of_last_blocks():
    model = small_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        f = eval_knn.feature_function(n_last_blocks=2, use_cls=False)(model, x)
        layers = model.get_intermediate_layers(x, 2)
    assert f.shape == (2, 2 * 192)
    assert torch.allclose(f, torch.cat([layers[0][:, 1:].mean(1), layers[1][:, 1:].mean(1)], 1))
    args = eval_knn.get_args_parser().parse_args(["--use_cls", "false", "--avgpool_patchtokens", "1"])
    with pytest.raises(SystemExit) as e:
        eval_knn.check_args(args)
    one_line_error(e, "--use_cls false")


def test_eval_knn_full_and_few_shot(npy_root, capsys):
    common = ["--arch", "resnet18", "--dataset", "npy", "--data_path", str(npy_root), "--num_workers", "0"]
    res = eval_knn.run_knn(local(eval_knn.get_args_parser().parse_args(common + ["--nb_knn", "5"])))
    assert "5-NN classifier result: Top1:" in capsys.readouterr().out  # DINO's line
    assert res["knn"][5][0] > 90
    args = local(eval_knn.get_args_parser().parse_args(
        common + ["--n_shot", "2", "--n_episodes", "3", "--logreg", "true"]))
    res = eval_knn.run_knn(args)
    assert set(res["few_shot"]) == {"1-NN", "2-NN", "logreg"}
    assert "2-shot 1-NN classifier result: Top1:" in capsys.readouterr().out


# ============ eval_compare.py and one-line errors from the command line ============

def test_eval_compare_writes_side_by_side_table(npy_root, tmp_path):
    torch.manual_seed(1)
    backbone, _ = build_backbone("resnet18", cifar_stem=True)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"model": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                "args": {"arch": "resnet18", "cifar_stem": True, "input_size": 16, "patch_size": 16}}, ckpt)
    out = tmp_path / "cmp"
    cmd = [sys.executable, "eval_compare.py", "--pretrained_weights", str(ckpt), "--dataset", "npy",
           "--data_path", str(npy_root), "--linear_epochs", "2", "--finetune_epochs", "1",
           "--batch_size_per_gpu", "16", "--num_workers", "0", "--output_dir", str(out),
           "--finetune_args", "--val_split 16 --save_predictions 0 --unfreeze_last_blocks 1"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (out / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "evaluation" not in line]
    assert len(rows) == 3 and rows[0].startswith("| 20-NN top-1")
    results = json.loads((out / "compare.json").read_text())
    for name in ("knn", "linear", "finetune"):
        p, q = results[name]["pretrained"], results[name]["random_init"]
        assert f"| {p:.2f} | {q:.2f} | {p - q:+.2f} |" in table
    assert (out / "tb" / "pretrained").is_dir() and (out / "random_init" / "linear" / "log.txt").is_file()


def test_bad_input_gives_one_clear_line_on_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "finetune.py", "--output_dir", str(tmp_path), "--epochs", "2",
                        "--warmup_epochs", "2"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error:")
    assert "--warmup_epochs" in r.stderr


def test_bad_inputs_in_process(npy_root, tmp_path):
    with pytest.raises(SystemExit) as e:
        eval_linear.run_linear(linear_args(npy_root, tmp_path, "--epochs", "0"))
    one_line_error(e, "--epochs")
    with pytest.raises(SystemExit) as e:
        eval_linear.run_linear(linear_args(npy_root, tmp_path, "--pretrained_weights", str(tmp_path / "no.pth")))
    one_line_error(e, "does not exist")
    p = finetune.get_args_parser()
    for flags, word in ((["--layer_decay", "1.5"], "--layer_decay"),
                        (["--unfreeze_layers", "layer4", "--unfreeze_last_blocks", "1"], "pick one")):
        with pytest.raises(SystemExit) as e:
            finetune.check_args(p.parse_args(flags))
        one_line_error(e, word)
    with pytest.raises(SystemExit) as e:
        eval_knn.check_args(eval_knn.get_args_parser().parse_args(["--n_shot", "-1"]))
    one_line_error(e, "--n_shot")
