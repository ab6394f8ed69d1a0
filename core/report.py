"""Test reports of the evaluation scripts: classification metrics (scikit-learn, so the numbers
are exactly sklearn's) and their figures, drawn with matplotlib: a grid of predictions, a bar
chart and a confusion-matrix heat map (sklearn's ConfusionMatrixDisplay).

    metrics = classification_metrics(y_true, y_pred, num_classes, names)
    print(format_report(metrics))
    save_prediction_grid(images, targets, preds, confidences, names, "predictions.png", mean, std)
    save_confusion_matrix(metrics["confusion_matrix"], names, "confusion_matrix.png")
    save_bar_chart(["block1", ...], [61.2, ...], "probe_layers.png", "top-1 (%) per layer")

Figures are matplotlib `Figure` objects made outside pyplot (sklearn's ConfusionMatrixDisplay
imports it, but draws on the axes it is given), so there is no window and no pyplot figure to
close: savefig renders them with Agg. Each save_* returns its figure, which figure_to_array
turns into an image for TensorBoard's add_image.
"""
import os
import textwrap

import numpy as np
import torch


def class_names(dataset, num_classes):
    """The dataset's class names (.classes: torchvision's, an ImageFolder's folders, an npy
    dataset's classes.txt), also through the datasets it wraps (.dataset: a held-out subset, a
    LoadedSplit), else '0', '1', ..."""
    while dataset is not None:
        names = getattr(dataset, "classes", None)
        if names is not None and len(names) == num_classes:
            return [str(n) for n in names]
        dataset = getattr(dataset, "dataset", None)
    return [str(i) for i in range(num_classes)]


def classification_metrics(y_true, y_pred, num_classes, names=None):
    """Accuracy, per-class precision / recall / F1 / support, their macro and weighted averages
    and the confusion matrix (rows: true class, columns: predicted), all from sklearn.metrics
    with labels 0..C-1 (a class absent from the test set still gets its row, scored 0)."""
    from sklearn.metrics import (accuracy_score, classification_report, confusion_matrix,
                                 precision_recall_fscore_support)
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(num_classes))
    names = names or [str(i) for i in labels]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    out = {
        "accuracy": 100.0 * accuracy_score(y_true, y_pred),
        "num_samples": int(len(y_true)),
        "per_class": [{"class": names[c], "precision": float(precision[c]),
                       "recall": float(recall[c]), "f1": float(f1[c]), "support": int(support[c])}
                      for c in labels],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "report": classification_report(y_true, y_pred, labels=labels, target_names=names,
                                        digits=4, zero_division=0),
    }
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                     average=avg, zero_division=0)
        out[f"{avg}_avg"] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    return out


def format_report(metrics):
    """Text of the accuracy, sklearn's classification report and the confusion matrix."""
    names = [row["class"] for row in metrics["per_class"]]
    cm = np.asarray(metrics["confusion_matrix"])
    width = max(max(len(n) for n in names), len(str(cm.max())), 4) + 1
    head = " " * width + "".join(f"{n[:width - 1]:>{width}}" for n in names)
    rows = [f"{n[:width - 1]:>{width}}" + "".join(f"{v:>{width}}" for v in row)
            for n, row in zip(names, cm)]
    return (f"Accuracy: {metrics['accuracy']:.2f}% ({metrics['num_samples']} test images)\n\n"
            f"{metrics['report']}\nConfusion matrix (rows: true class, columns: predicted):\n"
            + "\n".join([head] + rows))


# ============ matplotlib helpers (also used by core/curves.py, visualize_attention.py) ============

DPI = 100


def new_figure(width, height, layout="constrained"):
    """A matplotlib Figure of width x height inches at DPI, outside pyplot (imported here, so
    that importing this module does not pay for matplotlib). layout=None leaves the placement
    to the caller (constrained layout measures every label: half the drawing time)."""
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=DPI, layout=layout)


def save_figure(fig, path):
    """PNG at `path`, written to a temporary file then renamed, so a reader (TensorBoard, an
    image viewer refreshing curves.png) never sees half a file."""
    tmp = f"{path}.tmp"
    fig.savefig(tmp, format="png", dpi=fig.dpi)
    os.replace(tmp, path)


def figure_to_array(fig):
    """The figure rendered as an (H, W, 3) uint8 RGB array, for
    SummaryWriter.add_image(tag, array, step, dataformats="HWC")."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _short(name, n):
    return name if len(name) <= n else name[:n - 1] + "~"


# ============ figures ============

def save_prediction_grid(images, targets, preds, confidences, names, path, mean, std, nrow=8,
                         tile=128):
    """images (N, 3, H, W) normalised with mean/std; targets, preds (N,) ints; confidences (N,)
    softmax probabilities of the predicted class. One panel of about `tile` pixels per image,
    `nrow` panels a row, titled 'pred: <class> (<conf>%)' (green if right, red if wrong) over
    'true: <class>'. Returns the figure."""
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    images = (images.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    n = len(images)
    cols = min(nrow, n)
    rows = -(-n // cols)
    side = tile / DPI
    fig = new_figure(cols * side, rows * (side + 0.45))
    for i, (img, t, p, c) in enumerate(zip(images, targets, preds, confidences)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(img, interpolation="nearest")  # small images stay crisp
        ax.set_xticks([])
        ax.set_yticks([])
        right = int(p) == int(t)
        ax.set_title(f"pred: {_short(names[int(p)], 12)} ({100 * float(c):.0f}%)", fontsize=8,
                     color="tab:green" if right else "tab:red")
        ax.set_xlabel(f"true: {_short(names[int(t)], 16)}", fontsize=8)
    save_figure(fig, path)
    return fig


def save_confusion_matrix(confusion, names, path, title="Confusion matrix"):
    """confusion (C, C) counts, rows: true class, columns: predicted (sklearn's layout), drawn by
    sklearn's ConfusionMatrixDisplay. Cells are coloured by the fraction of their true class
    (row-normalised, so rare classes show as clearly as common ones) and, up to 20 classes,
    labelled with their counts (zeros blank); class names on the axes up to 40 classes,
    class indices above.
    Returns the figure."""
    from sklearn.metrics import ConfusionMatrixDisplay  # (imports pyplot; draws on our figure)
    cm = np.asarray(confusion, dtype=np.int64)
    c = len(cm)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = min(max(4.0, 0.4 * c + 2.5), 16.0)
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    short = [_short(str(n), 12) for n in names]
    display = ConfusionMatrixDisplay(frac, display_labels=short).plot(
        ax=ax, cmap="Blues", colorbar=False, include_values=c <= 20, text_kw={"fontsize": 8},
        im_kw={"vmin": 0, "vmax": 1}, xticks_rotation=90 if max(map(len, short)) > 3 else 0)
    if display.text_ is not None:  # the counts, in a colour that reads on the cell's fraction
        for (i, j), text in np.ndenumerate(display.text_):
            if cm[i, j]:
                text.set_text(str(cm[i, j]))
                text.set_color("white" if frac[i, j] > 0.5 else "black")
            else:
                text.remove()  # an empty cell stays blank
    fig.colorbar(display.im_, ax=ax, shrink=0.8, label="fraction of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if c > 40:  # too many names to read: matplotlib's own ticks, class indices every few
        from matplotlib.ticker import AutoLocator, ScalarFormatter
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(AutoLocator())
            axis.set_major_formatter(ScalarFormatter())
        ax.tick_params(axis="x", labelrotation=0)
    save_figure(fig, path)
    return fig


def save_bar_chart(labels, values, path, title, width=None, height=320, ylabel="top-1 (%)"):
    """A vertical bar chart of values in [0, 100] (e.g. top-1 per layer), the value above each
    bar; width and height in pixels (width: enough for the labels by default). Returns the
    figure."""
    n = len(labels)
    width = width or max(320, 60 * n + 100)
    fig = new_figure(width / DPI, height / DPI)
    ax = fig.add_subplot()
    bars = ax.bar(range(n), [float(v) for v in values], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(n), [str(x) for x in labels], rotation=45 if n > 8 else 0, fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel(ylabel)
    # wrapped to the figure's width (about 9 px a character at 10 pt, the axes narrower than the figure), never cut off
    ax.set_title(textwrap.fill(title, max(20, int(width / 9))), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    return fig
