"""Curves per step (issue 21, item 7) and the progress of feature extraction (item 9): one-epoch
toy runs of train_ssl.py, eval_linear.py and finetune.py write the values of every printed
line to TensorBoard at the global step (train/loss, train/lr, ...) and to log_steps.txt, and
their validation per epoch under tags that name the split; extract_dataset_features prints a
count with an eta. Tiny ViTs on the 4-colour .npy data of test_eval.py, in this process."""
import json
import re

import pytest
import torch

import eval_linear
import finetune
import train_ssl
from core.features import extract_dataset_features
from test_eval import local, npy_root  # noqa: F401  (the fixture: 4 colour classes, 20 + 8 a class)
from test_eval_options import TINY_VIT, data


def scalars(run_dir):
    """{tag: [(step, value), ...]} of the TensorBoard event files in run_dir/tb."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def step_lines(run_dir):
    return [json.loads(x) for x in (run_dir / "log_steps.txt").read_text().splitlines()]


def printed_steps(tb, tag, niter, print_freq, epochs=1):
    """The global steps of `tag`, checked to hold every epoch's every print_freq-th iteration
    and its last (a slow machine may add lines in between: MetricLogger's print_secs)."""
    steps = [s for s, _ in tb[tag]]
    printed = {e * niter + i for e in range(epochs) for i in [*range(0, niter, print_freq), niter - 1]}
    assert printed <= set(steps), (tag, steps)
    assert steps == sorted(steps) and steps[-1] == epochs * niter - 1
    return steps


def test_train_ssl_logs_loss_lr_wd_and_method_stats_per_step(npy_root, tmp_path, capsys):
    # 80 images, batch 16: 5 steps, printed at 0, 2 and 4
    args = train_ssl.parse_args(TINY_VIT + data(npy_root, tmp_path) + [
        "--method", "dino", "--global_crops_size", "16", "--local_crops_number", "0",
        "--out_dim", "32", "--dataset", "npy", "--epochs", "1", "--warmup_epochs", "0",
        "--knn_eval", "false", "--print_freq", "2", "--tensorboard", "true", "--cpu"])
    train_ssl.train_ssl(args)
    tb = scalars(tmp_path)
    steps = printed_steps(tb, "train/loss", 5, 2)
    for tag in ("train/lr", "train/wd", "train/teacher_entropy", "train/teacher_temp"):
        assert [s for s, _ in tb[tag]] == steps, tag
    lr = dict(tb["train/lr"])
    assert lr[0] == pytest.approx(5e-4 * 16 / 256)  # DINO's lr for batch 16, no warmup
    assert lr[4] < lr[2] < lr[0]  # the cosine schedule, step by step
    wd = dict(tb["train/wd"])
    assert wd[0] == pytest.approx(0.04) and wd[4] > wd[0]  # DINO's 0.04 -> 0.4
    # the epoch averages apart, at the epoch (the per-step tags keep one x-axis: the step)
    assert [s for s, _ in tb["train_epoch/loss"]] == [0]
    lines = step_lines(tmp_path)
    assert [r["step"] for r in lines] == steps and lines[0]["niter"] == 5
    assert lines[-1]["train_loss"] == pytest.approx(dict(tb["train/loss"])[4], rel=1e-6)
    assert {"train_lr", "train_wd", "train_teacher_entropy"} <= set(lines[0])
    # the console line shows the same lr
    assert re.search(r"Epoch: \[0/1\] \[0/5\] .* lr: 3\.125e-05 \(3\.125e-05\)  wd: 0\.04 ",
                     capsys.readouterr().out)
    assert (tmp_path / "curves.png").is_file()


def test_eval_linear_logs_train_loss_per_step_and_val_per_epoch(npy_root, tmp_path, capsys):
    args = local(eval_linear.get_args_parser().parse_args(TINY_VIT + data(npy_root, tmp_path) + [
        "--epochs", "2", "--cached_features", "true", "--n_last_blocks", "1",
        "--print_freq", "2", "--tensorboard", "true"]))
    eval_linear.run_linear(args)
    tb = scalars(tmp_path)
    steps = printed_steps(tb, "train/loss", 5, 2, epochs=2)  # 0, 2, 4, 5, 7, 9
    assert [s for s, _ in tb["train/lr"]] == steps
    lr = dict(tb["train/lr"])
    assert lr[0] == pytest.approx(1e-3 * 16 / 256) and lr[5] < lr[4]  # cosine, per epoch
    # validation (the test split here, DINO's protocol) once an epoch, its split in the tag
    for tag in ("val/top1_test", "val/loss_test"):  # (no top-5 with 4 labels)
        assert [s for s, _ in tb[tag]] == [0, 1], tag
    records = [json.loads(x) for x in (tmp_path / "log.txt").read_text().splitlines()]
    assert dict(tb["val/loss_test"])[1] == pytest.approx(records[1]["test_loss"], rel=1e-5)
    assert [r["epoch"] for r in step_lines(tmp_path)][-1] == 1
    # the features were extracted once, with a count on the console
    out = capsys.readouterr().out
    assert re.search(r"^train features: 80/80 images in \d+:\d\d:\d\d$", out, re.M)


def test_finetune_logs_each_lr_group_per_step(npy_root, tmp_path):
    args = local(finetune.get_args_parser().parse_args(TINY_VIT + data(npy_root, tmp_path) + [
        "--epochs", "1", "--warmup_epochs", "0", "--val_split", "16", "--save_predictions", "0",
        "--print_freq", "2", "--tensorboard", "true"]))
    finetune.run_finetune(args)
    tb = scalars(tmp_path)
    steps = printed_steps(tb, "train/loss", 4, 2)  # 64 training images, batch 16
    head, backbone = dict(tb["train/lr_head"]), dict(tb["train/lr_backbone"])
    assert sorted(head) == sorted(backbone) == steps
    assert head[0] == pytest.approx(1e-3) and backbone[0] == pytest.approx(1e-4)  # the defaults
    assert all(backbone[s] == pytest.approx(head[s] / 10) for s in steps)  # one schedule
    assert head[3] < head[0]
    assert [s for s, _ in tb["val/top1_heldout"]] == [0] and "val/loss_heldout" in tb
    record = json.loads((tmp_path / "log.txt").read_text())
    assert record["val_loss"] == pytest.approx(dict(tb["val/loss_heldout"])[0], rel=1e-5)
    assert {"train_lr_head", "train_lr_backbone"} <= set(step_lines(tmp_path)[0])


def test_finetune_of_the_head_alone_logs_no_backbone_lr(npy_root, tmp_path):
    args = local(finetune.get_args_parser().parse_args(TINY_VIT + data(npy_root, tmp_path) + [
        "--epochs", "1", "--warmup_epochs", "0", "--val_split", "16", "--save_predictions", "0",
        "--print_freq", "2", "--unfreeze_last_blocks", "0"]))
    finetune.run_finetune(args)
    names = set(step_lines(tmp_path)[0])
    assert "train_lr_head" in names and "train_lr_backbone" not in names


def test_feature_extraction_prints_count_and_eta(capsys):
    images = torch.rand(40, 3, 4, 4)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(40, dtype=torch.long))

    def extract(**kw):
        return extract_dataset_features(torch.nn.Identity(), dataset, 16, 0, torch.device("cpu"),
                                        feature_fn=lambda m, x: x.flatten(1), normalize=False,
                                        precision="fp32", **kw)
    feats = extract(progress_secs=0, what="train features")
    torch.testing.assert_close(feats, images.flatten(1))
    lines = capsys.readouterr().out.splitlines()
    # a line after each batch but the last (interval 0), then the total and the time it took
    assert [re.sub(r"\d+:\d\d:\d\d", "T", x) for x in lines] == [
        "train features: 16/40 images  eta T", "train features: 32/40 images  eta T",
        "train features: 40/40 images in T"]
    extract()  # the default interval, 10 s: only the closing line in this short run
    assert capsys.readouterr().out.splitlines() == ["features: 40/40 images in 0:00:00"]
    extract(progress_secs=None)
    assert capsys.readouterr().out == ""


def test_curves_draw_schedules_as_lines_and_flat_metrics_on_a_band(tmp_path):
    """curves.png: a learning rate logged per step is its schedule, without epoch-average dots
    off its own line; a constant logged in float32 (DINO's teacher temperature) is not magnified
    into rounding noise."""
    import matplotlib.figure
    from core.curves import save_curves
    from core.logger import MetricLogger, StepLog
    steps = StepLog(tmp_path, prefix="train")
    for epoch in range(2):
        logger = MetricLogger(print_freq=1, print_secs=None, on_print=steps.for_epoch(epoch, 4))
        for i in logger.log_every(range(4)):
            logger.update(loss=torch.tensor(2.0 - i / 8), lr_head=1e-3 * (8 - 4 * epoch - i) / 8,
                          teacher_temp=torch.tensor(0.04))  # float32: 0.03999999910593033
    with open(tmp_path / "log.txt", "w") as f:
        for e in range(2):
            f.write(json.dumps({"train_loss": 1.8, "train_lr_head": 1e-3 / (e + 1),
                                "train_teacher_temp": 0.040000006, "epoch": e}) + "\n")
    captured = {}
    real = matplotlib.figure.Figure.savefig

    def savefig(fig, *a, **kw):
        captured["fig"] = fig
        return real(fig, *a, **kw)
    matplotlib.figure.Figure.savefig = savefig
    try:
        assert save_curves(tmp_path) == ["train_loss", "train_lr_head", "train_teacher_temp"]
    finally:
        matplotlib.figure.Figure.savefig = real
    loss_ax, lr_ax, temp_ax = captured["fig"].axes
    assert len(loss_ax.get_lines()) == 2 and loss_ax.get_legend() is not None  # steps + dots
    assert len(lr_ax.get_lines()) == 1 and lr_ax.get_title() == "head learning rate"
    low, high = temp_ax.get_ylim()
    assert low == pytest.approx(0.036, rel=1e-3) and high == pytest.approx(0.044, rel=1e-3)
