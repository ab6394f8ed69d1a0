"""Class names and named train splits (issue 21, item 5): an npy dataset's classes.txt names
its classes in every report and figure (finetune.py's and eval_linear.py's per-class report,
confusion matrix, prediction grid); a probe, a fine-tuning or a k-NN memory bank trains on a
named split (--train_split probe: probe/images.npy, probe_images.npy, or the folder probe/).

The data: 4 colour classes; the probe split holds the same colours with every label shifted
by one class, so a k-NN whose memory bank is the probe split is wrong on every test image
(a random ResNet separates the colours), and right on them with train/ as memory bank."""
import json

import pytest
import torch

import eval_knn
import eval_linear
import finetune
from core import cli, report
from core.eval_data import eval_split
from data import build_dataset, dataset_info, eval_transform
from test_splits import local, make_folder, make_npy

NAMES = ["cardinal", "frog", "sky", "banana"]
SPLITS = {"train": (6, 0), "probe": (5, 1), "test": (3, 0)}  # images per class, label shift
COMMON = ["--arch", "resnet18", "--cifar_stem", "true", "--image_size", "16", "--num_workers",
          "0", "--batch_size_per_gpu", "8"]


def named_npy(root, flat=False, names=NAMES):
    make_npy(root, SPLITS, flat=flat)
    (root / "classes.txt").write_text("\n".join(names) + "\n\n")  # trailing blank lines are fine
    return root


def one_line(fn, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(fn)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ============ class names ============

def test_classes_txt_names_the_classes_of_every_split(tmp_path):
    root = named_npy(tmp_path / "d")
    for split in ("train", "test"):
        ds = build_dataset("npy", root, split)
        assert ds.classes == NAMES and ds.num_classes == 4
    # through the wrappers the scripts use: a LoadedSplit (tensor backend), a held-out subset
    args = local(eval_knn.get_args_parser().parse_args(COMMON + ["--data_path", str(root)]))
    args.dataset = "npy"
    loaded = eval_split(args, "test", eval_transform(16, (0.5,) * 3, (0.5,) * 3))
    assert report.class_names(loaded, 4) == NAMES
    held = build_dataset("npy", root, "val", val_split=4)
    assert report.class_names(held, 4) == NAMES
    assert report.class_names(build_dataset("npy", make_npy(tmp_path / "plain"), "test"), 4) \
        == ["0", "1", "2", "3"]
    # more names than the labels use: the dataset has that many classes (the head's outputs)
    five = named_npy(tmp_path / "five", names=NAMES + ["extra"])
    assert build_dataset("npy", five, "train").num_classes == 5
    assert dataset_info("npy", five).num_classes == 5


@pytest.mark.parametrize("text,words", [
    ("cardinal\nfrog\nsky\n", ["holds class 3", "names only 3 classes", "one class name per line"]),
    ("cardinal\n\nfrog\nsky\nbanana\n", ["line 2 is empty"]),
    ("cardinal\nfrog\nsky\nfrog\n", ["names class 'frog' twice (lines 2, 4)"]),
])
def test_a_classes_txt_that_does_not_fit_is_one_line(tmp_path, text, words, capsys):
    root = make_npy(tmp_path / "d", SPLITS)
    (root / "classes.txt").write_text(text)
    msg = one_line(lambda: build_dataset("npy", root, "train"), capsys)
    assert "classes.txt" in msg and all(w in msg for w in words), msg


def test_reports_and_figures_use_the_class_names(tmp_path, monkeypatch):
    """finetune.py: report.txt / report.json, the confusion matrix and the prediction grid;
    eval_linear.py: its per-class report of the best probe, with the same names."""
    root = named_npy(tmp_path / "d")
    drawn = {}
    for fig in ("save_prediction_grid", "save_confusion_matrix"):
        real = getattr(report, fig)
        monkeypatch.setattr(report, fig, lambda *a, _real=real, _fig=fig, **kw: (
            drawn.setdefault(_fig, []).append(a), _real(*a, **kw))[1])

    out = tmp_path / "ft"
    finetune.run_finetune(local(finetune.get_args_parser().parse_args(COMMON + [
        "--data_path", str(root), "--epochs", "1", "--warmup_epochs", "0", "--val_split", "8",
        "--save_predictions", "4", "--tensorboard", "false", "--output_dir", str(out)])))
    text = (out / "report.txt").read_text()
    assert all(n in text for n in NAMES)
    assert [r["class"] for r in json.loads((out / "report.json").read_text())["per_class"]] == NAMES
    assert drawn["save_prediction_grid"][0][4] == NAMES  # (images, targets, preds, conf, names)
    assert drawn["save_confusion_matrix"][0][1] == NAMES

    out = tmp_path / "lin"
    eval_linear.run_linear(local(eval_linear.get_args_parser().parse_args(COMMON + [
        "--data_path", str(root), "--epochs", "1", "--cached_features", "true",
        "--tensorboard", "false", "--output_dir", str(out)])))
    saved = json.loads((out / "report.json").read_text())
    assert [r["class"] for r in saved["per_class"]] == NAMES and saved["split"] == "test/"
    assert all(n in (out / "report.txt").read_text() for n in NAMES)
    assert drawn["save_confusion_matrix"][1][1] == NAMES
    assert (out / "confusion_matrix.png").is_file()
    # the report's accuracy is the test accuracy results.json gives (the best probe's)
    results = json.loads((out / "results.json").read_text())
    assert saved["accuracy"] == pytest.approx(results["test_acc"])


# ============ --train_split ============

@pytest.mark.parametrize("layout", ["nested", "flat", "folder"])
def test_knn_memory_bank_from_a_named_split(tmp_path, layout, capsys):
    root = (make_folder(tmp_path / "d", SPLITS) if layout == "folder"
            else make_npy(tmp_path / "d", SPLITS, flat=layout == "flat"))
    top1 = {}
    for split in ("train", "probe"):
        args = local(eval_knn.get_args_parser().parse_args(COMMON + [
            "--data_path", str(root), "--nb_knn", "1", "--train_split", split]))
        top1[split] = eval_knn.run_knn(args)["knn"][1][0]
        out = capsys.readouterr().out
        n, name = ((24, "train") if split == "train" else (20, "probe"))
        label = {"nested": f"{name}/", "flat": f"{name}_*.npy", "folder": f"{name}/"}[layout]
        assert f"Data loaded with {n} train imgs ({label})" in out
    assert top1 == {"train": 100.0, "probe": 0.0}  # the probe's labels are shifted by one


def test_probe_and_finetune_train_on_the_named_split(tmp_path, capsys):
    root = make_npy(tmp_path / "d", SPLITS)
    for cached in ("true", "false"):
        eval_linear.run_linear(local(eval_linear.get_args_parser().parse_args(COMMON + [
            "--data_path", str(root), "--train_split", "probe", "--epochs", "1",
            "--cached_features", cached, "--tensorboard", "false",
            "--output_dir", str(tmp_path / f"lin_{cached}")])))
        out = capsys.readouterr().out
        assert "Data loaded with 20 train imgs (probe/)" in out
        ckpt = torch.load(tmp_path / f"lin_{cached}" / "checkpoint.pth.tar", weights_only=True)
        assert ckpt["args"]["train_split"] == "probe"
    finetune.run_finetune(local(finetune.get_args_parser().parse_args(COMMON + [
        "--data_path", str(root), "--train_split", "probe", "--val_split", "8", "--epochs", "1",
        "--warmup_epochs", "0", "--save_predictions", "0", "--tensorboard", "false",
        "--output_dir", str(tmp_path / "ft")])))
    out = capsys.readouterr().out
    # 8 of the probe's 20 images held out for validation, the other 12 trained on
    assert "Data loaded: 12 train (probe/), 8 val (probe/ held-out), 12 test (test/) imgs." in out


def test_a_train_split_that_cannot_be_is_one_line(tmp_path, capsys):
    root = make_npy(tmp_path / "d", SPLITS)
    parse = eval_linear.get_args_parser().parse_args

    def run(*flags, script=eval_linear):
        args = local(script.get_args_parser().parse_args(COMMON + ["--data_path", str(root),
                                                                   *flags]))
        return lambda: script.check_args(args)
    msg = one_line(run("--train_split", "extra"), capsys)
    assert "--train_split extra" in msg and "extra/images.npy" in msg, msg
    msg = one_line(run("--train_split", "test"), capsys)
    assert "--train_split test is the split scored" in msg, msg
    msg = one_line(run("--train_split", "probe", "--dataset", "digits", "--data_path", ""), capsys)
    assert "digits has fixed splits" in msg, msg
    assert parse(["--data_path", str(root)]).train_split == "train"
    help = " ".join(eval_linear.get_args_parser().format_help().split())
    assert "--train_split TRAIN_SPLIT" in help and "(default: train)" in help
