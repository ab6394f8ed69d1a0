"""Linear (or MLP) probing of a frozen backbone, as facebookresearch/dino eval_linear.py.

    python eval_linear.py --pretrained_weights out/checkpoint.pth --dataset digits --output_dir out/linear
    torchrun --nproc_per_node=4 eval_linear.py --arch vit_small --patch_size 16 \
        --pretrained_weights dino_deitsmall16_pretrain.pth --n_last_blocks 4 --avgpool_patchtokens 0 \
        --dataset imagefolder --data_path /imagenet --output_dir out/linear
Minutes instead of hours: features extracted once without augmentation, the head trained on them:
    python eval_linear.py --pretrained_weights out/checkpoint.pth --cached_features true
What each layer knows (one probe per block's CLS / per ResNet stage, a table and a PNG):
    python eval_linear.py --pretrained_weights out/checkpoint.pth --probe_layers true --cached_features true
The non-linear probe: --head mlp --mlp_dims 512 256.

The backbone is frozen (eval mode, no gradients) and proven so: its state_dict is compared with a
snapshot after training, as facebookresearch/moco-v3 main_lincls.py's sanity_check.
Without --pretrained_weights the probe runs on the random init (the baseline).
"""
import argparse
import copy
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from core import dist as distu
from core.checkpoint import load_backbone, load_file, save_atomic
from core.curves import save_curves
from core.logger import MetricLogger, bool_flag
from data import DATASETS, SingleViewTransform, build_dataset, dataset_info, eval_transform
from eval_knn import extract_features, feature_function
from models import ARCHS, feature_dim, is_vit, layerwise_features


def avgpool_type(s):
    """DINO's bool flag (false -> 0, true -> 2: CLS and patch mean) or iBOT's 0 / 1 / 2."""
    if s.lower() in {"false", "off", "no"}:
        return 0
    if s.lower() in {"true", "on", "yes"}:
        return 2
    if s in {"0", "1", "2"}:
        return int(s)
    raise argparse.ArgumentTypeError("use 0 (CLS), 1 (patch mean), 2 (both), or false / true")


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("Evaluation with linear classification", add_help=add_help)
    # Features of the frozen backbone
    parser.add_argument("--n_last_blocks", default=4, type=int,
                        help="ViT: concatenate the CLS tokens of the last n blocks. We use n=4 "
                             "for ViT-Small and n=1 with ViT-Base (DINO). Ignored by ResNets.")
    parser.add_argument("--avgpool_patchtokens", default=0, type=avgpool_type,
                        help="ViT: 0 (false) = CLS tokens only, 1 = mean of the last block's "
                             "patch tokens, 2 (true) = both concatenated. DINO: false for "
                             "ViT-Small, true for ViT-Base.")
    parser.add_argument("--arch", default=None, type=str, choices=ARCHS,
                        help="Architecture (default: from the checkpoint, else vit_small).")
    parser.add_argument("--patch_size", default=None, type=int,
                        help="ViT patch size (default: from the checkpoint, else 16).")
    parser.add_argument("--image_size", default=None, type=int,
                        help="Input resolution (default: the checkpoint's training crop, else "
                             "the dataset's native size).")
    parser.add_argument("--cifar_stem", default=None, type=bool_flag,
                        help="ResNet CIFAR stem (default: from the checkpoint / image size).")
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="Path to pretrained weights to evaluate; empty: random init.")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='Key to use in the checkpoint (example: "teacher"); a checkpoint '
                             "without it (SimCLR, rotation) falls back to its one network.")

    # The probe and its training
    parser.add_argument("--head", default="linear", type=str, choices=["linear", "mlp"],
                        help="linear (DINO) or mlp, a non-linear probe with --mlp_dims hidden "
                             "layers (Linear-BN-ReLU each).")
    parser.add_argument("--mlp_dims", default=[512, 256], type=int, nargs="+",
                        help="Hidden widths of the MLP probe.")
    parser.add_argument("--epochs", default=100, type=int, help="Number of epochs of training.")
    parser.add_argument("--lr", default=0.001, type=float,
                        help="Learning rate at the start of the cosine schedule, for a global "
                             "batch of 256 (linear scaling rule). DINO: 0.001 for ViT-S.")
    parser.add_argument("--weight_decay", default=0.0, type=float,
                        help="SGD weight decay of the probe (DINO: 0).")
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Per-GPU batch-size")
    parser.add_argument("--probe_layers", default=False, type=bool_flag,
                        help="Train one probe per depth (every ViT block's CLS, every ResNet "
                             "stage's pooled map) at once; prints a table and saves "
                             "probe_layers.png. Ignores --n_last_blocks/--avgpool_patchtokens.")
    parser.add_argument("--cached_features", default=False, type=bool_flag,
                        help="Extract the features once, without augmentation, and train the "
                             "head on them: minutes instead of hours (the probe then sees no "
                             "random crops, usually about 1 point below).")

    # Data
    parser.add_argument("--dataset", default="digits", type=str, choices=sorted(DATASETS),
                        help="Dataset name; imagefolder expects train/ and val/ (or test/).")
    parser.add_argument("--data_path", default="", type=str, help="Dataset root.")
    parser.add_argument("--val_split", default=0, type=float,
                        help="0: validate on the official val/test split (DINO); N (or a "
                             "fraction): hold N train images out for validation and report the "
                             "test accuracy of the best-on-validation probe.")
    parser.add_argument("--num_labels", default=None, type=int,
                        help="Number of labels for the classifier (default: the dataset's).")

    # Misc
    parser.add_argument("--val_freq", default=1, type=int, help="Epoch frequency for validation.")
    parser.add_argument("--evaluate", action="store_true",
                        help="Only evaluate the probe of --linear_weights (default: "
                             "<output_dir>/checkpoint.pth.tar) on the validation split.")
    parser.add_argument("--linear_weights", default="", type=str,
                        help="Probe weights for --evaluate (ours, or DINO's released linear "
                             "weights with their 'module.linear.*' keys).")
    parser.add_argument("--output_dir", default=".", help="Path to save logs and checkpoints")
    parser.add_argument("--seed", default=0, type=int, help="Random seed.")
    parser.add_argument("--num_workers", default=10, type=int, help="Data loading workers.")
    parser.add_argument("--print_freq", default=20, type=int, help="Progress line frequency.")
    parser.add_argument("--tensorboard", default=True, type=bool_flag,
                        help="Write TensorBoard scalars to <output_dir>/tb (rank 0).")
    parser.add_argument("--dist_url", default="env://", type=str,
                        help="url used to set up distributed training")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int, help="Ignored.")
    parser.add_argument("--cpu", action="store_true", help="Run on CPU even if CUDA is there.")
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


class MLPClassifier(nn.Module):
    """The non-linear probe: [Linear-BN-ReLU] per hidden width, then Linear (keys mlp.*)."""

    def __init__(self, dim, num_labels, hidden_dims):
        super().__init__()
        layers = []
        for h in hidden_dims:
            layers += [nn.Linear(dim, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            dim = h
        self.mlp = nn.Sequential(*layers, nn.Linear(dim, num_labels))

    def forward(self, x):
        return self.mlp(x.view(x.size(0), -1))


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
        raise SystemExit(f"error: the probe in '{path}' does not fit this one ({detail}); use the "
                         "same --head/--probe_layers/--n_last_blocks, or another --output_dir") from None


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
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.world, self.rank = distu.get_world_size(), distu.get_rank()

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        n = len(self.features) // self.world
        return max(1, -(-n // self.batch_size))

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.features), generator=g)
        perm = perm[:len(perm) - len(perm) % self.world][self.rank::self.world].to(self.features.device)
        for i in range(0, len(perm), self.batch_size):
            idx = perm[i:i + self.batch_size]
            yield self.features[idx], self.labels[idx]


def accuracy(logits, target, topk=(1, 5)):
    """Top-k accuracies (%) of logits (N, C) against target (N,)."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    correct = pred.eq(target.view(-1, 1))
    return [correct[:, :min(k, maxk)].any(dim=1).float().mean().item() * 100 for k in topk]


# ============ training and validation ... ============

def train_one_epoch(model, probe, optimizer, batches, epoch, encode, args):
    """encode(images) -> features under no_grad; identity for cached features."""
    probe.train()
    logger = MetricLogger(header=f"Epoch: [{epoch}/{args.epochs}]", print_freq=args.print_freq)
    for x, target in logger.log_every(batches):
        x = x.to(args.device, non_blocking=True)
        target = target.to(args.device, non_blocking=True)
        feats = encode(x)
        outputs = probe(feats)
        loss = sum(F.cross_entropy(o, target) for o in outputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        logger.update(loss=loss.detach() / len(outputs), lr=optimizer.param_groups[0]["lr"])
    return logger.global_averages()


@torch.no_grad()
def validate(model, probe, data, feats_fn, args):
    """data: a dataset (images through the frozen backbone) or a (features, labels) pair.
    Returns one {"acc1", "acc5", "loss"} per head; top-5 only when there are >= 5 labels."""
    probe = probe.module if isinstance(probe, DistributedDataParallel) else probe
    probe.eval()
    if isinstance(data, tuple):
        feats, labels = data
        logits = torch.cat([torch.cat(probe(f), dim=1) for f in feats.split(4096)])
    else:
        labels = torch.as_tensor(data.targets)
        logits = extract_features(model, data, args.batch_size_per_gpu, args.num_workers,
                                  args.device, normalize=False,
                                  feature_fn=lambda m, x: torch.cat(probe(feats_fn(m, x).float()), dim=1))
    labels = labels.to(logits.device)
    out = []
    for lg in logits.split(args.num_labels, dim=1):
        acc1, acc5 = accuracy(lg, labels)
        out.append({"acc1": acc1, "acc5": acc5 if args.num_labels >= 5 else None,
                    "loss": F.cross_entropy(lg, labels).item()})
    return out


def check_args(args):
    if args.epochs < 1 and not args.evaluate:
        raise SystemExit(f"error: --epochs {args.epochs} trains nothing; use --epochs >= 1")
    if args.val_freq < 1 or args.batch_size_per_gpu < 1:
        raise SystemExit("error: --val_freq and --batch_size_per_gpu must be >= 1")
    if args.num_labels is not None and args.num_labels < 2:
        raise SystemExit(f"error: --num_labels {args.num_labels} is too small; a classifier "
                         "needs >= 2 labels (default: the dataset's)")


def run_linear(args):
    """Train (or with --evaluate, evaluate) the probe; the process group must exist. Returns
    {"best_acc", "test_acc", "layers": [{"name", "dim", "best_acc", "test_acc"}]}."""
    check_args(args)
    distu.fix_random_seeds(args.seed)
    info = dataset_info(args.dataset, args.data_path)

    # ============ building network ... ============
    if not args.pretrained_weights and args.image_size is None:
        args.image_size = info.image_size  # random init: pick the stem for this resolution
    model, _ = load_backbone(args)
    args.image_size = args.image_size or info.image_size
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
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)

    # ============ preparing data ... ============
    val_tf = eval_transform(args.image_size, info.mean, info.std)
    train_tf = val_tf if args.cached_features else SingleViewTransform(args.image_size, info.mean, info.std)
    split = dict(val_split=args.val_split, seed=args.seed)
    dataset_train = build_dataset(args.dataset, args.data_path, "train", train_tf, **split)
    dataset_val = build_dataset(args.dataset, args.data_path, "val", val_tf, **split)
    dataset_test = build_dataset(args.dataset, args.data_path, "test", val_tf) if args.val_split else None
    args.num_labels = args.num_labels or dataset_train.num_classes
    if args.num_labels < dataset_train.num_classes:
        raise SystemExit(f"error: --num_labels {args.num_labels} is below the {dataset_train.num_classes} "
                         "classes of the dataset; drop --num_labels to use the dataset's")
    print(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val imgs"
          + (f" ({len(dataset_test)} test imgs held back)." if dataset_test else "."))

    probe = Probe(dims, args.num_labels, args.head, args.mlp_dims).to(args.device)
    if args.distributed and args.head == "mlp" and args.device.type == "cuda":  # SyncBN is GPU-only
        probe = nn.SyncBatchNorm.convert_sync_batchnorm(probe)
    print(f"Probe: {len(dims)} x {args.head} on {dims[0]}-d features"
          + (f" ({', '.join(names)})" if args.probe_layers else "") + f", {args.num_labels} labels.")

    if args.evaluate:
        path = args.linear_weights or os.path.join(args.output_dir, "checkpoint.pth.tar")
        ckpt = load_file(path)
        load_probe(probe, ckpt.get("state_dict", ckpt), path)
        stats = validate(model, probe, dataset_val, feats_fn, args)
        for name, s in zip(names, stats):
            print(f"Accuracy of the network ({name}) on the {len(dataset_val)} test images: {s['acc1']:.1f}%")
        return {"best_acc": stats[0]["acc1"], "test_acc": None,
                "layers": [{"name": n, "dim": d, "best_acc": s["acc1"], "test_acc": None}
                           for n, d, s in zip(names, dims, stats)]}

    if args.cached_features:
        print("Extracting features once, without augmentation (--cached_features)...")

        def cache(dataset):  # (features (N, F) on every rank, labels (N,))
            return (extract_features(model, dataset, args.batch_size_per_gpu, args.num_workers,
                                     args.device, normalize=False, feature_fn=feats_fn),
                    torch.as_tensor(dataset.targets))
        val_data = cache(dataset_val)
        test_data = cache(dataset_test) if dataset_test is not None else None
        batches = FeatureBatches(*cache(dataset_train), args.batch_size_per_gpu, args.seed)
        encode = lambda x: x  # noqa: E731
    else:
        sampler = torch.utils.data.DistributedSampler(dataset_train, num_replicas=args.world_size,
                                                     rank=args.rank, seed=args.seed)
        batches = torch.utils.data.DataLoader(
            dataset_train, sampler=sampler, batch_size=args.batch_size_per_gpu,
            num_workers=args.num_workers, pin_memory=args.device.type == "cuda",
            drop_last=args.head == "mlp" and len(dataset_train) > args.batch_size_per_gpu * args.world_size)
        val_data, test_data = dataset_val, dataset_test

        def encode(x):
            with torch.no_grad(), amp:
                return feats_fn(model, x).float()

    ddp_probe = DistributedDataParallel(probe, device_ids=[args.gpu] if args.device.type == "cuda"
                                        else None) if args.distributed else probe

    # ============ preparing optimizer ... ============
    global_batch = args.batch_size_per_gpu * args.world_size
    lr = args.lr * global_batch / 256.0  # linear scaling rule
    print(f"base lr: {args.lr:.3e}  actual lr: {lr:.3e}  global batch: {global_batch}")
    optimizer = torch.optim.SGD(probe.parameters(), lr, momentum=0.9, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)

    # ============ optionally resume training ... ============
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth.tar")
    start_epoch, best = 0, [0.0] * len(dims)
    best_state = copy.deepcopy(probe.state_dict())
    if os.path.isfile(ckpt_path):
        ckpt = load_file(ckpt_path)
        load_probe(probe, ckpt["state_dict"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, best = ckpt["epoch"], ckpt.get("best_accs", [ckpt["best_acc"]])
        best_state = probe_state(ckpt.get("best_state_dict", ckpt["state_dict"]), len(dims))
        print(f"Found checkpoint at {ckpt_path}: resuming from epoch {start_epoch}.")

    writer = None
    if args.tensorboard and distu.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.output_dir, "tb"))

    for epoch in range(start_epoch, args.epochs):
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        elif hasattr(batches.sampler, "set_epoch"):
            batches.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, ddp_probe, optimizer, batches, epoch, encode, args)
        scheduler.step()
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            stats = validate(model, ddp_probe, val_data, feats_fn, args)
            for i, s in enumerate(stats):
                if s["acc1"] > best[i]:  # keep the best-on-validation head of every layer
                    best[i] = s["acc1"]
                    best_state.update({k: v.detach().clone() for k, v in probe.state_dict().items()
                                       if k.startswith(f"heads.{i}.")})
            s = stats[-1]
            print(f"Accuracy at epoch {epoch} of the network on the {len(dataset_val)} test images: "
                  f"{s['acc1']:.1f}%" + (f"  Max accuracy so far: {best[-1]:.2f}%"))
            log_stats.update(test_acc1=s["acc1"], test_acc5=s["acc5"], test_loss=s["loss"])
            if args.probe_layers:
                log_stats["test_acc1_layers"] = [x["acc1"] for x in stats]
            if writer is not None:
                writer.add_scalar("val/top1", s["acc1"], epoch)
                for name, x in zip(names, stats):
                    if args.probe_layers:
                        writer.add_scalar(f"val_layers/top1_{name}", x["acc1"], epoch)
        if writer is not None:
            writer.add_scalar("train/loss", train_stats["loss"], epoch)
            writer.add_scalar("train/lr", train_stats["lr"], epoch)
        if distu.is_main_process():
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(log_stats) + "\n")
            save_curves(args.output_dir)
            save_atomic({"epoch": epoch + 1, "state_dict": saved_state(probe.state_dict(), len(dims)),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "best_acc": best[-1], "best_accs": best,
                         "best_state_dict": saved_state(best_state, len(dims))}, ckpt_path)

    sanity_check(model, snapshot)  # the backbone must not have moved, in every training run

    # ============ final report ... ============
    test_accs = [None] * len(dims)
    if test_data is not None:  # held-out validation: the best-on-validation heads on test
        probe.load_state_dict(best_state)
        test_accs = [s["acc1"] for s in validate(model, probe, test_data, feats_fn, args)]
    layers = [{"name": n, "dim": d, "best_acc": b, "test_acc": t}
              for n, d, b, t in zip(names, dims, best, test_accs)]
    if args.probe_layers:
        report_layers(layers, args)
    print("Training of the supervised linear classifier on frozen features completed.\n"
          f"Top-1 test accuracy: {best[-1]:.1f}")
    if test_accs[-1] is not None:
        print(f"(best on the {len(dataset_val)} held-out validation images; test accuracy of "
              f"that probe on {len(dataset_test)} test images: {test_accs[-1]:.1f})")
    if writer is not None:
        writer.close()
    return {"best_acc": best[-1], "test_acc": test_accs[-1], "layers": layers}


def report_layers(layers, args):
    """Table of what each layer knows, saved as probe_layers.md and probe_layers.png."""
    col = "test top-1" if layers[0]["test_acc"] is not None else None
    lines = ["| layer | dim | best val top-1 |" + (f" {col} |" if col else ""),
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
                       f"{args.head} probe top-1 (%) per layer, {args.arch} on {args.dataset}")


def eval_linear(args):
    check_args(args)  # bad flags fail before any process group exists
    distu.init_distributed_mode(args)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    results = run_linear(args)
    distu.cleanup()
    return results


if __name__ == "__main__":
    eval_linear(get_args_parser().parse_args())
