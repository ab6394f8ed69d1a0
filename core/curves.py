"""Training curves from the JSON lines of a run's log.txt (one line per epoch, as train_ssl.py,
eval_linear.py and finetune.py write them): loss first, then learning rate, then every other
numeric metric, one panel each, against the epoch.

    save_curves("out/dino")                      # out/dino/curves.png, after every epoch
    python -m core.curves out/dino               # the same by hand
    python -m core.curves out/pretrained out/scratch --out cmp.png --metrics loss acc
                                                 # several runs side by side, one line per run

Lines without an "epoch" (e.g. train_ssl's final k-NN line) are not curves and are skipped; when
a resumed run logged an epoch twice the last line wins. A metric that is a list of numbers
(eval_linear's test_acc1_layers) gets one line per entry, named by the record's
"<metric>_labels" list when it has one. The x-axis counts epochs as the console does: the
average of "epoch": 0 in log.txt is drawn at 1, the end of the first epoch. Where the run also
wrote log_steps.txt (core.logger.StepLog: one line per printed step), that metric is drawn per
step, with the epoch averages as dots on it.
"""
import argparse
import json
import math
import os

from core.report import new_figure, save_figure


def read_log(path):
    """log.txt (or its folder) -> the per-epoch records, sorted by epoch."""
    if os.path.isdir(path):
        path = os.path.join(path, "log.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; give a run's output folder (with the "
                                "log.txt its training script writes) or the log file itself")
    by_epoch = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                record = json.loads(line)
                if "epoch" in record:
                    by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def _numeric(v):
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    return isinstance(v, list) and len(v) > 0 and all(_numeric(x) for x in v)


def metric_names(records):
    """The numeric keys of the records except "epoch": those with "loss" first, then those
    ending in "lr", then the rest, each group in the order the log first shows them."""
    names = []
    for r in records:
        names += [k for k, v in r.items() if k != "epoch" and k not in names and _numeric(v)]

    def group(k):
        return 0 if "loss" in k else 1 if k.endswith("lr") or "_lr_" in k else 2
    return sorted(names, key=group)  # sorted() is stable: the log's order within a group


def _schedule(name):
    """Whether a metric is a schedule the run sets (a learning rate, a weight decay), not
    something it measures."""
    return name.endswith(("lr", "wd")) or "_lr_" in name


def _series(records, name):
    """-> (epochs, values) of the records that have `name`; values may be lists."""
    points = [(r["epoch"], r[name]) for r in records if name in r and _numeric(r[name])]
    return [p[0] for p in points], [p[1] for p in points]


def _grid(n, cols=4):
    cols = min(cols, n)
    return math.ceil(n / cols), cols


def _plot(ax, epochs, values, label=None):
    style = dict(marker="o", markersize=3) if len(epochs) <= 30 else {}
    if values and isinstance(values[0], list):  # one line per list entry
        for j in range(max(len(v) for v in values)):
            xs = [e for e, v in zip(epochs, values) if j < len(v)]
            ax.plot(xs, [v[j] for v in values if j < len(v)],
                    label=f"{label} [{j}]" if label else f"[{j}]", **style)
    else:
        ax.plot(epochs, values, label=label, **style)


def _epoch_ticks(ax):
    """Up to 10 epochs: a tick at each whole epoch (the integer locator gives up on one)."""
    epochs = sorted({x for line in ax.get_lines() for x in line.get_xdata()
                     if float(x).is_integer()})
    if 0 < len(epochs) <= 10:
        ax.set_xticks(epochs)


def _widen_flat(ax):
    """A metric that does not change (a fixed teacher temperature) differs between its points
    only by float32 rounding: show it on a band of +-10% around its value instead of
    magnifying that noise into a y-axis of 0.039999999 and 0.040000006."""
    ys = [float(y) for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
    if ys:
        lo, hi = min(ys), max(ys)
        if 0 < hi - lo <= 1e-4 * max(abs(lo), abs(hi)):
            mid = (lo + hi) / 2
            ax.set_ylim(mid - 0.1 * abs(mid), mid + 0.1 * abs(mid))


def _distinct_ticks(ax):
    """y tick labels with as many significant digits as it takes to tell them apart (a flat lr
    of 1e-3 would otherwise read 0.001 on every tick), and no offset text over the title."""
    from matplotlib.ticker import FixedFormatter, FixedLocator
    ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    for digits in range(3, 10):
        labels = [f"{t:.{digits}g}" for t in ticks]
        if len(set(labels)) == len(labels):
            break
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FixedFormatter(labels))


# what a log key means: (panel title, y-axis label); keys not listed read as their words
_MEANING = {
    "loss": ("loss", "loss"), "lr": ("learning rate", "lr"), "wd": ("weight decay", "wd"),
    "acc1": ("top-1 (%)", "%"), "acc5": ("top-5 (%)", "%"), "acc1_layers": ("top-1 per layer (%)", "%"),
    "knn_top1": ("k-NN top-1 (%)", "%"), "teacher_entropy": ("teacher entropy", "nats"),
    "batch_entropy": ("batch-mean entropy", "nats"), "kl": ("KL(teacher || mean)", "nats"),
    "teacher_batch_entropy": ("teacher batch-mean entropy", "nats"),
    "teacher_temp": ("teacher temperature", "temperature"),
    "lr_head": ("head learning rate", "lr"), "lr_backbone": ("backbone learning rate", "lr"),
    "emb_std": ("embedding std", "std"), "erank": ("effective rank", "rank"),
    "loss_cls": ("CLS loss", "loss"), "loss_patch": ("patch loss", "loss"),
}
_SPLITS = {"train": "training", "val": "val", "test": "test"}


def describe(name):
    """A log key -> (panel title, y-axis label): train_loss -> ('training loss', 'loss'),
    test_acc1 -> ('test top-1 (%)', '%'), train_lr -> ('learning rate', 'lr')."""
    split, _, rest = name.partition("_")
    if split not in _SPLITS or not rest:
        split, rest = "", name
    title, ylabel = _MEANING.get(rest, (rest.replace("_", " "), rest.replace("_", " ")))
    if split and rest not in ("lr", "wd") and (split != "train" or "loss" in rest or "acc" in rest):
        title = f"{_SPLITS[split]} {title}"
    return title, ylabel


def read_steps(run_dir):
    """run_dir/log_steps.txt (core.logger.StepLog) -> {metric: (x, values)}, x in epochs as
    the console counts them (the end of epoch 1 is 1.0); {} without the file. A step logged
    twice (a resumed run) keeps its last value."""
    path = os.path.join(run_dir, "log_steps.txt")
    if not os.path.isfile(path):
        return {}
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                by_step[r["step"]] = r
    series = {}
    for step in sorted(by_step):
        r = by_step[step]
        x = r["epoch"] + (r["iter"] + 1) / r["niter"]
        for k, v in r.items():
            if k not in ("epoch", "iter", "niter", "step") and _numeric(v):
                xs, vs = series.setdefault(k, ([], []))
                xs.append(x)
                vs.append(v)
    return series


def _new_panels(names, width=3.3, height=2.4, bottom=0.0):
    """A grid of panels of width x height inches (plus `bottom` inches for a legend), laid out
    by hand: this figure is redrawn after every epoch, and constrained layout would double the
    cost."""
    from matplotlib.ticker import MaxNLocator
    rows, cols = _grid(len(names))
    w, h = cols * width, rows * height + 0.3 + bottom  # 0.3 in for the title
    fig = new_figure(w, h, layout=None)
    fig.subplots_adjust(left=0.6 / w, right=1 - 0.15 / w, top=1 - 0.55 / h,
                        bottom=(0.45 + bottom) / h, wspace=0.38, hspace=0.6)
    axes = []
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        title, ylabel = describe(name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8, labelpad=2)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 0.5
        ax.grid(alpha=0.3)
        axes.append(ax)
    return fig, axes


def _label_lines_at_end(ax, labels):
    """Names at the right end of each line of a list-valued panel, in a margin of their own,
    instead of a legend box over the lines."""
    lines = ax.get_lines()
    x0, x1 = ax.get_xlim()
    ax.set_xlim(x0, x1 + 0.25 * (x1 - x0 or 1))
    for line, label in zip(lines, labels):
        xs, ys = line.get_xdata(), line.get_ydata()
        if len(xs):
            ax.annotate(label, (xs[-1], ys[-1]), xytext=(3, 0), textcoords="offset points",
                        fontsize=6, color=line.get_color(), va="center")


def save_curves(run_dir, path=None):
    """Plot every metric of run_dir/log.txt, one panel each, into `path` (default
    run_dir/curves.png, written atomically). The x-axis counts epochs as the console does (the
    first epoch's average sits at 1); a metric that log_steps.txt also has is drawn per step
    (thin line) under its epoch averages (dots; none for a learning rate or weight decay, whose
    per-step line is the schedule itself). Returns the panel names, in order."""
    records = read_log(run_dir)
    steps = read_steps(run_dir)
    names = metric_names(records)
    if not names:
        raise ValueError(f"{run_dir} has no per-epoch metrics in its log.txt yet")
    fig, axes = _new_panels(names)
    legend = True  # what the thin line and the dots are, told once, in the first such panel
    for ax, name in zip(axes, names):
        epochs, values = _series(records, name)
        if name in steps:
            ax.plot(*steps[name], linewidth=0.8, alpha=0.6, color="tab:blue", label="per step")
            if not _schedule(name):  # (an epoch's mean lr would sit off the lr's own curve)
                ax.plot([e + 1 for e in epochs], values, "o", markersize=3, color="tab:blue",
                        label="epoch average")
                if legend:
                    ax.legend(fontsize=6, loc="best", handlelength=1.2, framealpha=0.6)
                    legend = False
        else:
            _plot(ax, [e + 1 for e in epochs], values)
        _epoch_ticks(ax)
        _widen_flat(ax)
        _distinct_ticks(ax)
        if values and isinstance(values[0], list):
            labels = next((r[f"{name}_labels"] for r in reversed(records)
                           if isinstance(r.get(f"{name}_labels"), list)), None)
            _label_lines_at_end(ax, labels or [f"[{j}]" for j in range(len(values[-1]))])
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)), fontsize=10)
    save_figure(fig, path or os.path.join(run_dir, "curves.png"))
    return names


def compare_runs(run_dirs, path, labels=None, metrics=None):
    """The curves of several runs side by side: one panel per metric that any run logged (or
    only those whose name contains one of `metrics`), one line per run, labelled by `labels`
    (default: the folder names). List-valued metrics are left out. Returns the panel names."""
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs; give one label per run")
    runs = [read_log(d) for d in run_dirs]
    labels = labels or [os.path.basename(os.path.abspath(d)) or d for d in run_dirs]
    names = []
    for records in runs:
        names += [k for k in metric_names(records) if k not in names
                  and not isinstance(_series(records, k)[1][0], list)]
    if metrics:
        names = [k for k in names if any(m in k for m in metrics)]
    if not names:
        raise ValueError(f"no metric to compare in {', '.join(run_dirs)}"
                         + (f" matching {', '.join(metrics)}" if metrics else ""))
    fig, axes = _new_panels(names, bottom=0.3)
    for ax, name in zip(axes, names):
        for records, label in zip(runs, labels):
            epochs, values = _series(records, name)
            if epochs:
                _plot(ax, [e + 1 for e in epochs], values, label)
        _epoch_ticks(ax)
        _widen_flat(ax)
        _distinct_ticks(ax)
    # one legend for the figure: every panel has the same runs in the same colours
    handles, texts = max((ax.get_legend_handles_labels() for ax in axes), key=lambda h: len(h[0]))
    fig.legend(handles, texts, loc="lower center", ncol=min(len(texts), 4), fontsize=8)
    save_figure(fig, path)
    return names


def main(argv=None):
    parser = argparse.ArgumentParser("python -m core.curves", description="Plot the per-epoch "
                                     "metrics of one or several runs from their log.txt.")
    parser.add_argument("runs", nargs="+", help="Output folders of runs (or their log.txt).")
    parser.add_argument("--out", default=None,
                        help="PNG to write; default <run>/curves.png for one run, curves.png "
                             "for several.")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="One legend label per run (default: the folder names).")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help="Only plot metrics whose name contains one of these strings, "
                             "e.g. --metrics loss acc.")
    args = parser.parse_args(argv)
    try:
        if len(args.runs) == 1 and not args.labels and not args.metrics:
            names = save_curves(args.runs[0], args.out)
            out = args.out or os.path.join(args.runs[0], "curves.png")
        else:
            out = args.out or "curves.png"
            names = compare_runs(args.runs, out, args.labels, args.metrics)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(f"{out}: {len(names)} panels ({', '.join(names)})")


if __name__ == "__main__":
    main()
