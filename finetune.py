"""Fine-tuning a pretrained backbone with a linear head, and the from-scratch baseline with the
same recipe (no --pretrained_weights). The recipe follows BEiT / iBOT's run_class_finetuning.py
(AdamW, warmup + cosine per step, layer-wise lr decay, label smoothing, drop path, mixup /
cutmix) with the seed's two learning rates (backbone 1e-4, head 1e-3).

    python finetune.py --pretrained_weights out/checkpoint.pth --dataset digits --epochs 20 --output_dir out/ft
    python finetune.py --arch resnet18 --dataset digits --epochs 20 --output_dir out/ft_scratch   # baseline
    torchrun --nproc_per_node=4 finetune.py --arch vit_small --patch_size 16 \
        --pretrained_weights dino_deitsmall16_pretrain.pth --layer_decay 0.75 --mixup 0.8 --cutmix 1.0 \
        --dataset imagefolder --data_path /imagenet --output_dir out/ft_vits
Partial fine-tuning: --unfreeze_last_blocks 2 (the last 2 ViT blocks / ResNet stages + head),
--unfreeze_last_blocks 0 (head only), or --unfreeze_layers layer4 bn1 (named parameters).

The best-on-validation model (--val_split held out of train) is saved as checkpoint_best.pth and
tested once at the end: accuracy, per-class precision / recall / F1 and the confusion matrix
(scikit-learn), in report.txt / report.json, and --save_predictions N test images with predicted
class, confidence and true class in predictions.png.
"""
import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from core import dist as distu
from core.checkpoint import load_backbone, load_file, save_atomic
from core.curves import save_curves
from core.logger import MetricLogger, bool_flag
from core.optim import cosine_scheduler
from data import DATASETS, SingleViewTransform, build_dataset, dataset_info, eval_transform
from eval_knn import extract_features
from models import ARCHS, extract_features as backbone_features, feature_dim, is_vit


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("Fine-tuning", add_help=add_help)
    # Model parameters
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="Weights to fine-tune; empty: train from scratch with the same recipe "
                             "(the baseline a pretraining must beat).")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='Key to use in the checkpoint (example: "teacher"); a checkpoint '
                             "without it (SimCLR, rotation) falls back to its one network.")
    parser.add_argument("--arch", default=None, type=str, choices=ARCHS,
                        help="Architecture (default: from the checkpoint, else vit_small).")
    parser.add_argument("--patch_size", default=None, type=int,
                        help="ViT patch size (default: from the checkpoint, else 16).")
    parser.add_argument("--image_size", default=None, type=int,
                        help="Input resolution (default: the checkpoint's training crop, else "
                             "the dataset's native size).")
    parser.add_argument("--cifar_stem", default=None, type=bool_flag,
                        help="ResNet CIFAR stem (default: from the checkpoint / image size).")
    parser.add_argument("--drop_path", default=0.1, type=float,
                        help="ViT stochastic depth rate (iBOT ViT-S: 0.1); ResNets have none.")
    parser.add_argument("--n_last_blocks", default=1, type=int,
                        help="ViT: the head sees the CLS tokens of the last n blocks.")
    parser.add_argument("--avgpool_patchtokens", default=0, type=int, choices=[0, 1, 2],
                        help="ViT: 0 = CLS token (iBOT --use_cls), 1 = patch-token mean, 2 = both.")

    # What trains
    parser.add_argument("--unfreeze_last_blocks", default=-1, type=int,
                        help="-1: full fine-tuning; K >= 0: only the last K ViT blocks (+ final "
                             "norm) or ResNet stages (layer1..4) and the head train; 0 = head only.")
    parser.add_argument("--unfreeze_layers", default=None, type=str, nargs="+",
                        help="Instead of --unfreeze_last_blocks: the backbone parameters to train "
                             "by name prefix, e.g. layer4 layer3 (ResNet) or blocks.11 norm (ViT).")

    # Optimization
    parser.add_argument("--epochs", default=100, type=int, help="Number of epochs of training.")
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Per-GPU batch-size.")
    parser.add_argument("--lr", default=1e-3, type=float,
                        help="Head learning rate after warmup (absolute, not scaled by the batch, "
                             "as iBOT's fine-tuning; the seed used 1e-3).")
    parser.add_argument("--backbone_lr", default=1e-4, type=float,
                        help="Backbone learning rate after warmup (the seed: 1e-4), multiplied by "
                             "the layer decay.")
    parser.add_argument("--layer_decay", default=1.0, type=float,
                        help="Layer-wise lr decay (MAE/iBOT/BEiT): layer i of L gets "
                             "backbone_lr * decay^(L + 1 - i); 1.0 is off. iBOT ViT-S 0.75, ViT-B 0.65.")
    parser.add_argument("--weight_decay", default=0.05, type=float,
                        help="AdamW weight decay (not on biases, norms, pos_embed, cls_token).")
    parser.add_argument("--warmup_epochs", default=5, type=int, help="Linear warmup epochs.")
    parser.add_argument("--min_lr", default=1e-6, type=float,
                        help="Final head lr of the cosine; the backbone ends at the same ratio.")
    parser.add_argument("--optimizer", default="adamw", type=str, choices=["adamw", "sgd"],
                        help="adamw (BEiT/iBOT) or sgd with momentum 0.9 (ResNet habit).")
    parser.add_argument("--clip_grad", default=0.0, type=float,
                        help="Global gradient-norm clipping; 0 disables (iBOT: none).")
    parser.add_argument("--smoothing", default=0.1, type=float, help="Label smoothing (0.1).")
    parser.add_argument("--mixup", default=0.0, type=float,
                        help="Mixup alpha; > 0 enables (iBOT ImageNet: 0.8).")
    parser.add_argument("--cutmix", default=0.0, type=float,
                        help="CutMix alpha; > 0 enables (iBOT ImageNet: 1.0).")
    parser.add_argument("--mixup_prob", default=1.0, type=float,
                        help="Probability of mixing a batch when mixup or cutmix is on.")
    parser.add_argument("--mixup_switch_prob", default=0.5, type=float,
                        help="With both on: probability of cutmix instead of mixup.")
    parser.add_argument("--use_fp16", default=False, type=bool_flag,
                        help="On CUDA, float16 autocast with a GradScaler; else bfloat16.")

    # Data
    parser.add_argument("--dataset", default="digits", type=str, choices=sorted(DATASETS),
                        help="Dataset name; imagefolder expects train/ and val/ (or test/).")
    parser.add_argument("--data_path", default="", type=str, help="Dataset root.")
    parser.add_argument("--val_split", default=0.1, type=float,
                        help="Train images held out for model selection (count or fraction; "
                             "CIFAR: 5000). 0 selects on the test split itself (not advised).")
    parser.add_argument("--num_labels", default=None, type=int,
                        help="Number of classes (default: the dataset's).")

    # Report and misc
    parser.add_argument("--save_predictions", default=32, type=int,
                        help="Save a grid of this many random test images with predicted class, "
                             "confidence and true class to predictions.png (0: none).")
    parser.add_argument("--evaluate", action="store_true",
                        help="Only test --finetuned_weights (default <output_dir>/checkpoint_best.pth).")
    parser.add_argument("--finetuned_weights", default="", type=str,
                        help="A checkpoint of this script to test with --evaluate.")
    parser.add_argument("--output_dir", default=".", help="Path to save logs and checkpoints.")
    parser.add_argument("--seed", default=0, type=int, help="Random seed (also picks --save_predictions).")
    parser.add_argument("--num_workers", default=10, type=int, help="Data loading workers.")
    parser.add_argument("--print_freq", default=20, type=int, help="Progress line frequency.")
    parser.add_argument("--tensorboard", default=True, type=bool_flag,
                        help="Write TensorBoard scalars to <output_dir>/tb (rank 0).")
    parser.add_argument("--dist_url", default="env://", type=str,
                        help="url used to set up distributed training")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int, help="Ignored.")
    parser.add_argument("--cpu", action="store_true", help="Run on CPU even if CUDA is there.")
    return parser


class Classifier(nn.Module):
    """backbone -> evaluation features (models.extract_features) -> Linear head.
    State keys backbone.* / head.*, so eval_knn.py and eval_linear.py read a fine-tuned
    checkpoint (--checkpoint_key model) like a pretrained one."""

    def __init__(self, backbone, num_labels, n_last_blocks=1, avgpool_patchtokens=0):
        super().__init__()
        self.backbone = backbone
        self.n_last_blocks, self.avgpool = n_last_blocks, avgpool_patchtokens
        self.head = nn.Linear(feature_dim(backbone, n_last_blocks, avgpool_patchtokens), num_labels)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(backbone_features(self.backbone, x, self.n_last_blocks, self.avgpool))


# ============ what trains: freezing and layer-wise lr decay ... ============

def layer_id(name, backbone):
    """Depth of a backbone parameter: 0 for the input embedding (ViT patch_embed, cls_token,
    pos_embed; ResNet conv1/bn1), i + 1 for ViT block i / ResNet layer{i+1}, num_layers(backbone)
    for everything after (final norm), as BEiT's get_layer_id_for_vit."""
    if is_vit(backbone):
        if name.startswith(("cls_token", "pos_embed", "masked_embed", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(backbone.blocks) + 1
    if name.startswith(("conv1", "bn1")):
        return 0
    if name.startswith("layer"):
        return int(name[5])
    return 5


def num_layers(backbone):
    """Layer ids run 0..num_layers(backbone): ViT depth + 1, ResNet 5."""
    return len(backbone.blocks) + 1 if is_vit(backbone) else 5


def set_trainable(backbone, unfreeze_last_blocks=-1, unfreeze_layers=None):
    """Sets requires_grad on the backbone's parameters; returns the names that train.
    unfreeze_layers: name prefixes (a name matches 'layer4' if it is layer4 or starts with
    'layer4.'). Else unfreeze_last_blocks: -1 all, K >= 0 the last K blocks / stages (ViT: plus
    its final norm, which reads the last block)."""
    names = [n for n, _ in backbone.named_parameters()]
    if unfreeze_layers:
        unknown = [u for u in unfreeze_layers if not any(n == u or n.startswith(u + ".") for n in names)]
        if unknown:
            tops = sorted({n.split(".")[0] for n in names})
            raise SystemExit(f"error: --unfreeze_layers {' '.join(unknown)} names no parameter of the "
                             f"backbone; use prefixes such as {', '.join(tops)} (or blocks.11, layer4.1)")
        train = lambda n: any(n == u or n.startswith(u + ".") for u in unfreeze_layers)  # noqa: E731
    elif unfreeze_last_blocks < 0:
        train = lambda n: True  # noqa: E731
    else:
        depth = num_layers(backbone) - 1  # blocks / stages
        if unfreeze_last_blocks > depth:
            raise SystemExit(f"error: --unfreeze_last_blocks {unfreeze_last_blocks} exceeds the "
                             f"{depth} blocks of the backbone; use 0..{depth}, or -1 for all")
        first = depth - unfreeze_last_blocks + 1  # lowest layer id that trains
        train = lambda n: unfreeze_last_blocks > 0 and layer_id(n, backbone) >= first  # noqa: E731
    for n, p in backbone.named_parameters():
        p.requires_grad = train(n)
    return [n for n, p in backbone.named_parameters() if p.requires_grad]


def train_mode(model):
    """model.train(), then eval() on every sub-module whose parameters are all frozen, so a
    frozen BatchNorm keeps its running statistics and a frozen block drops no path."""
    model.train()

    def visit(m):
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()
        else:
            for child in m.children():
                visit(child)
    visit(model)


def param_groups(model, backbone_lr, head_lr, weight_decay, layer_decay):
    """AdamW groups, one per (depth, decayed or not). Each group's "base_lr" is multiplied by the
    schedule every step: head_lr for the head, backbone_lr * layer_decay^(L - depth) for the
    backbone (L = num_layers). No weight decay on biases, 1-D parameters, pos_embed and
    cls_token (BEiT/iBOT fine-tuning)."""
    L = num_layers(model.backbone)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim == 1 or name.endswith(".bias") or name in ("backbone.pos_embed", "backbone.cls_token")
        if name.startswith("head."):
            key, lr = ("head", no_wd), head_lr
        else:
            depth = layer_id(name[len("backbone."):], model.backbone)
            key, lr = (depth, no_wd), backbone_lr * layer_decay ** (L - depth)
        if key not in groups:
            groups[key] = {"params": [], "base_lr": lr, "weight_decay": 0.0 if no_wd else weight_decay}
        groups[key]["params"].append(p)
    return list(groups.values())


# ============ mixup / cutmix ... ============

def smooth_one_hot(targets, num_classes, smoothing):
    off = smoothing / num_classes
    return torch.full((len(targets), num_classes), off, device=targets.device).scatter_(
        1, targets.view(-1, 1), 1.0 - smoothing + off)


def mix_batch(images, targets, num_classes, args):
    """timm-style batch mixing with the batch's reverse: with probability mixup_prob, mixup
    (lam ~ Beta(a, a), images blended) or cutmix (a box of area ~ 1 - lam pasted, lam corrected
    to the box's true area); with both on, cutmix with probability mixup_switch_prob.
    Returns images (B, 3, H, W) and soft targets (B, C), label-smoothed before mixing."""
    y = smooth_one_hot(targets, num_classes, args.smoothing)
    if (args.mixup <= 0 and args.cutmix <= 0) or np.random.rand() > args.mixup_prob:
        return images, y
    use_cutmix = args.cutmix > 0 and (args.mixup <= 0 or np.random.rand() < args.mixup_switch_prob)
    lam = float(np.random.beta(*(2 * [args.cutmix if use_cutmix else args.mixup])))
    if use_cutmix:
        H, W = images.shape[-2:]
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = np.random.randint(H), np.random.randint(W)
        y0, y1 = np.clip(cy - cut_h // 2, 0, H), np.clip(cy + cut_h // 2, 0, H)
        x0, x1 = np.clip(cx - cut_w // 2, 0, W), np.clip(cx + cut_w // 2, 0, W)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        images = images * lam + images.flip(0) * (1.0 - lam)
    return images, lam * y + (1.0 - lam) * y.flip(0)


def autocast_context(args):
    if args.device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=torch.float16 if args.use_fp16 else torch.bfloat16)


# ============ training, validation, test report ... ============

def train_one_epoch(ddp_model, model, loader, optimizer, lr_schedule, epoch, fp16_scaler, args):
    train_mode(ddp_model)
    logger = MetricLogger(header=f"Epoch: [{epoch}/{args.epochs}]", print_freq=args.print_freq,
                          batch_size=args.batch_size_per_gpu)
    for i, (images, targets) in enumerate(logger.log_every(loader)):
        it = len(loader) * epoch + i
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * float(lr_schedule[it])  # a numpy float would not pass weights_only
        images = images.to(args.device, non_blocking=True)
        targets = targets.to(args.device, non_blocking=True)
        images, soft = mix_batch(images, targets, args.num_labels, args)
        with autocast_context(args):
            logits = ddp_model(images)
        loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        optimizer.zero_grad(set_to_none=True)
        if fp16_scaler is None:
            loss.backward()
            if args.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
        else:
            fp16_scaler.scale(loss).backward()
            if args.clip_grad:
                fp16_scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            fp16_scaler.step(optimizer)
            fp16_scaler.update()
        logger.update(loss=loss.detach(), lr=optimizer.param_groups[-1]["lr"])
    stats = logger.global_averages()
    if not math.isfinite(stats["loss"]):
        raise SystemExit(f"error: loss is not finite at epoch {epoch}; lower --lr / --backbone_lr "
                         "or turn on --clip_grad")
    return stats


@torch.no_grad()
def predict(model, dataset, args):
    """Logits (N, C) of every image of `dataset`, in order, on every rank."""
    return extract_features(model, dataset, args.batch_size_per_gpu, args.num_workers, args.device,
                            normalize=False, feature_fn=lambda m, x: m(x))


def test_report(model, dataset_test, info, args, writer=None):
    """Accuracy, sklearn's per-class report and confusion matrix (also as a heat map), and the
    prediction grid; the two figures also go to TensorBoard when there is a writer."""
    from core.report import (class_names, classification_metrics, figure_to_array,
                             format_report, save_confusion_matrix, save_prediction_grid)
    logits = predict(model, dataset_test, args).cpu()
    probs = logits.softmax(dim=1)
    conf, preds = probs.max(dim=1)
    targets = np.asarray(dataset_test.targets)
    names = class_names(dataset_test, args.num_labels)
    metrics = classification_metrics(targets, preds.numpy(), args.num_labels, names)
    if distu.is_main_process():
        text = format_report(metrics)
        print(text)
        with open(os.path.join(args.output_dir, "report.txt"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.output_dir, "report.json"), "w") as f:
            json.dump({k: v for k, v in metrics.items() if k != "report"}, f, indent=1)
        path = os.path.join(args.output_dir, "confusion_matrix.png")
        figures = {"confusion_matrix": save_confusion_matrix(
            metrics["confusion_matrix"], names, path,
            f"{args.arch} on {args.dataset} test: {metrics['accuracy']:.2f}% top-1")}
        if args.save_predictions > 0:
            n = min(args.save_predictions, len(dataset_test))
            idx = np.random.default_rng(args.seed).choice(len(dataset_test), n, replace=False)
            images = torch.stack([dataset_test[int(i)][0] for i in idx])
            path = os.path.join(args.output_dir, "predictions.png")
            figures["predictions"] = save_prediction_grid(
                images, targets[idx], preds[idx], conf[idx], names, path, info.mean, info.std)
            print(f"Saved {n} test predictions to {path}")
        if writer is not None:
            for tag, fig in figures.items():
                writer.add_image(f"test/{tag}", figure_to_array(fig), args.epochs,
                                 dataformats="HWC")
    return metrics


def check_args(args):
    if args.epochs <= args.warmup_epochs and not args.evaluate:
        raise SystemExit(f"error: --warmup_epochs ({args.warmup_epochs}) must be below --epochs "
                         f"({args.epochs}); lower --warmup_epochs")
    if not 0 < args.layer_decay <= 1:
        raise SystemExit(f"error: --layer_decay {args.layer_decay} is out of range; use a value in "
                         "(0, 1] (1: off, 0.65-0.75 as iBOT)")
    if not 0 <= args.smoothing < 1 or args.mixup < 0 or args.cutmix < 0:
        raise SystemExit("error: --smoothing must be in [0, 1) and --mixup/--cutmix >= 0")
    if args.unfreeze_layers and args.unfreeze_last_blocks != -1:
        raise SystemExit("error: --unfreeze_layers and --unfreeze_last_blocks both given; pick one")


def run_finetune(args):
    """Fine-tune (or test with --evaluate); the process group must exist. Returns
    {"best_val_acc", "test_acc", "metrics"} (metrics: classification_metrics of the test set)."""
    check_args(args)
    distu.fix_random_seeds(args.seed)
    info = dataset_info(args.dataset, args.data_path)

    # ============ preparing data ... ============
    if not args.pretrained_weights and args.image_size is None:
        args.image_size = info.image_size
    backbone, _ = load_backbone(args, drop_path_rate=args.drop_path)
    args.image_size = args.image_size or info.image_size
    val_tf = eval_transform(args.image_size, info.mean, info.std)
    split = dict(val_split=args.val_split, seed=args.seed)
    dataset_train = build_dataset(args.dataset, args.data_path, "train",
                                  SingleViewTransform(args.image_size, info.mean, info.std), **split)
    dataset_val = build_dataset(args.dataset, args.data_path, "val", val_tf, **split)
    dataset_test = build_dataset(args.dataset, args.data_path, "test", val_tf)
    args.num_labels = args.num_labels or dataset_train.num_classes
    if args.num_labels < dataset_train.num_classes:
        raise SystemExit(f"error: --num_labels {args.num_labels} is below the {dataset_train.num_classes} "
                         "classes of the dataset; drop --num_labels to use the dataset's")
    print(f"Data loaded: {len(dataset_train)} train, {len(dataset_val)} val, {len(dataset_test)} test imgs.")
    if not args.val_split:
        print("Warning: --val_split 0 selects the best epoch on the test split itself.")

    # ============ building the network ... ============
    if not args.pretrained_weights:
        print("=> from-scratch baseline: the same recipe on a randomly initialised backbone.")
    model = Classifier(backbone, args.num_labels, args.n_last_blocks, args.avgpool_patchtokens)
    trainable = set_trainable(backbone, args.unfreeze_last_blocks, args.unfreeze_layers)
    n_all = sum(p.numel() for p in backbone.parameters())
    n_train = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    print(f"Training {n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M backbone parameters "
          f"({len(trainable)} tensors) and the head.")
    model.to(args.device)
    if args.distributed and not is_vit(backbone) and args.device.type == "cuda":  # SyncBN is GPU-only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    if args.evaluate:
        path = args.finetuned_weights or os.path.join(args.output_dir, "checkpoint_best.pth")
        model.load_state_dict(load_file(path)["model"])
        metrics = test_report(model, dataset_test, info, args)
        return {"best_val_acc": None, "test_acc": metrics["accuracy"], "metrics": metrics}

    global_batch = args.batch_size_per_gpu * args.world_size
    if len(dataset_train) < global_batch:
        raise SystemExit(f"error: the train split has {len(dataset_train)} images, fewer than one "
                         f"global batch ({global_batch}); lower --batch_size_per_gpu")
    sampler = torch.utils.data.DistributedSampler(dataset_train, num_replicas=args.world_size,
                                                 rank=args.rank, shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(dataset_train, sampler=sampler, batch_size=args.batch_size_per_gpu,
                                         num_workers=args.num_workers, drop_last=True,
                                         pin_memory=args.device.type == "cuda")
    ddp_model = DistributedDataParallel(model, device_ids=[args.gpu] if args.device.type == "cuda"
                                        else None) if args.distributed else model

    # ============ preparing optimizer and schedule ... ============
    groups = param_groups(model, args.backbone_lr, args.lr, args.weight_decay, args.layer_decay)
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=args.lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    fp16_scaler = torch.amp.GradScaler("cuda") if args.use_fp16 and args.device.type == "cuda" else None
    # one multiplier for every group: linear warmup to 1, cosine to min_lr / lr
    lr_schedule = cosine_scheduler(1.0, args.min_lr / args.lr, args.epochs, len(loader),
                                   warmup_epochs=args.warmup_epochs)
    print(f"head lr {args.lr:.2e}, backbone lr {args.backbone_lr:.2e} (layer decay "
          f"{args.layer_decay}), global batch {global_batch}, {len(groups)} parameter groups")

    # ============ optionally resume training ... ============
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    best_path = os.path.join(args.output_dir, "checkpoint_best.pth")
    start_epoch, best_acc = 0, -1.0
    if os.path.isfile(ckpt_path):
        ckpt = load_file(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if fp16_scaler is not None and "fp16_scaler" in ckpt:
            fp16_scaler.load_state_dict(ckpt["fp16_scaler"])
        start_epoch, best_acc = ckpt["epoch"], ckpt["best_acc"]
        print(f"Found checkpoint at {ckpt_path}: resuming from epoch {start_epoch}.")

    writer = None
    if args.tensorboard and distu.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.output_dir, "tb"))

    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        train_stats = train_one_epoch(ddp_model, model, loader, optimizer, lr_schedule, epoch,
                                      fp16_scaler, args)
        logits = predict(model, dataset_val, args)
        val_acc = (logits.argmax(1).cpu() == torch.as_tensor(dataset_val.targets)).float().mean().item() * 100
        is_best = val_acc > best_acc
        best_acc = max(best_acc, val_acc)
        print(f"Validation accuracy at epoch {epoch}: {val_acc:.2f}%  best: {best_acc:.2f}%")
        if distu.is_main_process():
            save_dict = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "epoch": epoch + 1, "best_acc": best_acc, "val_acc": val_acc,
                         "args": {k: (str(v) if isinstance(v, torch.device) else v)
                                  for k, v in vars(args).items()}}
            if fp16_scaler is not None:
                save_dict["fp16_scaler"] = fp16_scaler.state_dict()
            save_atomic(save_dict, ckpt_path)
            if is_best:
                save_atomic({"model": save_dict["model"], "epoch": epoch + 1, "val_acc": val_acc,
                             "args": save_dict["args"]}, best_path)
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps({**{f"train_{k}": v for k, v in train_stats.items()},
                                    "val_acc1": val_acc, "epoch": epoch}) + "\n")
            save_curves(args.output_dir)
            if writer is not None:
                writer.add_scalar("train/loss", train_stats["loss"], epoch)
                writer.add_scalar("train/lr_head", train_stats["lr"], epoch)
                writer.add_scalar("val/top1", val_acc, epoch)

    # ============ the best-on-validation model on the test set ... ============
    if distu.get_world_size() > 1:
        torch.distributed.barrier()  # rank 0 has written checkpoint_best.pth
    best = load_file(best_path)
    model.load_state_dict(best["model"])
    print(f"Testing the best-on-validation model (epoch {best['epoch']}, val {best['val_acc']:.2f}%):")
    metrics = test_report(model, dataset_test, info, args, writer)
    if writer is not None:
        writer.add_scalar("test/top1", metrics["accuracy"], args.epochs)
        writer.close()
    return {"best_val_acc": best_acc, "test_acc": metrics["accuracy"], "metrics": metrics}


def finetune(args):
    check_args(args)  # bad flags fail before any process group exists
    distu.init_distributed_mode(args)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    results = run_finetune(args)
    distu.cleanup()
    return results


if __name__ == "__main__":
    finetune(get_args_parser().parse_args())
