"""CPU tests for the matplotlib figures: core/report.py's prediction grid, confusion matrix and bar
chart, core/curves.py's per-run curves and multi-run comparison (function and command line), and
visualize_attention.py's drawing. Each writes a PNG that PIL must open at about the size asked."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.curves import compare_runs, main as curves_main, metric_names, read_log, save_curves
from core.report import (figure_to_array, save_bar_chart, save_confusion_matrix,
                         save_prediction_grid)


def open_png(path):
    img = Image.open(path)
    assert img.format == "PNG"
    img.load()
    return img


def write_log(run_dir, epochs, offset=0.0, resumed_twice=None):
    """A train_ssl-like log.txt: loss, lr, a metric, a list metric; a final k-NN line without
    an epoch; optionally one epoch logged twice (a resumed run), the second line the real one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.txt", "w") as f:
        for e in range(epochs):
            record = {"train_loss": 5 * math.exp(-e / 3) + offset,
                      "train_lr": 1e-3 * min(1, (e + 1) / 2),
                      "train_teacher_entropy": 3.0 - 0.1 * e, "test_acc1_layers": [10 + e, 20 + e],
                      "note": "text is not a metric", "epoch": e}
            if e == resumed_twice:
                f.write(json.dumps({**record, "train_loss": 99.0}) + "\n")
            f.write(json.dumps(record) + "\n")
        f.write(json.dumps({"knn_k": 20, "knn_top1_pretrained": 80.0}) + "\n")
    return run_dir


# ============ core/report.py ============

def test_prediction_grid_png_and_array(tmp_path):
    images = torch.randn(10, 3, 16, 16)
    targets, preds = np.arange(10) % 3, np.array([0, 1, 2, 0, 0, 0, 1, 1, 2, 2])
    names = ["cat", "dog", "a very long class name indeed"]
    fig = save_prediction_grid(images, targets, preds, np.full(10, 0.9), names,
                               tmp_path / "pred.png", (0.5,) * 3, (0.2,) * 3, nrow=4, tile=100)
    img = open_png(tmp_path / "pred.png")
    assert img.size == (4 * 100, 3 * (100 + 45))  # 4 per row, 3 rows, a caption band each
    assert list(tmp_path.iterdir()) == [tmp_path / "pred.png"]  # no temporary file left
    assert figure_to_array(fig).shape == (3 * 145, 400, 3)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "pred: cat (90%)" and titles[2].startswith("pred: a very long")


def test_confusion_matrix_heat_map(tmp_path):
    cm = [[5, 1, 0], [0, 3, 3], [0, 0, 0]]  # the last class never occurs: its row stays 0
    fig = save_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm.png", "title")
    w, h = open_png(tmp_path / "cm.png").size
    assert 350 < w < 800 and 300 < h < 700
    heat, colorbar = fig.axes
    assert heat.get_xlabel() == "predicted class"
    assert colorbar.get_ylabel() == "fraction of the true class"
    np.testing.assert_allclose(heat.images[0].get_array(),
                               [[5 / 6, 1 / 6, 0], [0, .5, .5], [0, 0, 0]])
    assert sorted(t.get_text() for t in heat.texts) == ["1", "3", "3", "5"]  # counts, zeros blank
    colours = {t.get_text(): t.get_color() for t in heat.texts}  # white on the dark cells only
    assert colours == {"5": "white", "1": "black", "3": "black"}
    assert [t.get_text() for t in heat.get_xticklabels()] == ["a", "b", "c"]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["a", "b", "c"]
    # many classes: no labels in the cells, class indices on the axes, still a readable figure
    big = np.diag(np.arange(1, 101))
    fig = save_confusion_matrix(big, [f"class {i}" for i in range(100)], tmp_path / "big.png")
    assert open_png(tmp_path / "big.png").size[0] <= 17.2 * 100 + 1
    assert not fig.axes[0].texts
    ticks = fig.axes[0].get_xticks()
    assert 3 <= len(ticks) <= 12 and all(float(t).is_integer() for t in ticks)


def test_bar_chart(tmp_path):
    fig = save_bar_chart([f"block{i}" for i in range(12)], np.linspace(20, 80, 12),
                         tmp_path / "bars.png", "linear probe top-1 (%) per layer")
    assert open_png(tmp_path / "bars.png").size == (60 * 12 + 100, 320)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "top-1 (%)" and len(ax.patches) == 12
    assert [t.get_text() for t in ax.texts][:2] == ["20.0", "25.5"]  # value above each bar


# ============ core/curves.py ============

def test_curves_from_log_one_panel_per_metric(tmp_path):
    run = write_log(tmp_path / "run", epochs=5, resumed_twice=2)
    records = read_log(run)
    assert [r["epoch"] for r in records] == list(range(5)) and records[2]["train_loss"] != 99.0
    names = save_curves(run)
    # loss first, then lr, then the rest in log order; strings and the k-NN line left out
    assert names == ["train_loss", "train_lr", "train_teacher_entropy", "test_acc1_layers"]
    assert open_png(run / "curves.png").size == (4 * 330, 240 + 30)  # 4 panels, a title
    assert not (run / "curves.png.tmp").exists()
    # more metrics than four wrap onto more rows
    with open(run / "log.txt", "a") as f:
        f.write(json.dumps({"train_loss": 1.0, "train_acc1": 5.0, "epoch": 5}) + "\n")
    assert len(save_curves(run, tmp_path / "other.png")) == 5
    assert open_png(tmp_path / "other.png").size == (4 * 330, 2 * 240 + 30)
    assert metric_names([{"epoch": 0, "b": 1, "lr": 2, "a_loss": 3}]) == ["a_loss", "lr", "b"]


def test_curves_read_as_the_console_counts(tmp_path):
    """Titles in words with a y-axis label, epochs from 1 as printed ("Epoch 1/2"), tick labels
    that differ on a flat learning rate, per-step lines from log_steps.txt (core.logger.StepLog)
    and list metrics named at the ends of their lines instead of by a legend box."""
    from core.curves import describe
    from core.logger import MetricLogger, StepLog
    assert describe("train_loss") == ("training loss", "loss")
    assert describe("train_lr") == ("learning rate", "lr")
    assert describe("test_acc1") == ("test top-1 (%)", "%")
    assert describe("knn_top1") == ("k-NN top-1 (%)", "%")
    assert describe("train_teacher_entropy") == ("teacher entropy", "nats")
    run = tmp_path / "run"
    run.mkdir()
    steps = StepLog(run, prefix="train")
    for epoch in range(2):  # what a MetricLogger with print_freq 2 sends over 2 epochs of 4 steps
        logger = MetricLogger(print_freq=2, print_secs=None, on_print=steps.for_epoch(epoch, 4))
        for i in logger.log_every(range(4)):
            logger.update(loss=torch.tensor(4.0 - epoch - i / 4), lr=1e-3)
    with open(run / "log.txt", "w") as f:
        for e in range(2):
            f.write(json.dumps({"train_loss": 3.5 - e, "train_lr": 1e-3, "test_acc1_layers":
                                [10 + e, 20 + e], "test_acc1_layers_labels": ["block1", "block2"],
                                "epoch": e}) + "\n")
    lines = [json.loads(x) for x in (run / "log_steps.txt").read_text().splitlines()]
    assert [(r["epoch"], r["iter"], r["step"]) for r in lines] == \
        [(0, 0, 0), (0, 2, 2), (0, 3, 3), (1, 0, 4), (1, 2, 6), (1, 3, 7)]
    assert lines[1]["train_loss"] == pytest.approx(3.5)  # that step's value, not a running mean
    import matplotlib
    from matplotlib.figure import Figure
    captured = {}
    real_savefig = Figure.savefig

    def savefig(fig, *a, **kw):
        captured["fig"] = fig
        return real_savefig(fig, *a, **kw)
    matplotlib.figure.Figure.savefig = savefig
    try:
        names = save_curves(run)
    finally:
        matplotlib.figure.Figure.savefig = real_savefig
    assert names == ["train_loss", "train_lr", "test_acc1_layers"]
    loss_ax, lr_ax, layers_ax = captured["fig"].axes
    assert loss_ax.get_title() == "training loss" and loss_ax.get_ylabel() == "loss"
    per_step, averages = loss_ax.get_lines()
    assert list(per_step.get_xdata()) == [0.25, 0.75, 1.0, 1.25, 1.75, 2.0]
    assert list(averages.get_xdata()) == [1, 2]  # the first epoch's average sits at epoch 1
    labels = [t.get_text() for t in lr_ax.get_yticklabels()]
    assert len(labels) > 1 and len(set(labels)) == len(labels)  # a flat lr, still distinct ticks
    assert layers_ax.get_legend() is None
    assert [t.get_text() for t in layers_ax.texts] == ["block1", "block2"]


def test_curves_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="log.txt"):
        save_curves(tmp_path)
    (tmp_path / "log.txt").write_text(json.dumps({"knn_top1": 3.0}) + "\n")
    with pytest.raises(ValueError, match="no per-epoch metrics"):
        save_curves(tmp_path)


def test_compare_runs_function_and_command(tmp_path, capsys):
    a = write_log(tmp_path / "pretrained", epochs=6)
    b = write_log(tmp_path / "scratch", epochs=4, offset=1.0)
    names = compare_runs([a, b], tmp_path / "cmp.png", metrics=["loss", "entropy"])
    assert names == ["train_loss", "train_teacher_entropy"]
    open_png(tmp_path / "cmp.png")
    # the command line: all scalar metrics (the list-valued one is left out), custom labels
    curves_main([str(a), str(b), "--out", str(tmp_path / "cmd.png"), "--labels", "pre", "scr"])
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'cmd.png'}: 3 panels (train_loss, train_lr, ")
    assert open_png(tmp_path / "cmd.png").size[0] == 3 * 330
    with pytest.raises(SystemExit):  # argparse's error line and exit status 2
        curves_main([str(a), str(tmp_path / "missing")])
    assert "does not exist" in capsys.readouterr().err


# ============ visualize_attention.py drawing ============

def test_attention_heat_maps_masks_and_overview(tmp_path):
    import visualize_attention as va
    torch.manual_seed(0)
    attn = torch.rand(3, 4, 4).softmax(-1)
    va.save_heat_map(va.upscale(attn[0], 8), tmp_path / "head.png")
    heat = open_png(tmp_path / "head.png")
    assert heat.size == (32, 32)
    pixels = np.asarray(heat.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 4  # coloured, not one flat colour
    image = np.random.rand(32, 32, 3)
    masks = va.upscale(va.threshold_masks(attn, 0.6), 8)
    va.save_mask(image, masks[1].numpy(), va.head_color(1), tmp_path / "mask.png", "head 1")
    open_png(tmp_path / "mask.png")
    fig = va.attention_figure(image, va.upscale(attn, 8), masks, 0.6, "title")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:2] == ["image", "head 0"] and "head 2: 0.6 of the mass" in titles
    assert sum(t == "" for t in titles) == 3  # one colour bar per head
    assert figure_to_array(fig).ndim == 3
