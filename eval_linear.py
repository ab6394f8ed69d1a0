"""Linear (or MLP) probing of a frozen backbone, as facebookresearch/dino eval_linear.py.

    python eval_linear.py --pretrained_weights out/checkpoint.pth --dataset digits --output_dir out/linear
    torchrun --nproc_per_node=4 eval_linear.py --arch vit_small --patch_size 16 \
        --pretrained_weights dino_deitsmall16_pretrain.pth --n_last_blocks 4 --avgpool_patchtokens 0 \
        --dataset imagefolder --data_path /imagenet --output_dir out/linear
Minutes instead of hours: features extracted once without augmentation, the head trained on them:
    python eval_linear.py --pretrained_weights out/checkpoint.pth --cached_features true
What each layer knows (one probe per block's CLS / per ResNet stage, a table and a PNG):
    python eval_linear.py --pretrained_weights out/checkpoint.pth --probe_layers true --cached_features true
The non-linear probe: --head mlp --mlp_dims 512 256 (models/heads.py, as finetune.py's --head mlp).
--lr is for a global batch of 256 (DINO's linear scaling); --lr_scaling none takes it as is.

The best-on-validation probe is scored per class on the scored split: report.txt / report.json
(sklearn's precision / recall / F1 per class, named as the dataset names them) and
confusion_matrix.png, as finetune.py's. --train_split probe trains on another split (probe/).

The backbone is frozen (eval mode, no gradients) and proven so: its state_dict is compared with a
snapshot after training, as facebookresearch/moco-v3 main_lincls.py's sanity_check.
Without --pretrained_weights the probe runs on the random init (the baseline). The run resumes
from <output_dir>/checkpoint.pth.tar only if that file was written with the same flags.
"""
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from core import amp, cli, eval_args, eval_data, eval_runs, model_flags, preempt
from core import dist as distu
from core.checkpoint import (load_file, lock_output_dir, make_output_dir, remove_stale_tmp,
                             save_atomic, unlock_output_dir)
from core.features import extract_dataset_features, feature_function
from core.curves import save_curves
from core.logger import StepLog, bool_flag
from core.optim import lr_for_batch
from core.syncbn import sync_batchnorm
from data import SingleViewTransform, build_dataset, dataset_info, eval_transform
from data.datasets import resolve_split
from data.normalization import with_norm
from models import MLPClassifier, feature_dim, is_vit, layerwise_features


def get_args_parser():
    parser = cli.ArgumentParser("Evaluation with linear classification",
                                parents=[eval_args.get_args_parser()],
                                formatter_class=cli.HelpFormatter)  # every flag with its default
    parser.set_defaults(n_last_blocks=4)  # DINO: 4 for ViT-Small, 1 for ViT-Base

    group = parser.add_argument_group("The probe and its training")
    group.add_argument("--head", default="linear", type=str, choices=["linear", "mlp"],
                       help="linear (DINO) or mlp, a non-linear probe with --mlp_dims hidden "
                            "layers (Linear-BN-ReLU each).")
    group.add_argument("--mlp_dims", default=[512, 256], type=int, nargs="+",
                       help="Hidden widths of the MLP probe.")
    group.add_argument("--epochs", default=100, type=int, help="Number of epochs of training.")
    group.add_argument("--lr", default=0.001, type=float,
                       help="Learning rate at the start of the cosine schedule, for a global "
                            "batch of 256 (linear scaling rule). DINO: 0.001 for ViT-S.")
    group.add_argument("--lr_scaling", default="linear", type=str, choices=["linear", "none"],
                       help="linear: --lr is for a global batch of 256 and scaled by batch / 256 "
                            "(DINO); none: --lr is the rate itself, whatever the batch.")
    group.add_argument("--weight_decay", default=0.0, type=float,
                       help="SGD weight decay of the probe (DINO: 0).")
    group.add_argument("--probe_layers", default=False, type=bool_flag,
                       help="Train one probe per depth (every ViT block's CLS, every ResNet "
                            "stage's pooled map) at once; prints a table and saves "
                            "probe_layers.png. Ignores --n_last_blocks/--avgpool_patchtokens.")
    group.add_argument("--cached_features", default=False, type=bool_flag,
                       help="Extract the features once, without augmentation, and train the "
                            "head on them: minutes instead of hours (the probe then sees no "
                            "random crops, usually about 1 point below).")
    group.add_argument("--val_split", default=0, type=float,
                       help="0: validate on the dataset's val/ (DINO), and when it also has "
                            "test/ report the test/ accuracy of the best-on-val/ probe; N (or a "
                            "fraction): hold N train images out for validation and report the "
                            "--eval_split accuracy of the best-on-validation probe.")
    group.add_argument("--num_labels", default=None, type=int,
                       help="Number of labels for the classifier (default: the dataset's).")

    group = parser.add_argument_group("Misc")
    group.add_argument("--val_freq", default=1, type=int, help="Epoch frequency for validation.")
    group.add_argument("--evaluate", default=False, type=bool_flag, nargs="?", const=True,
                       help="Only evaluate the probe of --linear_weights (default: "
                            "<output_dir>/checkpoint.pth.tar) on the --eval_split split "
                            "(`--evaluate` alone: true).")
    group.add_argument("--linear_weights", default="", type=str,
                       help="Probe weights for --evaluate (ours, or DINO's released linear "
                            "weights with their 'module.linear.*' keys).")
    group.add_argument("--print_freq", default=20, type=int, help="Progress line frequency.")
    group.add_argument("--tensorboard", default=True, type=bool_flag,
                       help="Write TensorBoard scalars to <output_dir>/tb (rank 0).")
    preempt.add_args(group)
    return parser


# ============ the probes ... ============

class LinearClassifier(nn.Module):
    """DINO's linear layer on frozen features: weights N(0, 0.01), bias 0, keys linear.*"""

    def __init__(self, dim, num_labels):
        super().__init__()
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x):
        return self.linear(x.view(x.size(0), -1))


class Probe(nn.Module):
    """One head per feature group: x (B, sum(dims)) -> [logits (B, C)] per group. A single
    group is the usual probe; --probe_layers has one group per layer, all trained at once
    (their parameters are disjoint, so summing their losses trains each on its own)."""

    def __init__(self, dims, num_labels, head="linear", mlp_dims=(512, 256)):
        super().__init__()
        self.dims = list(dims)
        self.heads = nn.ModuleList(LinearClassifier(d, num_labels) if head == "linear"
                                   else MLPClassifier(d, num_labels, mlp_dims) for d in dims)

    def forward(self, x):
        return [h(f) for h, f in zip(self.heads, x.split(self.dims, dim=1))]


def saved_state(sd, n_heads):
    """Probe state -> file: one head is stored with DINO's keys (linear.weight, ...)."""
    return {k[len("heads.0."):]: v for k, v in sd.items()} if n_heads == 1 else sd


def probe_state(sd, n_heads):
    """File -> Probe state; also reads DINO's released {'module.linear.weight', ...}."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if n_heads == 1 and not any(k.startswith("heads.") for k in sd):
        sd = {f"heads.0.{k}": v for k, v in sd.items()}
    return sd


def load_probe(probe, sd, path):
    try:
        probe.load_state_dict(probe_state(sd, len(probe.heads)))
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:160]
        raise ValueError(f"the probe in '{path}' does not fit this one ({detail}); use the same "
                         "--head/--probe_layers/--n_last_blocks, or another --output_dir") from None


def sanity_check(model, snapshot):
    """moco-v3's main_lincls.sanity_check: every tensor of the backbone's state_dict (weights
    and BatchNorm statistics) must be bit-identical to the snapshot taken before training."""
    state = model.state_dict()
    for k, v in snapshot.items():
        if not torch.equal(state[k].detach().cpu(), v):
            raise AssertionError(f"{k} is changed in linear classifier training.")
    print("=> sanity check passed: the backbone is unchanged.")


def layer_names(model):
    return [f"block{i + 1}" for i in range(len(model.blocks))] if is_vit(model) \
        else [f"layer{i + 1}" for i in range(4)]


class FeatureBatches:
    """Shuffled mini-batches of cached features (N, F) and labels, re-drawn every epoch from
    seed + epoch; each rank gets an equal shard (the remainder of N is dropped that epoch), so
    every rank runs the same number of steps."""

    def __init__(self, features, labels, batch_size, seed=0):
        self.features, self.labels = features, labels.to(features.device)
        self.batch_size, self.seed, self.epoch, self.start_iter = batch_size, seed, 0, 0
        self.world, self.rank = distu.get_world_size(), distu.get_rank()

    def set_epoch(self, epoch, start_iter=0):
        self.epoch, self.start_iter = epoch, start_iter

    def __len__(self):
        n = len(self.features) // self.world
        return max(1, -(-n // self.batch_size))

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.features), generator=g)
        perm = perm[:len(perm) - len(perm) % self.world][self.rank::self.world].to(self.features.device)
        for i in range(self.start_iter * self.batch_size, len(perm), self.batch_size):
            idx = perm[i:i + self.batch_size]
            yield self.features[idx], self.labels[idx]


def accuracy(logits, target, topk=(1, 5)):
    """Top-k accuracies (%) of logits (N, C) against target (N,)."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    correct = pred.eq(target.view(-1, 1))
    return [correct[:, :min(k, maxk)].any(dim=1).float().mean().item() * 100 for k in topk]


# ============ building network and data ... ============

def build_frozen_backbone(args, info):
    """The backbone in eval mode without gradients, a snapshot of its state for sanity_check,
    and the features the probe reads: (model, snapshot, feats_fn, names, dims), one name and
    feature size per head (one head, or one per layer with --probe_layers)."""
    model, _ = model_flags.load_backbone(args, default_image_size=info.image_size)
    model.to(args.device).eval()
    for p in model.parameters():
        p.requires_grad = False
    snapshot = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if args.probe_layers:
        names = layer_names(model)
        with torch.no_grad():
            dummy = torch.zeros(2, 3, args.image_size, args.image_size, device=args.device)
            dims = [f.shape[1] for f in layerwise_features(model, dummy)]
        feats_fn = lambda m, x: torch.cat(layerwise_features(m, x), dim=1)  # noqa: E731
    else:
        names = ["features"]
        dims = [feature_dim(model, args.n_last_blocks, args.avgpool_patchtokens)]
        feats_fn = feature_function(args.n_last_blocks, args.avgpool_patchtokens)
    return model, snapshot, feats_fn, names, dims


def build_datasets(args, info):
    """(train, val, test): train augmented unless --cached_features; val, where the probe is
    selected: held out of train with --val_split, else val/ (or the one evaluation split);
    test, scored once at the end by the best-on-val probe: the --eval_split split when it is
    not val itself, else None (DINO: ImageNet's val/ is both). Fills --num_labels."""
    val_tf = eval_transform(args.image_size, info.mean, info.std)
    train_tf = val_tf if args.cached_features else SingleViewTransform(args.image_size, info.mean, info.std)
    if args.cached_features:  # images read once, through --data_backend tensor or pil
        dataset_train = eval_data.eval_split(args, "train", val_tf, val_split=args.val_split)
    else:  # (training_batches builds the augmented loader)
        dataset_train = build_dataset(args.dataset, args.data_path, "train", train_tf,
                                      val_split=args.val_split, seed=args.seed,
                                      train_split=args.train_split)
    dataset_val = eval_data.eval_split(args, "val", val_tf, val_split=args.val_split)
    separate = resolve_split(args.dataset, args.data_path, "test", args.eval_split) != \
        resolve_split(args.dataset, args.data_path, "val", args.eval_split, args.val_split)
    dataset_test = eval_data.eval_split(args, "test", val_tf) if separate else None
    args.num_labels = args.num_labels or dataset_train.num_classes
    if args.num_labels < dataset_train.num_classes:
        raise ValueError(f"--num_labels {args.num_labels} is below the {dataset_train.num_classes} "
                         "classes of the dataset; drop --num_labels to use the dataset's")
    print(f"Data loaded with {len(dataset_train)} train imgs ({dataset_train.split_name}) and "
          f"{len(dataset_val)} val imgs ({dataset_val.split_name})"
          + (f"; {len(dataset_test)} test imgs ({dataset_test.split_name}) held back for the "
             f"best-on-val probe." if dataset_test is not None else ", the split scored."))
    eval_data.check_scored_split(dataset_test if dataset_test is not None else dataset_val)
    return dataset_train, dataset_val, dataset_test


def build_probe(dims, names, args):
    probe = Probe(dims, args.num_labels, args.head, args.mlp_dims).to(args.device)
    probe = sync_batchnorm(probe, args.device)  # BatchNorm statistics over all ranks, CPU too
    print(f"Probe: {len(dims)} x {args.head} on {dims[0]}-d features"
          + (f" ({', '.join(names)})" if args.probe_layers else "") + f", {args.num_labels} labels.")
    return probe


def cached(model, dataset, feats_fn, args, what="features"):
    """(features (N, F) on every rank, labels (N,)) of a dataset, extracted once (progress lines
    named `what`); None for None."""
    if dataset is None:
        return None
    return (extract_dataset_features(model, dataset, args.batch_size_per_gpu, args.num_workers,
                                     args.device, feats_fn, normalize=False, precision=args.precision,
                                     what=what),
            torch.as_tensor(dataset.targets))


def training_batches(model, feats_fn, dataset_train, info, args):
    """What train_one_epoch iterates, and encode(batch) -> features: cached features with the
    identity (--cached_features), or augmented images (data/loaders.py, --data_backend) through
    the frozen backbone. Both have set_epoch(epoch)."""
    if args.cached_features:
        print("Extracting features once, without augmentation (--cached_features)...")
        features, labels = cached(model, dataset_train, feats_fn, args, "train features")
        return FeatureBatches(features, labels, args.batch_size_per_gpu, args.seed), lambda x: x
    loader = eval_data.train_loader(
        args, "train", SingleViewTransform(args.image_size, info.mean, info.std),
        drop_last=args.head == "mlp" and len(dataset_train) > args.batch_size_per_gpu * args.world_size,
        val_split=args.val_split)
    print(f"Augmented training images: {loader.describe}.")

    def encode(x):
        with torch.no_grad(), amp.autocast(args.precision, args.device):
            return feats_fn(model, x).float()
    return loader, encode


# ============ training and validation ... ============

# the end of the one line a loss gone nan/inf stops the run with (core/preempt.py)
NONFINITE_FIX = "Lower --lr, or extract the features in --precision bf16 or fp32 if this was fp16."


def train_one_epoch(probe, optimizer, scaler, encode, epoch, run, args):
    """One epoch of the probe, from where `run` (core.preempt.ResumableRun) stands in it.
    encode(images) -> features under no_grad (identity for cached features). Returns the
    epoch's averages, or None when a signal stopped the ranks mid-epoch (checkpoint written)."""
    probe.train()
    steps = run.epoch(epoch)
    for _, (x, target) in steps:
        x = x.to(args.device, non_blocking=True)
        target = target.to(args.device, non_blocking=True)
        outputs = probe(encode(x))  # the probe itself runs in float32, as DINO's
        loss = sum(F.cross_entropy(o, target) for o in outputs)
        amp.backward_step(loss, optimizer, scaler)
        steps.update(loss / len(outputs), lr=optimizer.param_groups[0]["lr"])
    return steps.averages()


@torch.no_grad()
def probe_logits(model, probe, data, feats_fn, args, what="validation"):
    """(logits (N, heads x C), labels (N,)) of `data`: a dataset (images through the frozen
    backbone) or a (features, labels) pair; `what` names the pass in the progress lines."""
    probe = probe.module if isinstance(probe, DistributedDataParallel) else probe
    probe.eval()
    if isinstance(data, tuple):
        feats, labels = data
        logits = torch.cat([torch.cat(probe(f), dim=1) for f in feats.split(4096)])
    else:
        labels = torch.as_tensor(data.targets)
        logits = extract_dataset_features(
            model, data, args.batch_size_per_gpu, args.num_workers, args.device, normalize=False,
            feature_fn=lambda m, x: torch.cat(probe(feats_fn(m, x).float()), dim=1),
            precision=args.precision, what=what)
    return logits, labels.to(logits.device)


@torch.no_grad()
def validate_network(model, probe, data, feats_fn, args, what="validation", logits=None):
    """data: a dataset (images through the frozen backbone) or a (features, labels) pair;
    logits: probe_logits(...) of it, when already computed.
    Returns one {"acc1", "acc5", "loss"} per head; top-5 only when there are >= 5 labels."""
    logits, labels = logits or probe_logits(model, probe, data, feats_fn, args, what)
    out = []
    for lg in logits.split(args.num_labels, dim=1):
        acc1, acc5 = accuracy(lg, labels)
        out.append({"acc1": acc1, "acc5": acc5 if args.num_labels >= 5 else None,
                    "loss": F.cross_entropy(lg, labels).item()})
    return out


def keep_best(stats, best, best_state, probe):
    """The best-on-validation head of every layer: its accuracy in best[i], its weights in
    best_state (the heads.i.* entries)."""
    for i, s in enumerate(stats):
        if s["acc1"] > best[i]:
            best[i] = s["acc1"]
            best_state.update({k: v.detach().clone() for k, v in probe.state_dict().items()
                               if k.startswith(f"heads.{i}.")})


# ============ resume, evaluate-only, report ... ============

def restart_probe(path, probe, optimizer, scheduler, args):
    """Resume from `path` if it exists and was written by this same run (else a one-line
    error), at the epoch and iteration it was written. Returns (the checkpoint, None for a
    fresh run; best accuracy per head; best-on-validation probe state)."""
    if not os.path.isfile(path):
        return None, [0.0] * len(probe.heads), copy.deepcopy(probe.state_dict())
    ckpt = load_file(path)
    eval_runs.check_resume(path, ckpt, args)
    written_by = preempt.check_resumable(path, ckpt, args,
                                         lambda batch: lr_for_batch(args.lr, batch, args.lr_scaling))
    load_probe(probe, ckpt["state_dict"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if written_by and written_by != args.world_size and args.lr_scaling == "linear":
        # (--allow_world_size_change true; with --lr_scaling none the lr is the batch's own)
        # the saved optimizer and schedule hold the lr of the old global batch: rescale them
        scale = args.world_size / written_by
        scheduler.base_lrs = [lr * scale for lr in scheduler.base_lrs]
        for group in optimizer.param_groups:
            group["lr"] *= scale
            if "initial_lr" in group:
                group["initial_lr"] *= scale
    start_iter = ckpt.get("iteration", 0)
    print(f"Found checkpoint at {path}: resuming from epoch {ckpt['epoch']}"
          + (f", iteration {start_iter}." if start_iter else "."))
    best_state = probe_state(ckpt.get("best_state_dict", ckpt["state_dict"]), len(probe.heads))
    return ckpt, ckpt.get("best_accs", [ckpt["best_acc"]]), best_state


def evaluate_probe(model, probe, feats_fn, dataset, names, dims, args):
    """--evaluate: the saved probe (--linear_weights, else this run's checkpoint) on the
    --eval_split split."""
    path = args.linear_weights or os.path.join(args.output_dir, "checkpoint.pth.tar")
    ckpt = load_file(path)
    if not args.linear_weights:
        eval_runs.check_resume(path, ckpt, args)
    load_probe(probe, ckpt.get("state_dict", ckpt), path)
    stats = validate_network(model, probe, dataset, feats_fn, args, dataset.split_name)
    for name, s in zip(names, stats):
        print(f"Accuracy of the network ({name}) on the {len(dataset)} {dataset.split_name} "
              f"images: {s['acc1']:.1f}%")
    splits = {"best_acc": dataset.split_name, "test_acc": dataset.split_name}
    return {"best_acc": stats[-1]["acc1"], **test_numbers(stats[-1]["acc1"], None),
            "splits": splits,
            "layers": [{"name": n, "dim": d, "best_acc": s["acc1"],
                        **test_numbers(s["acc1"], None)} for n, d, s in zip(names, dims, stats)]}


def class_report(logits, labels, dataset, args):
    """The probe's per-class report on the scored split, as finetune.py's: accuracy, sklearn's
    per-class precision / recall / F1 with the dataset's class names (core/report.py
    class_names: folder names, an npy dataset's classes.txt) and the confusion matrix, in
    report.txt, report.json and confusion_matrix.png (rank 0)."""
    from core.report import (class_names, classification_metrics, format_report,
                             save_confusion_matrix)
    names = class_names(dataset, args.num_labels)
    metrics = classification_metrics(labels.cpu().numpy(), logits.argmax(1).cpu().numpy(),
                                     args.num_labels, names)
    if distu.is_main_process():
        text = format_report(metrics)
        print(f"Per-class report of the best-on-validation probe on {dataset.split_name}:\n{text}")
        with open(os.path.join(args.output_dir, "report.txt"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.output_dir, "report.json"), "w") as f:
            json.dump({**{k: v for k, v in metrics.items() if k != "report"},
                       "split": dataset.split_name}, f, indent=1)
        save_confusion_matrix(metrics["confusion_matrix"], names,
                              os.path.join(args.output_dir, "confusion_matrix.png"),
                              f"{args.head} probe, {args.arch} on {args.dataset} "
                              f"{dataset.split_name}: {metrics['accuracy']:.2f}% top-1")
    return metrics


def report(model, probe, best, best_state, test_data, feats_fn, names, dims, args, splits,
           scored=None):
    """Final numbers: the best validation accuracy of every head and, when there is a test
    split apart from val (--val_split, or val/ and test/), the test accuracy of the
    best-on-validation heads; per-layer table with --probe_layers; results.json, whose
    "splits" names the split of each number (splits: {"best_acc": ..., "test_acc": ...}).
    scored: (its data, its dataset) of the split scored, for the per-class report of the
    best-on-validation probe (class_report; one head only)."""
    test_accs = [None] * len(dims)
    probe.load_state_dict(best_state)
    logits = probe_logits(model, probe, scored[0], feats_fn, args, scored[1].split_name) \
        if scored else None
    if test_data is not None:
        test_accs = [s["acc1"] for s in validate_network(model, probe, test_data, feats_fn, args,
                                                         "test", logits)]
    if scored and len(dims) == 1:
        class_report(*logits, scored[1], args)
    layers = [{"name": n, "dim": d, "best_acc": b, "test_acc": t}
              for n, d, b, t in zip(names, dims, best, test_accs)]
    if args.probe_layers:
        report_layers(layers, splits, args)
    kind = {"linear": "linear classifier", "mlp": "MLP classifier"}[args.head]
    print(f"Training of the supervised {kind} on frozen features completed.")
    if test_accs[-1] is None:  # DINO: the best epoch on val/, ImageNet's test set
        print(f"Top-1 test accuracy on {splits['best_acc']}: {best[-1]:.1f} (the best epoch's)")
        splits = {**splits, "test_acc": splits["best_acc"]}
    else:
        n_test = len(test_data[1]) if isinstance(test_data, tuple) else len(test_data)
        print(f"Top-1 on {splits['best_acc']} (where the probe is selected): {best[-1]:.1f}\n"
              f"Top-1 test accuracy on {splits['test_acc']} ({n_test} images) of the "
              f"best-on-{splits['best_acc']} probe: {test_accs[-1]:.1f}")
    results = {"best_acc": best[-1], **test_numbers(test_accs[-1], best[-1]), "splits": splits,
               "layers": [{**x, **test_numbers(x["test_acc"], x["best_acc"])} for x in layers]}
    if distu.is_main_process():
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


def test_numbers(test_acc, best_acc):
    """results.json's test accuracy, never null: with a selection split apart from the scored
    one (val/ and test/, or --val_split), the test accuracy of the best-on-validation probe
    (selected_on "val"); without, validation was the scored split itself, so its best is the
    test number (DINO's protocol; selected_on "test")."""
    if test_acc is not None and best_acc is not None:
        return {"test_acc": test_acc, "selected_on": "val"}
    return {"test_acc": best_acc if test_acc is None else test_acc, "selected_on": "test"}


def report_layers(layers, splits, args):
    """Table of what each layer knows, saved as probe_layers.md and probe_layers.png."""
    col = f"{splits['test_acc']} top-1" if layers[0]["test_acc"] is not None else None
    lines = [f"| layer | dim | best {splits['best_acc']} top-1 |" + (f" {col} |" if col else ""),
             "|---|---|---|" + ("---|" if col else "")]
    lines += [f"| {x['name']} | {x['dim']} | {x['best_acc']:.2f} |"
              + (f" {x['test_acc']:.2f} |" if col else "") for x in layers]
    table = "\n".join(lines)
    print("What each layer knows (one probe per layer):\n" + table)
    if distu.is_main_process():
        from core.report import save_bar_chart
        with open(os.path.join(args.output_dir, "probe_layers.md"), "w") as f:
            f.write(table + "\n")
        save_bar_chart([x["name"] for x in layers],
                       [x["test_acc"] if col else x["best_acc"] for x in layers],
                       os.path.join(args.output_dir, "probe_layers.png"),
                       f"{args.head} probe top-1 (%) per layer, {args.arch} on {args.dataset} "
                       f"{splits['test_acc'] or splits['best_acc']}")


# ============ the run ... ============

def check_args(args):
    eval_args.check_common_args(args)
    if args.epochs < 1 and not args.evaluate:
        raise ValueError(f"--epochs {args.epochs} trains nothing; use --epochs >= 1")
    if args.val_freq < 1 or args.batch_size_per_gpu < 1:
        raise ValueError("--val_freq and --batch_size_per_gpu must be >= 1")
    if args.num_labels is not None and args.num_labels < 2:
        raise ValueError(f"--num_labels {args.num_labels} is too small; a classifier needs >= 2 "
                         "labels (default: the dataset's)")
    eval_data.check_eval_data(args, args.val_split)  # before any image is read


def run_linear(args):
    """Train (or with --evaluate, evaluate) the probe; the process group must exist. Returns
    {"best_acc", "test_acc", "layers": [{"name", "dim", "best_acc", "test_acc"}]}."""
    try:
        return _run_linear(args)
    finally:  # the lock of --output_dir (rank 0, taken before training) ends with the run
        unlock_output_dir(args.output_dir)


def _run_linear(args):
    """run_linear's body; run_linear releases the lock of --output_dir when it ends."""
    check_args(args)
    distu.fix_random_seeds(args.seed)
    amp.resolve_precision(args, args.device)
    info = dataset_info(args.dataset, args.data_path)

    # ============ building network ... ============
    model, snapshot, feats_fn, names, dims = build_frozen_backbone(args, info)
    info = with_norm(info, args)  # the statistics the weights were trained with (printed)
    dataset_train, dataset_val, dataset_test = build_datasets(args, info)
    probe = build_probe(dims, names, args)
    args.output_dir = args.output_dir or eval_runs.default_output_dir("eval_linear", args)
    cli.print_args(args)  # every flag final from here on: the listing is what checkpoints store
    print(f"Output folder: {args.output_dir}")
    make_output_dir(args.output_dir)  # writable, before any feature is extracted
    if args.evaluate:
        scored = dataset_test if dataset_test is not None else dataset_val
        return evaluate_probe(model, probe, feats_fn, scored, names, dims, args)
    if distu.is_main_process():
        lock_output_dir(args.output_dir)  # one training run per folder, held until this one ends
    splits = {"best_acc": dataset_val.split_name,
              "test_acc": dataset_test.split_name if dataset_test is not None else None}

    # ============ preparing data ... ============
    batches, encode = training_batches(model, feats_fn, dataset_train, info, args)
    if args.cached_features:
        val_data = cached(model, dataset_val, feats_fn, args, "val features")
        test_data = cached(model, dataset_test, feats_fn, args, "test features")
    else:
        val_data, test_data = dataset_val, dataset_test
    ddp_probe = DistributedDataParallel(probe, device_ids=[args.gpu] if args.device.type == "cuda"
                                        else None) if args.distributed else probe

    # ============ preparing optimizer ... ============
    global_batch = args.batch_size_per_gpu * args.world_size
    lr = lr_for_batch(args.lr, global_batch, args.lr_scaling)  # linear scaling rule, or none
    print(f"base lr: {args.lr:.3e}  actual lr: {lr:.3e}  global batch: {global_batch} "
          f"(--lr_scaling {args.lr_scaling})")
    optimizer = torch.optim.SGD(probe.parameters(), lr, momentum=0.9, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)
    scaler = amp.grad_scaler(args.precision, args.device)

    # ============ optionally resume training ... ============
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if distu.is_main_process():
        remove_stale_tmp(args.output_dir)  # the unfinished writes of a killed run
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth.tar")
    resume, best, best_state = restart_probe(ckpt_path, probe, optimizer, scheduler, args)

    def save_checkpoint(position):
        """checkpoint.pth.tar (rank 0) at `position` (core/preempt.py: the epoch, the iteration
        in it, the data order, every rank's generators and running sums)."""
        if distu.is_main_process():
            save_atomic({**position, "state_dict": saved_state(probe.state_dict(), len(dims)),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "best_acc": best[-1], "best_accs": best,
                         "best_state_dict": saved_state(best_state, len(dims)),
                         "args": eval_runs.run_args(args)}, ckpt_path)

    writer = None
    if args.tensorboard and distu.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.output_dir, "tb"))
    # the printed lines' loss and lr: TensorBoard train/<name> at the global step, log_steps.txt
    steps = StepLog(args.output_dir, writer, prefix="train", main_process=distu.is_main_process())
    # the split the probe is validated on, in the TensorBoard tags (as log.txt's "test_*" keys,
    # DINO's names, do not say it)
    val_key = getattr(dataset_val, "split_key", "heldout" if args.val_split else "test")

    # the epochs from the checkpoint's position; on SIGTERM / SIGUSR1 / Ctrl-C the ranks finish
    # the step, save, and stop (exit 0, or 130 after Ctrl-C)
    run = preempt.ResumableRun(args, batches, save_checkpoint, resume=resume, step_log=steps,
                               fix=NONFINITE_FIX)
    for epoch in run.epochs():
        train_stats = train_one_epoch(ddp_probe, optimizer, scaler, encode, epoch, run, args)
        if train_stats is None:  # stopped mid-epoch by a signal, checkpoint written
            break
        scheduler.step()
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            stats = validate_network(model, ddp_probe, val_data, feats_fn, args)
            keep_best(stats, best, best_state, probe)
            s = stats[-1]
            print(f"Accuracy at epoch {epoch} of the network on the {len(dataset_val)} "
                  f"{dataset_val.split_name} images: {s['acc1']:.1f}%  Max accuracy so far: "
                  f"{best[-1]:.2f}%")
            # DINO's keys (test_acc1: ImageNet's val/), "split" names the split they come from
            log_stats.update(test_acc1=s["acc1"], test_acc5=s["acc5"], test_loss=s["loss"],
                             split=dataset_val.split_name)
            if args.probe_layers:
                log_stats["test_acc1_layers"] = [x["acc1"] for x in stats]
            if writer is not None:
                for name, value in (("top1", s["acc1"]), ("top5", s["acc5"]), ("loss", s["loss"])):
                    if value is not None:
                        writer.add_scalar(f"val/{name}_{val_key}", value, epoch)
                if args.probe_layers:
                    for name, x in zip(names, stats):
                        writer.add_scalar(f"val_layers/top1_{name}_{val_key}", x["acc1"], epoch)
        if writer is not None:  # (train/<name>: per step, StepLog)
            writer.add_scalar("train_epoch/loss", train_stats["loss"], epoch)
            writer.add_scalar("train_epoch/lr", train_stats["lr"], epoch)
        run.save(epoch + 1)
        if distu.is_main_process():
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(log_stats) + "\n")
            save_curves(args.output_dir)
    if writer is not None:
        writer.close()
    if run.stopped:  # by a signal, checkpoint written
        run.finish()
        return None

    sanity_check(model, snapshot)  # the backbone must not have moved, in every training run
    scored = (test_data, dataset_test) if test_data is not None else (val_data, dataset_val)
    return report(model, probe, best, best_state, test_data, feats_fn, names, dims, args, splits,
                  None if args.probe_layers else scored)


def eval_linear(args):
    check_args(args)  # bad flags fail before any process group exists
    distu.init_distributed_mode(args)
    results = run_linear(args)  # None when a signal stopped it (checkpoint written)
    distu.cleanup()
    if results is None and preempt.LAST_EXIT_CODE:
        sys.exit(preempt.LAST_EXIT_CODE)  # 130 after Ctrl-C
    return results


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.run(lambda: eval_linear(args))
