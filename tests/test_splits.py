"""Which split is scored (--eval_split), labels a classifier cannot be right on, and k-NN that
cannot be right (issue 18, items 3, 4 and the evaluation parts of 10).

The datasets have train/, val/ and test/ with different content: val/ is labelled as train is
(4 colours, 4 classes), test/ has every label shifted by one class. A colour-separating backbone
(any random ResNet) then scores ~100% on val/ and ~0% on test/, so the number shows which split
was scored, and the split sizes differ too (16 val, 8 test images)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import eval_knn
import eval_linear
import finetune
import train_ssl
from core import cli
from core.knn import KNNEvaluator, knn_classifier
from data import build_dataset, dataset_info
from data import datasets
from models import build_backbone

COLOURS = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [200, 200, 40]])
SPLITS = {"train": (6, 0), "val": (4, 0), "test": (2, 1)}  # images per class, label shift


def _images(per_class, seed, size=16):
    colour = np.repeat(np.arange(4), per_class)
    noise = np.random.default_rng(seed).normal(0, 20, (len(colour), size, size, 3))
    return (COLOURS[colour][:, None, None, :] + noise).clip(0, 255).astype(np.uint8), colour


def make_npy(root, splits=SPLITS, flat=False):
    for i, (split, (per_class, shift)) in enumerate(splits.items()):
        images, colour = _images(per_class, i)
        labels = (colour + shift) % 4
        if flat:
            root.mkdir(parents=True, exist_ok=True)
            np.save(root / f"{split}_images.npy", images)
            np.save(root / f"{split}_labels.npy", labels)
        else:
            (root / split).mkdir(parents=True, exist_ok=True)
            np.save(root / split / "images.npy", images)
            np.save(root / split / "labels.npy", labels)
    return root


def make_folder(root, splits=SPLITS, classes=("a", "b", "c", "d")):
    for i, (split, (per_class, shift)) in enumerate(splits.items()):
        images, colour = _images(per_class, i)
        for j, (img, c) in enumerate(zip(images, colour)):
            folder = root / split / classes[(c + shift) % len(classes)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def npy3(tmp_path_factory):
    return make_npy(tmp_path_factory.mktemp("npy3"))


@pytest.fixture(scope="module")
def folder3(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder3"))


def local(args):
    args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
    args.device = torch.device("cpu")
    return args


COMMON = ["--arch", "resnet18", "--cifar_stem", "true", "--image_size", "16", "--num_workers", "0",
          "--batch_size_per_gpu", "8"]


def one_line(excinfo, *words):
    msg = cli.error_message(excinfo.value)
    assert "\n" not in str(excinfo.value), msg
    for w in words:
        assert w in msg, msg
    return msg


# ============ data: which folder each role reads ============

@pytest.mark.parametrize("make", [make_npy, make_folder])
def test_val_selects_and_test_scores_when_both_exist(tmp_path, make):
    root = make(tmp_path / "d")
    name = "npy" if make is make_npy else "imagefolder"
    sizes = {}
    for split, eval_split in (("val", "auto"), ("test", "auto"), ("test", "val"), ("test", "test"),
                              ("val", "test")):
        ds = build_dataset(name, root, split, eval_split=eval_split)
        sizes[split, eval_split] = (len(ds), ds.split_name, ds.split_key)
    assert sizes["val", "auto"] == (16, "val/", "val")   # model selection: val/
    assert sizes["test", "auto"] == (8, "test/", "test")  # the reported number: test/
    assert sizes["test", "val"] == (16, "val/", "val")   # --eval_split val
    assert sizes["test", "test"] == (8, "test/", "test")
    assert sizes["val", "test"] == (16, "val/", "val")   # selection stays on val/
    held = build_dataset(name, root, "val", val_split=4, eval_split="auto")
    assert (len(held), held.split_name, held.split_key) == (4, "train/ held-out", "heldout")


def test_one_evaluation_folder_serves_both_roles(tmp_path):
    only_val = make_folder(tmp_path / "v", {"train": (2, 0), "val": (1, 0)})
    only_test = make_npy(tmp_path / "t", {"train": (2, 0), "test": (1, 0)})
    for split in ("val", "test"):  # DINO's convention: ImageNet's val/ is its test set
        assert build_dataset("imagefolder", only_val, split).split_name == "val/"
        assert build_dataset("npy", only_test, split).split_name == "test/"
    with pytest.raises(FileNotFoundError) as e:
        build_dataset("imagefolder", only_val, "test", eval_split="test")
    one_line(e, "--eval_split test", "no test/ folder", "--eval_split auto or val")
    with pytest.raises(ValueError) as e:  # fixed splits: no files looked at
        datasets.resolve_split("cifar10", tmp_path, "test", "val")
    one_line(e, "cifar10 has no labelled val split", "--eval_split auto or test")
    assert datasets.resolve_split("tiny-imagenet", tmp_path, "test", "auto") == "val"
    assert build_dataset("digits", None, "test").split_name == "test"
    flat = make_npy(tmp_path / "f", {"train": (2, 0), "val": (1, 0)}, flat=True)
    assert build_dataset("npy", flat, "test").split_name == "val_*.npy"


# ============ eval_knn.py, eval_linear.py, finetune.py score the split asked for ============

@pytest.mark.parametrize("fixture", ["npy3", "folder3"])
def test_eval_knn_scores_test_and_names_it(fixture, request, capsys, tmp_path):
    root = request.getfixturevalue(fixture)
    top1 = {}
    for eval_split in ("auto", "val"):
        args = local(eval_knn.get_args_parser().parse_args(
            COMMON + ["--data_path", str(root), "--nb_knn", "3", "--output_dir",
                      str(tmp_path / eval_split)]
            + (["--eval_split", eval_split] if eval_split != "auto" else [])))  # auto: the default
        res = eval_knn.run_knn(args)
        out = capsys.readouterr().out
        top1[eval_split] = res["knn"][3][0]
        want, n = ("test/", 8) if eval_split == "auto" else ("val/", 16)
        assert res["split"] == want
        assert json.loads((tmp_path / eval_split / "results.json").read_text())["split"] == want
        assert f"{n} imgs to score ({want})" in out
        assert f"3-NN classifier result: Top1: {top1[eval_split]}, Top5: " in out
        assert out.rstrip().endswith(f"(on {want})")
    assert top1["val"] > 90 and top1["auto"] < 10  # test/'s labels are shifted by one class


def test_eval_linear_selects_on_val_and_reports_test(npy3, tmp_path, capsys):
    args = local(eval_linear.get_args_parser().parse_args(
        COMMON + ["--data_path", str(npy3), "--output_dir", str(tmp_path), "--epochs", "5",
                  "--lr", "2.0", "--cached_features", "true", "--tensorboard", "true"]))
    res = eval_linear.run_linear(args)
    out = capsys.readouterr().out
    assert res["splits"] == {"best_acc": "val/", "test_acc": "test/"}
    assert res["best_acc"] > 90 and res["test_acc"] < 10
    assert "on the 16 val/ images" in out and "Top-1 test accuracy on test/ (8 images)" in out
    assert json.loads((tmp_path / "results.json").read_text())["splits"]["test_acc"] == "test/"
    assert all(json.loads(x)["split"] == "val/" for x in (tmp_path / "log.txt").read_text().splitlines())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "val/top1_val" in acc.Tags()["scalars"]
    # --evaluate scores the --eval_split split (test/), not the selection split
    args = local(eval_linear.get_args_parser().parse_args(
        COMMON + ["--data_path", str(npy3), "--output_dir", str(tmp_path), "--epochs", "5",
                  "--lr", "2.0", "--cached_features", "true", "--tensorboard", "true", "--evaluate"]))
    res = eval_linear.run_linear(args)
    assert res["splits"]["best_acc"] == "test/" and "on the 8 test/ images" in capsys.readouterr().out


def test_finetune_selects_on_val_and_tests_on_test(folder3, tmp_path, capsys):
    args = local(finetune.get_args_parser().parse_args(
        COMMON + ["--data_path", str(folder3), "--output_dir", str(tmp_path), "--epochs", "1",
                  "--warmup_epochs", "0", "--save_predictions", "0", "--tensorboard", "false"]))
    res = finetune.run_finetune(args)
    out = capsys.readouterr().out
    assert args.val_split == 0  # val/ exists beside test/: no images held out of train
    assert res["splits"] == {"best_val_acc": "val/", "test_acc": "test/"}
    assert "16 val (val/), 8 test (test/)" in out and "Scoring 8 images of test/" in out
    assert "selects the best epoch on" not in out  # no warning: val/ is not the scored split
    record = json.loads((tmp_path / "log.txt").read_text().splitlines()[0])
    assert record["split"] == "val/"
    # without test/, the default holds train images out (selecting on val/ = the scored split)
    only_val = make_folder(tmp_path / "v", {"train": (6, 0), "val": (2, 0)})
    args = finetune.get_args_parser().parse_args(["--data_path", str(only_val)])
    finetune.check_args(args)
    assert args.val_split == 0.1


# ============ train_ssl.py's k-NN check ============

def knn_args(root, out, *extra):
    args = local(train_ssl.parse_args(["--method", "simclr", "--data_path", str(root),
                                       "--output_dir", str(out), "--num_workers", "0",
                                       "--batch_size_per_gpu", "8", *extra]))
    args.input_size = 16
    return args


def test_train_ssl_knn_scores_eval_split_and_prints_the_k_used(npy3, tmp_path, capsys):
    args = knn_args(npy3, tmp_path, "--knn_k", "50")
    info = dataset_info(args.dataset, args.data_path)
    knn = KNNEvaluator.for_run(args, info)
    out = capsys.readouterr().out
    assert "k = 50 exceeds the 24 train images; the k-NN uses k = 24" in out
    assert (knn.split_name, len(knn.test), knn.describe()) == ("test/", 8, "24-NN top-1 on npy test/")
    backbone, _ = build_backbone("resnet18", cifar_stem=True)
    train_ssl.final_knn_check(knn, backbone, backbone, args, writer=None)
    out = capsys.readouterr().out
    assert "24-NN top-1 on npy test/ (pretrained): " in out
    record = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])
    assert record["knn_split"] == "test/" and record["knn_k"] == 24
    assert record["knn_top1_pretrained"] < 10 + 25  # test/ is shifted: chance at best
    knn = KNNEvaluator.for_run(knn_args(npy3, tmp_path, "--eval_split", "val"), info)
    assert (knn.split_name, len(knn.test)) == ("val/", 16)


def _refused_before_any_data(root, tmp_path, monkeypatch, capsys, *extra):
    """train_ssl.py's main with the default k-NN check: the one error line (exit 2), raised
    before a loader is built."""
    def no_data(*a, **k):
        raise AssertionError("data was read before the k-NN check was refused")
    monkeypatch.setattr(train_ssl, "build_train_loader", no_data)
    args = train_ssl.parse_args(["--method", "simclr", "--data_path", str(root), "--output_dir",
                                 str(tmp_path / "out"), "--num_workers", "0", "--cpu", *extra])
    try:
        with pytest.raises(SystemExit) as e:
            cli.run(lambda: train_ssl.train_ssl(args))
    finally:  # (a process group left by a failed run would break the next one)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    return lines[0]


def test_train_only_folder_refused_with_the_flag(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "d", {"train": (2, 0)})
    line = _refused_before_any_data(root, tmp_path, monkeypatch, capsys)
    assert "has only train/" in line and "--knn_eval false" in line, line
    line = _refused_before_any_data(root, tmp_path, monkeypatch, capsys, "--knn_freq", "1")
    assert "--knn_eval false --knn_freq 0" in line, line


def test_single_class_knn_check_refused(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "d", {"train": (2, 0), "val": (1, 0)}, classes=("photos",))
    line = _refused_before_any_data(root, tmp_path, monkeypatch, capsys)
    assert "single class" in line and "measures nothing" in line and "--knn_eval false" in line


# ============ a single class, labels no classifier can be right on ============

def test_eval_scripts_refuse_a_single_class(tmp_path):
    root = make_npy(tmp_path / "d", {"train": (2, 0), "test": (1, 0)})
    for split in ("train", "test"):
        np.save(root / split / "labels.npy", np.full(len(np.load(root / split / "labels.npy")), 2))
    for module, extra in ((eval_knn, []), (eval_linear, []), (finetune, [])):
        args = module.get_args_parser().parse_args(["--data_path", str(root), *extra])
        with pytest.raises(ValueError) as e:
            module.check_args(args)
        one_line(e, "single class", "measures nothing", "train/")


def test_labels_a_classifier_cannot_be_right_on(tmp_path):
    root = make_npy(tmp_path / "d", {"train": (2, 0), "test": (2, 0)})
    labels = np.load(root / "test" / "labels.npy")
    np.save(root / "test" / "labels.npy", np.where(labels == 3, 7, labels))  # 7: not in train
    with pytest.raises(ValueError) as e:
        build_dataset("npy", root, "test")
    one_line(e, str(root / "test" / "labels.npy"), "never has", "7 (2 images)")
    np.save(root / "test" / "labels.npy", np.where(labels == 3, -1, labels))
    with pytest.raises(ValueError) as e:
        build_dataset("npy", root, "test")
    one_line(e, str(root / "test" / "labels.npy"), "negative labels", "-1 (2 images)")
    train = np.load(root / "train" / "labels.npy")
    np.save(root / "train" / "labels.npy", np.where(train == 0, -5, train))
    with pytest.raises(ValueError) as e:
        build_dataset("npy", root, "train")
    one_line(e, str(root / "train" / "labels.npy"), "-5 (2 images)")
    np.save(root / "train" / "labels.npy", train + 0.5)
    with pytest.raises(ValueError) as e:
        build_dataset("npy", root, "train")
    one_line(e, "not whole numbers", "0.5")
    # -1 marks unlabelled train images (pretraining reads them); a classifier refuses them
    np.save(root / "train" / "labels.npy", np.where(train == 0, -1, train))
    np.save(root / "test" / "labels.npy", labels)
    assert build_dataset("npy", root, "train").targets.count(-1) == 2
    with pytest.raises(ValueError) as e:
        eval_knn.check_args(eval_knn.get_args_parser().parse_args(["--data_path", str(root)]))
    one_line(e, "2 images", "unlabelled (-1)")


def test_knn_temperature_and_k_checked(npy3, capsys):
    for t in ("0", "-0.1", "inf"):
        with pytest.raises(ValueError) as e:
            eval_knn.check_args(eval_knn.get_args_parser().parse_args(["--temperature", t]))
        one_line(e, f"--temperature {float(t)}", "> 0")
    f = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    with pytest.raises(ValueError, match="temperature"):
        knn_classifier(f, torch.arange(6) % 2, f, torch.arange(6) % 2, 3, 0.0, 2)
    args = local(eval_knn.get_args_parser().parse_args(
        COMMON + ["--data_path", str(npy3), "--nb_knn", "3", "50", "100", "--eval_split", "val"]))
    res = eval_knn.run_knn(args)
    out = capsys.readouterr().out
    assert set(res["knn"]) == {3, 24}  # 50 and 100 both use all 24 train images
    assert "--nb_knn 50 100 exceed the 24 train images; k = 24 is used instead" in out
    assert "24-NN classifier result" in out and "50-NN" not in out.split("instead")[-1]
