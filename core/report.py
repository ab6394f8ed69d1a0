"""Test reports of the evaluation scripts: classification metrics (scikit-learn, so the numbers
are exactly sklearn's), a PNG grid of predictions and a PNG bar chart, drawn with PIL and
torchvision.utils only (no matplotlib).

    metrics = classification_metrics(y_true, y_pred, num_classes, names)
    print(format_report(metrics))
    save_prediction_grid(images, targets, preds, confidences, names, "predictions.png", mean, std)
    save_bar_chart(["block1", ...], [61.2, ...], "probe_layers.png", "top-1 (%) per layer")
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid


def class_names(dataset, num_classes):
    """The dataset's class names (torchvision .classes, also through a held-out subset), else
    '0', '1', ..."""
    for ds in (dataset, getattr(dataset, "dataset", None)):
        names = getattr(ds, "classes", None)
        if names is not None and len(names) == num_classes:
            return [str(n) for n in names]
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


def _font(size):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def save_prediction_grid(images, targets, preds, confidences, names, path, mean, std, nrow=8,
                         tile=128):
    """images (N, 3, H, W) normalised with mean/std; targets, preds (N,) ints; confidences (N,)
    softmax probabilities of the predicted class. Each tile shows the image with
    'pred: <class> (<conf>%)' (green if right, red if wrong) and 'true: <class>' under it."""
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    images = (images.float().cpu() * std + mean).clamp(0, 1)
    images = F.interpolate(images, size=(tile, tile), mode="nearest")  # small images stay crisp
    font, band = _font(12), 32
    tiles = []
    for img, t, p, c in zip(images, targets, preds, confidences):
        canvas = Image.new("RGB", (tile, tile + band), "white")
        canvas.paste(Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))
        draw = ImageDraw.Draw(canvas)
        color = (0, 140, 0) if int(p) == int(t) else (200, 0, 0)
        # names cut to fit the tile (ImageNet's are long)
        draw.text((3, tile + 2), f"pred: {names[int(p)][:12]} ({100 * float(c):.0f}%)", fill=color, font=font)
        draw.text((3, tile + 17), f"true: {names[int(t)][:16]}", fill=(0, 0, 0), font=font)
        tiles.append(torch.from_numpy(np.array(canvas)).permute(2, 0, 1))
    grid = make_grid(torch.stack(tiles), nrow=nrow, padding=4, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def save_bar_chart(labels, values, path, title, width=None, height=320):
    """A vertical bar chart of values in [0, 100] (e.g. top-1 per layer), value above each bar."""
    n = len(labels)
    gap, left, bottom, top = 12, 44, 40, 40
    font, title_font = _font(11), _font(13)
    width = width or max(left + n * 48 + gap, int(title_font.getlength(title)) + left + 10, 320)
    bar = (width - left - gap) / n - gap  # bars share the width left after the axis
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    plot_h = height - top - bottom
    draw.text((left, 10), title, fill=(0, 0, 0), font=title_font)
    for tick in range(0, 101, 25):  # y axis with grid lines at 0, 25, ..., 100
        y = top + plot_h * (1 - tick / 100)
        draw.line([(left, y), (width - 4, y)], fill=(220, 220, 220))
        draw.text((4, y - 6), f"{tick}", fill=(80, 80, 80), font=font)
    for i, (name, v) in enumerate(zip(labels, values)):
        x0 = left + gap + i * (bar + gap)
        y0 = top + plot_h * (1 - max(0.0, min(float(v), 100.0)) / 100)
        draw.rectangle([x0, y0, x0 + bar, top + plot_h], fill=(66, 114, 196))
        draw.text((x0, y0 - 13), f"{v:.1f}", fill=(0, 0, 0), font=font)
        draw.text((x0, top + plot_h + 4), str(name)[:7], fill=(0, 0, 0), font=font)
    img.save(path)
