"""CPU tests of the evaluation suite: eval_linear.py (frozen-backbone check, a probe that learns,
layer-wise probes), finetune.py (exactly the asked layers train, layer decay, mixup, the test
report equals scikit-learn's), eval_knn.py few-shot and patch-token features, eval_compare.py,
core/eval_args.py, model_flags.py, eval_runs.py (model flags from a checkpoint read once, output
folders, the resume guard, no script importing another), and one-line errors with exit code 2.
Tiny .npy datasets of 16px images; runs in-process where possible."""
import argparse
import ast
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import eval_compare
import eval_knn
import eval_linear
import finetune
from core import eval_args, eval_runs, model_flags
from core.cli import error_message
from core.features import feature_function
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
    """The line core/cli.py prints for the exception: one line naming the problem."""
    msg = error_message(excinfo.value)
    assert msg.startswith("error: ") and "\n" not in str(excinfo.value), msg
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
    build, train = eval_linear.build_frozen_backbone, eval_linear.train_one_epoch
    backbone = []

    def building(*a, **kw):
        built = build(*a, **kw)
        backbone.append(built[0])
        return built

    def moving(*a, **kw):
        stats = train(*a, **kw)
        with torch.no_grad():
            backbone[0].conv1.weight.mul_(1.01)
        return stats
    monkeypatch.setattr(eval_linear, "build_frozen_backbone", building)
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
    with pytest.raises(ValueError) as e:
        finetune.set_trainable(backbone, unfreeze_layers=["layer9"])
    one_line_error(e, "layer9", "layer4")
    with pytest.raises(ValueError) as e:
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


def _timm_smooth_one_hot(t, c, smoothing):  # timm's one_hot(..., on=1 - s + s/C, off=s/C)
    return torch.full((len(t), c), smoothing / c).scatter_(1, t.view(-1, 1), 1 - smoothing + smoothing / c)


class _FixedLam:  # stands in for v2's Beta sampler: a fixed lambda
    def __init__(self, lam):
        self.lam = lam

    def sample(self, shape=()):
        return torch.tensor(self.lam)


def test_mixing_equals_timm_for_a_fixed_lambda_and_box():
    """finetune.build_mixing (torchvision.transforms.v2) mixes as the former timm-style code did:
    for a fixed lambda, MixUp blends image and labels with the partner (image i - 1); for a
    fixed lambda and box centre, CutMix pastes exactly timm's box (side int(H * sqrt(1 - lam)),
    half of it either side of the centre, clipped to the image) and weights the labels by the
    box's true area; and the loss with nn.CrossEntropyLoss(label_smoothing=) equals the soft
    cross-entropy on timm's targets, smoothed before mixing."""
    from torchvision.transforms import v2
    b, c, side = 4, 4, 16
    x = torch.randn(b, 3, side, side)
    t = torch.tensor([0, 1, 2, 3])
    partner = torch.roll(torch.arange(b), 1)
    logits = torch.randn(b, c)
    ref_loss = lambda soft: torch.sum(-soft * torch.log_softmax(logits, -1), -1).mean()
    off = argparse.Namespace(mixup=0.0, cutmix=0.0, mixup_prob=1.0, mixup_switch_prob=0.5,
                             smoothing=0.1, num_labels=c)
    xs, ts = finetune.build_mixing(off, c)(x, t)
    assert xs is x and ts is t
    ce = nn.CrossEntropyLoss(label_smoothing=0.1)
    torch.testing.assert_close(ce(logits, t), ref_loss(_timm_smooth_one_hot(t, c, 0.1)))
    for lam in (0.05, 0.3, 0.5, 0.77, 0.98):
        mix = finetune.build_mixing(argparse.Namespace(**{**vars(off), "mixup": 0.8}), c)
        assert isinstance(mix, v2.MixUp) and mix.alpha == 0.8
        mix._dist = _FixedLam(lam)
        xs, soft = mix(x, t)
        torch.testing.assert_close(xs, lam * x + (1 - lam) * x[partner])
        y = _timm_smooth_one_hot(t, c, 0.1)
        torch.testing.assert_close(ce(logits, soft), ref_loss(lam * y + (1 - lam) * y[partner]))
        cut = finetune.build_mixing(argparse.Namespace(**{**vars(off), "cutmix": 1.0}), c)
        assert isinstance(cut, v2.CutMix) and cut.alpha == 1.0
        cut._dist = _FixedLam(lam)
        for seed in range(4):
            torch.manual_seed(seed)
            cx, cy = (int(torch.randint(side, (1,))) for _ in range(2))  # v2's centre: x, y
            torch.manual_seed(seed)
            xs, soft = cut(x, t)
            cut_side = int(side * math.sqrt(1 - lam))  # timm's rand_bbox
            y0, y1 = np.clip(cy - cut_side // 2, 0, side), np.clip(cy + cut_side // 2, 0, side)
            x0, x1 = np.clip(cx - cut_side // 2, 0, side), np.clip(cx + cut_side // 2, 0, side)
            want = x.clone()
            want[:, :, y0:y1, x0:x1] = x[partner][:, :, y0:y1, x0:x1]
            assert torch.equal(xs, want)
            area = 1 - (y1 - y0) * (x1 - x0) / side ** 2
            torch.testing.assert_close(soft, area * nn.functional.one_hot(t, c).float()
                                       + (1 - area) * nn.functional.one_hot(t[partner], c).float())
            assert 0 < area < 1 or lam > 0.9  # a box was pasted (lam 0.98: maybe none)


def test_mixing_draws_lambda_and_the_op_as_timm():
    """The random parts: lam ~ Beta(alpha, alpha) (MixUp's drawn lambda passes a
    Kolmogorov-Smirnov test against it), a batch is mixed with probability --mixup_prob, and
    with both on it is CutMix with probability --mixup_switch_prob."""
    from scipy import stats
    torch.manual_seed(0)
    x = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 3, 4, 4).contiguous()
    t = torch.tensor([0, 1])
    args = argparse.Namespace(mixup=0.8, cutmix=0.0, mixup_prob=1.0, mixup_switch_prob=0.5)
    mix = finetune.build_mixing(args, 2)
    lams = [mix(x, t)[0][1, 0, 0, 0].item() for _ in range(1000)]  # image 1: lam * 1 + (1 - lam) * 0
    assert stats.kstest(lams, "beta", args=(0.8, 0.8)).pvalue > 0.01
    both = finetune.build_mixing(argparse.Namespace(**{**vars(args), "cutmix": 1.0,
                                                       "mixup_prob": 0.6}), 2)
    kinds = []
    for _ in range(1000):
        xs, ts = both(x, t)
        kinds.append("none" if ts.ndim == 1 else
                     "cutmix" if torch.all((xs == 0) | (xs == 1)) else "mixup")
    share = {k: kinds.count(k) / len(kinds) for k in ("none", "cutmix", "mixup")}
    assert share == pytest.approx({"none": 0.4, "cutmix": 0.3, "mixup": 0.3}, abs=0.05)


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
    with pytest.raises(ValueError) as e:
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
        f = feature_function(n_last_blocks=2, use_cls=False)(model, x)
        layers = model.get_intermediate_layers(x, 2)
    assert f.shape == (2, 2 * 192)
    assert torch.allclose(f, torch.cat([layers[0][:, 1:].mean(1), layers[1][:, 1:].mean(1)], 1))
    args = eval_knn.get_args_parser().parse_args(["--use_cls", "false", "--avgpool_patchtokens", "1"])
    with pytest.raises(ValueError) as e:
        eval_knn.check_args(args)
    one_line_error(e, "--use_cls false")


def test_eval_knn_full_and_few_shot(npy_root, capsys):
    common = ["--arch", "resnet18", "--data_path", str(npy_root), "--num_workers", "0"]
    args = local(eval_knn.get_args_parser().parse_args(common + ["--nb_knn", "5"]))
    res = eval_knn.run_knn(args)
    assert args.dataset == "npy"  # inferred from --data_path (train/images.npy), not digits
    assert "5-NN classifier result: Top1:" in capsys.readouterr().out  # DINO's line
    assert res["knn"][5][0] > 90
    common += ["--dataset", "npy"]
    args = local(eval_knn.get_args_parser().parse_args(
        common + ["--n_shot", "2", "--n_episodes", "3", "--logreg", "true"]))
    res = eval_knn.run_knn(args)
    assert set(res["few_shot"]) == {"1-NN", "2-NN", "logreg"}
    assert "2-shot 1-NN classifier result: Top1:" in capsys.readouterr().out


# ============ eval_compare.py and one-line errors from the command line ============

def save_checkpoint(path, seed):
    """A train_ssl.py-style checkpoint of a random ResNet-18 (CIFAR stem, 16px crops)."""
    torch.manual_seed(seed)
    backbone, _ = build_backbone("resnet18", cifar_stem=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                "args": {"arch": "resnet18", "cifar_stem": True, "input_size": 16, "patch_size": 16}}, path)
    return path


def test_eval_compare_writes_side_by_side_table(npy_root, tmp_path, monkeypatch):
    """eval_compare.py starts eval_knn.py, eval_linear.py and finetune.py as processes, twice,
    and tabulates their results.json."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ckpt = save_checkpoint(tmp_path / "ckpt.pth", seed=1)
    out = tmp_path / "cmp"
    args = eval_compare.get_args_parser().parse_args([
        "--pretrained_weights", str(ckpt), "--data_path", str(npy_root), "--linear_epochs", "2",
        "--finetune_epochs", "1", "--batch_size_per_gpu", "16", "--num_workers", "0",
        "--output_dir", str(out),
        "--finetune_args", "--val_split 16 --save_predictions 0 --unfreeze_last_blocks 1"])
    eval_compare.eval_compare(args)
    assert (args.arch, args.image_size, args.cifar_stem) == ("resnet18", 16, True)  # from the checkpoint
    table = (out / "compare.md").read_text()
    assert "(key 'model')" in table and "teacher" not in table  # the network evaluated, as SimCLR's
    rows = [line for line in table.splitlines() if line.startswith("| ") and "evaluation" not in line]
    assert len(rows) == 3 and rows[0].startswith("| 20-NN top-1")
    results = json.loads((out / "compare.json").read_text())
    for name in ("knn", "linear", "finetune"):
        p, q = results[name]["pretrained"], results[name]["random_init"]
        assert f"| {p:.2f} | {q:.2f} | {p - q:+.2f} |" in table
    run = json.loads((out / "random_init" / "finetune" / "results.json").read_text())
    assert results["finetune"]["random_init"] == run["test_acc"]  # each run's own number
    stored = torch.load(out / "random_init" / "linear" / "checkpoint.pth.tar", weights_only=True)["args"]
    assert stored["pretrained_weights"] == "" and (stored["arch"], stored["image_size"]) == ("resnet18", 16)
    assert (out / "tb" / "pretrained").is_dir() and (out / "random_init" / "linear" / "log.txt").is_file()


def run_main(script, argv, monkeypatch, capsys):
    """Run a script's __main__ in this process (no interpreter start-up); returns (exit code,
    stderr lines)."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def test_bad_input_gives_one_clear_line_on_the_command_line(tmp_path, monkeypatch, capsys):
    code, lines = run_main("finetune.py", ["--output_dir", str(tmp_path), "--epochs", "2",
                                           "--warmup_epochs", "2"], monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "--warmup_epochs" in lines[0]


def test_bad_inputs_in_process(npy_root, tmp_path):
    with pytest.raises(ValueError) as e:
        eval_linear.run_linear(linear_args(npy_root, tmp_path, "--epochs", "0"))
    one_line_error(e, "--epochs")
    with pytest.raises(FileNotFoundError, match="does not exist"):  # raised by core/checkpoint.py
        eval_linear.run_linear(linear_args(npy_root, tmp_path, "--pretrained_weights", str(tmp_path / "no.pth")))
    p = finetune.get_args_parser()
    for flags, word in ((["--layer_decay", "1.5"], "--layer_decay"),
                        (["--unfreeze_layers", "layer4", "--unfreeze_last_blocks", "1"], "pick one")):
        with pytest.raises(ValueError) as e:
            finetune.check_args(p.parse_args(flags))
        one_line_error(e, word)
    with pytest.raises(ValueError) as e:
        eval_knn.check_args(eval_knn.get_args_parser().parse_args(["--n_shot", "-1"]))
    one_line_error(e, "--n_shot")


# ============ core/eval_args.py and co.: one home for what the scripts share ============

EVAL_SCRIPTS = ["eval_knn.py", "eval_linear.py", "finetune.py", "eval_compare.py", "visualize_attention.py"]


def declared_flags(path):
    """The option strings a file declares with add_argument("--flag", ...)."""
    tree = ast.parse(path.read_text())
    return [node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
            and node.args and isinstance(node.args[0], ast.Constant)]


def test_no_script_imports_another_and_each_shared_flag_is_declared_once():
    scripts = EVAL_SCRIPTS + ["train_ssl.py"]  # (bench/ drives train_ssl.py's step on purpose)
    names = {Path(s).stem for s in scripts}
    for script in scripts:
        tree = ast.parse((ROOT / script).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & names, f"{script} imports {imported & names}"
    shared = declared_flags(ROOT / "core" / "eval_args.py")
    assert {"--arch", "--pretrained_weights", "--dataset", "--n_last_blocks", "--batch_size_per_gpu"} <= set(shared)
    for script in EVAL_SCRIPTS:
        again = set(declared_flags(ROOT / script)) & set(shared)
        if script == "visualize_attention.py":
            again -= {"--image_size"}  # DINO's H W pair for one picture, not the square input size
        assert not again, f"{script} declares {again} again"
        assert "--local_rank" not in declared_flags(ROOT / script)  # torchrun sets LOCAL_RANK


def vit_state(patch_size=8):
    return build_backbone("vit_tiny", patch_size=patch_size, img_size=[16])[0].state_dict()


@pytest.mark.parametrize("stored", [
    {"arch": "vit_tiny", "patch_size": 8, "input_size": 16},                       # ours: a plain dict
    argparse.Namespace(arch="vit_tiny", patch_size=8, global_crops_size=16),       # DINO/iBOT's Namespace
    None])                                                                         # released weights
def test_model_flags_come_from_the_checkpoint_read_once(tmp_path, monkeypatch, stored):
    ckpt = {"teacher": {f"backbone.{k}": v for k, v in vit_state().items()}}
    if stored is not None:
        ckpt["args"] = stored
    torch.save(ckpt, tmp_path / "w.pth")
    reads = []
    monkeypatch.setattr(model_flags, "load_file", lambda p: reads.append(p) or torch.load(
        p, weights_only=False))
    args = eval_args.get_args_parser().parse_args(["--pretrained_weights", str(tmp_path / "w.pth")])
    model, dim = model_flags.load_backbone(args, default_image_size=32)
    assert reads == [str(tmp_path / "w.pth")]  # one read: flags and weights
    assert (args.arch, args.patch_size, dim) == ("vit_tiny", 8, 192)  # vit_small/16 if ignored
    assert args.image_size == (16 if stored is not None else 32)  # the training crop, else the dataset's
    for k in ("pos_embed", "blocks.11.mlp.fc2.weight"):  # the teacher's weights, loaded
        assert torch.equal(model.state_dict()[k], ckpt["teacher"][f"backbone.{k}"])


def test_resnet_stem_of_released_weights_is_read_from_conv1(tmp_path):
    backbone, _ = build_backbone("resnet18", cifar_stem=True)
    torch.save(backbone.state_dict(), tmp_path / "r.pth")  # no args, 3x3 conv1
    args = eval_args.get_args_parser().parse_args(["--pretrained_weights", str(tmp_path / "r.pth"),
                                                    "--arch", "resnet18"])
    model_flags.load_backbone(args, default_image_size=224)
    assert args.cifar_stem is True and args.image_size == 224


def test_vit_nano_of_released_weights_is_read_from_its_depth(tmp_path):
    """vit_nano has vit_tiny's width: bare weights tell them apart by their number of blocks."""
    for arch in ("vit_nano", "vit_tiny"):
        backbone, _ = build_backbone(arch, patch_size=4, img_size=[16])
        torch.save(backbone.state_dict(), tmp_path / f"{arch}.pth")  # no args
        args = eval_args.get_args_parser().parse_args(["--pretrained_weights",
                                                        str(tmp_path / f"{arch}.pth")])
        model, dim = model_flags.load_backbone(args, default_image_size=16)
        assert (args.arch, args.patch_size, dim, len(model.blocks)) == \
            (arch, 4, 192, {"vit_nano": 4, "vit_tiny": 12}[arch])


def test_default_output_dirs_differ_by_weights_and_dataset():
    def out(weights, dataset="cifar10", arch=None):
        return eval_runs.default_output_dir("eval_linear", argparse.Namespace(
            pretrained_weights=weights, dataset=dataset, arch=arch))
    assert out("out/dino/checkpoint.pth") == os.path.join("out", "eval_linear", "dino_checkpoint_cifar10")
    assert len({out("out/dino/checkpoint.pth"), out("out/simclr/checkpoint.pth"),
                out("out/dino/checkpoint0050.pth"), out("out/dino/checkpoint.pth", "stl10"),
                out("", arch="resnet18"), out("", arch="vit_small")}) == 6
    assert out("dino_deitsmall16_pretrain.pth") == os.path.join("out", "eval_linear", "dino_deitsmall16_pretrain_cifar10")


def test_resume_guard_names_the_first_difference():
    args = argparse.Namespace(pretrained_weights="a.pth", arch="resnet18", lr=0.1, epochs=5, num_workers=2)
    stored = eval_runs.run_args(args)
    eval_runs.check_resume("x/ck.pth", {"args": stored}, args)  # the same run: fine
    eval_runs.check_resume("x/ck.pth", {"args": {**stored, "epochs": 3, "num_workers": 8}}, args)  # may change
    eval_runs.check_resume("x/ck.pth", {"args": argparse.Namespace(**stored)}, args)  # DINO-style record
    with pytest.raises(ValueError) as e:
        eval_runs.check_resume("x/ck.pth", {"args": {**stored, "arch": "vit_tiny", "lr": 0.5}}, args)
    one_line_error(e, "x/ck.pth was written by a run with --arch vit_tiny, this command has --arch resnet18",
                   "--output_dir")
    with pytest.raises(ValueError) as e:
        eval_runs.check_resume("x/ck.pth", {"args": {**stored, "lr": 0.5}}, args)
    one_line_error(e, "--lr 0.5, this command has --lr 0.1")
    with pytest.raises(ValueError) as e:
        eval_runs.check_resume("x/ck.pth", {"state_dict": {}}, args)  # no record: cannot tell
    one_line_error(e, "no record", "--output_dir")


def _start(script, *flags, cwd=ROOT):
    return subprocess.Popen([sys.executable, str(ROOT / script), *flags], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _refused(proc, *words):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for w in words:
        assert w in lines[0], lines[0]
    return out


def test_second_run_in_one_folder_refuses_other_weights(npy_root, tmp_path, capsys, monkeypatch):
    """Issue 12: two runs in one --output_dir with different --pretrained_weights. The second
    must stop with one line (exit 2), not resume and print the first run's accuracy; the same
    command resumes; without --output_dir each weights file gets its own folder."""
    a = save_checkpoint(tmp_path / "a" / "ckpt.pth", seed=1)
    b = save_checkpoint(tmp_path / "b" / "ckpt.pth", seed=2)
    data = ["--data_path", str(npy_root), "--num_workers", "0", "--batch_size_per_gpu", "16"]
    lin = data + ["--cached_features", "true", "--epochs", "2", "--tensorboard", "false"]
    ft = data + ["--epochs", "1", "--warmup_epochs", "0", "--val_split", "16", "--save_predictions", "0",
                 "--unfreeze_last_blocks", "0", "--tensorboard", "false"]
    lin_out, ft_out = tmp_path / "lin", tmp_path / "ft"
    first_lin = eval_linear.run_linear(local(eval_linear.get_args_parser().parse_args(
        lin + ["--pretrained_weights", str(a), "--output_dir", str(lin_out)])))
    first_ft = finetune.run_finetune(local(finetune.get_args_parser().parse_args(
        ft + ["--pretrained_weights", str(a), "--output_dir", str(ft_out)])))
    procs = [_start("eval_linear.py", *lin, "--pretrained_weights", str(b), "--output_dir", str(lin_out)),
             _start("finetune.py", *ft, "--pretrained_weights", str(b), "--output_dir", str(ft_out))]
    capsys.readouterr()
    # the same command resumes (nothing left to train) and reports the same numbers
    again = eval_linear.run_linear(local(eval_linear.get_args_parser().parse_args(
        lin + ["--pretrained_weights", str(a), "--output_dir", str(lin_out)])))
    assert again["best_acc"] == first_lin["best_acc"]
    again = finetune.run_finetune(local(finetune.get_args_parser().parse_args(
        ft + ["--pretrained_weights", str(a), "--output_dir", str(ft_out)])))
    assert again["test_acc"] == first_ft["test_acc"]
    out = capsys.readouterr().out
    assert "checkpoint.pth.tar: resuming from epoch 2" in out and "checkpoint.pth: resuming from epoch 1" in out
    # no --output_dir: a folder of its own per weights file
    monkeypatch.chdir(tmp_path)
    args = local(eval_linear.get_args_parser().parse_args(lin + ["--pretrained_weights", str(b)]))
    eval_linear.run_linear(args)
    assert args.output_dir == os.path.join("out", "eval_linear", "b_ckpt_npy")
    assert (tmp_path / args.output_dir / "results.json").is_file()

    for proc, name in zip(procs, (lin_out / "checkpoint.pth.tar", ft_out / "checkpoint.pth")):
        stdout = _refused(proc, f"{name} was written by a run with --pretrained_weights {a}, "
                                f"this command has --pretrained_weights {b}", "--output_dir")
        assert "accuracy" not in stdout.lower().replace("max accuracy", "")  # no first-run numbers


@pytest.mark.parametrize("script", EVAL_SCRIPTS)
def test_a_given_data_path_is_never_ignored(script, tmp_path, monkeypatch, capsys):
    """--data_path without --dataset: inferred from the folder, or one line naming --dataset
    (never digits in silence). Runs the script's __main__ in this process."""
    (tmp_path / "photos").mkdir()  # no train/, no CIFAR / STL-10 files
    cases = [(["--data_path", str(tmp_path / "photos")], ["cannot tell which dataset", "--dataset"]),
             (["--data_path", str(tmp_path / "missing")], ["does not exist", "--data_path"]),
             (["--data_path", str(tmp_path / "photos"), "--dataset", "digits"],
              ["--dataset digits", "drop --data_path"])]
    if script in ("eval_linear.py", "finetune.py"):
        cases.append((["--dataset", "digits", "--precision", "bf16", "--use_fp16", "true"],
                      ["--precision bf16 contradicts --use_fp16 true"]))
    for flags, words in cases:
        code, lines = run_main(script, flags, monkeypatch, capsys)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
        assert all(w in lines[0] for w in words), lines[0]
