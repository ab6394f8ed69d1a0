"""Fine-tuning a pretrained backbone with a linear head, and the from-scratch baseline with the
same recipe (no --pretrained_weights). The recipe follows BEiT / iBOT's run_class_finetuning.py
(AdamW, warmup + cosine per step, layer-wise lr decay, label smoothing, drop path, mixup /
cutmix) with two absolute learning rates (backbone 1e-4, head 1e-3).

    python finetune.py --pretrained_weights out/checkpoint.pth --dataset digits --epochs 20 --output_dir out/ft
    python finetune.py --arch resnet18 --dataset digits --epochs 20 --output_dir out/ft_scratch   # baseline
    torchrun --nproc_per_node=4 finetune.py --arch vit_small --patch_size 16 \
        --pretrained_weights dino_deitsmall16_pretrain.pth --layer_decay 0.75 --mixup 0.8 --cutmix 1.0 \
        --dataset imagefolder --data_path /imagenet --output_dir out/ft_vits
Partial fine-tuning: --unfreeze_last_blocks 2 (the last 2 ViT blocks / ResNet stages + head),
--unfreeze_last_blocks 0 (head only), or --unfreeze_layers layer4 bn1 (named parameters).

The best-on-validation model (--val_split held out of train, or the dataset's val/ when it also
has test/) is saved as checkpoint_best.pth and tested once at the end, on the --eval_split split:
accuracy, per-class precision / recall / F1 and the confusion matrix (scikit-learn), in
report.txt / report.json, and --save_predictions N test images with predicted class,
confidence and true class in predictions.png. Without --output_dir the run goes to
out/finetune/<weights>_<dataset>; it resumes from <output_dir>/checkpoint.pth only if that file
was written with the same flags. The shared flags (model, features, data, run, --precision) are
in core/eval_args.py.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from core import amp, cli, eval_args, eval_data, eval_runs, model_flags, preempt
from core import dist as distu
from core.checkpoint import (load_file, lock_output_dir, make_output_dir, remove_stale_tmp,
                             save_atomic, unlock_output_dir)
from core.features import extract_dataset_features
from core.curves import save_curves
from core.logger import StepLog, bool_flag
from core.syncbn import sync_batchnorm
from core.optim import cosine_scheduler
from data import SingleViewTransform, build_dataset, dataset_info, eval_transform
from data.datasets import resolve_split
from data.normalization import with_norm
from models import MLPClassifier, extract_features, feature_dim, is_vit


def get_args_parser():
    parser = cli.ArgumentParser("Fine-tuning", parents=[eval_args.get_args_parser()],
                                formatter_class=cli.HelpFormatter)  # every flag with its default
    group = parser.add_argument_group("What trains")
    group.add_argument("--drop_path", default=0.1, type=float,
                       help="ViT stochastic depth rate (iBOT ViT-S: 0.1); ResNets have none.")
    group.add_argument("--unfreeze_last_blocks", default=-1, type=int,
                       help="-1: full fine-tuning; K >= 0: only the last K ViT blocks (+ final "
                            "norm) or ResNet stages (layer1..4) and the head train; 0 = head only.")
    group.add_argument("--unfreeze_layers", default=None, type=str, nargs="+",
                       help="Instead of --unfreeze_last_blocks: the backbone parameters to train "
                            "by name prefix, e.g. layer4 layer3 (ResNet) or blocks.11 norm (ViT) "
                            "(default: none, --unfreeze_last_blocks decides).")

    group.add_argument("--head", default="linear", type=str, choices=["linear", "mlp"],
                       help="linear, or mlp: --mlp_dims hidden layers (Linear-BN-ReLU each) "
                            "before the last Linear, as eval_linear.py's MLP probe.")
    group.add_argument("--mlp_dims", default=[512, 256], type=int, nargs="+",
                       help="Hidden widths of the MLP head (a 512-512-10 head on a ResNet-18: "
                            "--mlp_dims 512).")

    group = parser.add_argument_group("Optimization")
    group.add_argument("--epochs", default=100, type=int, help="Number of epochs of training.")
    group.add_argument("--lr", default=1e-3, type=float,
                       help="Head learning rate after warmup, 1e-3 by default (absolute, not scaled "
                            "by the batch, as iBOT's fine-tuning).")
    group.add_argument("--backbone_lr", default=1e-4, type=float,
                       help="Backbone learning rate after warmup, 1e-4 by default (absolute), "
                            "multiplied by the layer decay.")
    group.add_argument("--layer_decay", default=1.0, type=float,
                       help="Layer-wise lr decay (MAE/iBOT/BEiT): layer i of L gets "
                            "backbone_lr * decay^(L + 1 - i); 1.0 is off. iBOT ViT-S 0.75, ViT-B 0.65.")
    group.add_argument("--weight_decay", default=0.05, type=float,
                       help="AdamW weight decay (not on biases, norms, pos_embed, cls_token).")
    group.add_argument("--warmup_epochs", default=5, type=int, help="Linear warmup epochs.")
    group.add_argument("--min_lr", default=1e-6, type=float,
                       help="Final head lr of the cosine; the backbone ends at the same ratio.")
    group.add_argument("--optimizer", default="adamw", type=str, choices=["adamw", "adam", "sgd"],
                       help="adamw (BEiT/iBOT), adam (weight decay as an L2 term of the "
                            "gradient, as torch.optim.Adam) or sgd with momentum 0.9 (ResNet habit).")
    group.add_argument("--clip_grad", default=0.0, type=float,
                       help="Global gradient-norm clipping; 0 disables (iBOT: none).")
    group.add_argument("--smoothing", default=0.1, type=float, help="Label smoothing (0.1).")
    group.add_argument("--mixup", default=0.0, type=float,
                       help="Mixup alpha; > 0 enables (iBOT ImageNet: 0.8).")
    group.add_argument("--cutmix", default=0.0, type=float,
                       help="CutMix alpha; > 0 enables (iBOT ImageNet: 1.0).")
    group.add_argument("--mixup_prob", default=1.0, type=float,
                       help="Probability of mixing a batch when mixup or cutmix is on.")
    group.add_argument("--mixup_switch_prob", default=0.5, type=float,
                       help="With both on: probability of cutmix instead of mixup.")

    group = parser.add_argument_group("Validation, report and misc")
    group.add_argument("--val_split", default=None, type=float,
                       help="Train images held out for model selection (count or fraction; "
                            "CIFAR: 5000). 0 selects on the dataset's val/, which is the "
                            "scored split itself unless the dataset also has test/ (then not "
                            "advised). Default: 0 when the dataset has val/ beside the scored "
                            "test/, else 0.1.")
    group.add_argument("--num_labels", default=None, type=int,
                       help="Number of classes (default: the dataset's).")
    group.add_argument("--save_predictions", default=32, type=int,
                       help="Save a grid of this many random test images with predicted class, "
                            "confidence and true class to predictions.png (0: none).")
    group.add_argument("--evaluate", default=False, type=bool_flag, nargs="?", const=True,
                       help="Only test --finetuned_weights (default <output_dir>/"
                            "checkpoint_best.pth; `--evaluate` alone: true).")
    group.add_argument("--finetuned_weights", default="", type=str,
                       help="A checkpoint of this script to test with --evaluate.")
    group.add_argument("--print_freq", default=20, type=int, help="Progress line frequency.")
    group.add_argument("--tensorboard", default=True, type=bool_flag,
                       help="Write TensorBoard scalars to <output_dir>/tb (rank 0).")
    preempt.add_args(group)
    return parser


class Classifier(nn.Module):
    """backbone -> evaluation features (models.extract_features) -> head: a Linear layer, or
    with head="mlp" models.MLPClassifier ([Linear-BN-ReLU] per width of mlp_dims, then Linear).
    State keys backbone.* / head.*, so eval_knn.py and eval_linear.py read a fine-tuned
    checkpoint (--checkpoint_key model) like a pretrained one."""

    def __init__(self, backbone, num_labels, n_last_blocks=1, avgpool_patchtokens=0,
                 head="linear", mlp_dims=(512, 256)):
        super().__init__()
        self.backbone = backbone
        self.n_last_blocks, self.avgpool = n_last_blocks, avgpool_patchtokens
        dim = feature_dim(backbone, n_last_blocks, avgpool_patchtokens)
        if head == "mlp":
            self.head = MLPClassifier(dim, num_labels, mlp_dims)
        else:
            self.head = nn.Linear(dim, num_labels)
            nn.init.normal_(self.head.weight, std=0.01)
            nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(extract_features(self.backbone, x, self.n_last_blocks, self.avgpool))


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
            raise ValueError(f"--unfreeze_layers {' '.join(unknown)} names no parameter of the "
                             f"backbone; use prefixes such as {', '.join(tops)} (or blocks.11, layer4.1)")
        train = lambda n: any(n == u or n.startswith(u + ".") for u in unfreeze_layers)  # noqa: E731
    elif unfreeze_last_blocks < 0:
        train = lambda n: True  # noqa: E731
    else:
        depth = num_layers(backbone) - 1  # blocks / stages
        if unfreeze_last_blocks > depth:
            raise ValueError(f"--unfreeze_last_blocks {unfreeze_last_blocks} exceeds the {depth} "
                             f"blocks of the backbone; use 0..{depth}, or -1 for all")
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

def build_mixing(args, num_classes):
    """timm / DeiT's batch mixing, from torchvision.transforms.v2: with probability --mixup_prob,
    MixUp (lam ~ Beta(a, a), two images blended) or CutMix (lam ~ Beta(a, a), a box of about
    1 - lam of the image pasted from the partner, lam corrected to the box's true area, the box
    and its clipping exactly timm's); with both on, CutMix with probability --mixup_switch_prob.
    The partner of image i is image i - 1 (timm: B - 1 - i; either is a random image of a
    shuffled batch). Returns mix(images, targets) -> (images, targets): targets stay class
    indices when the batch is not mixed, else become (B, C) mixed one-hot probabilities. The
    label smoothing is the loss's (nn.CrossEntropyLoss(label_smoothing=)): smoothing is linear,
    so smoothing the mixed targets equals timm's mixing of smoothed ones."""
    from torchvision.transforms import v2
    ops = ([v2.MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup > 0 else []) + \
        ([v2.CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix > 0 else [])
    if not ops:
        return lambda images, targets: (images, targets)
    mix = ops[0] if len(ops) == 1 else \
        v2.RandomChoice(ops, p=[1 - args.mixup_switch_prob, args.mixup_switch_prob])
    return mix if args.mixup_prob >= 1 else v2.RandomApply([mix], p=args.mixup_prob)


# ============ training, validation, test report ... ============

# the end of the one line a loss gone nan/inf stops the run with (core/preempt.py)
NONFINITE_FIX = ("Lower --lr / --backbone_lr, raise --warmup_epochs, turn on --clip_grad, or train "
                 "in --precision bf16 or fp32 if this was fp16.")


def train_one_epoch(ddp_model, model, optimizer, scaler, lr_schedule, epoch, run, args):
    """One epoch, from where `run` (core.preempt.ResumableRun) stands in it. Returns the epoch's
    averages, or None when a signal stopped the ranks mid-epoch (checkpoint written)."""
    train_mode(ddp_model)
    clip = (lambda: nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)) if args.clip_grad else None
    # the learning rates logged: the head's and, when the backbone trains, the highest of its
    # groups (its top layer's; --layer_decay lowers those below); one schedule scales them all
    head = {id(p) for p in model.head.parameters()}
    backbone = [g["base_lr"] for g in optimizer.param_groups if not head & {id(p) for p in g["params"]}]
    lrs = {"lr_head": args.lr, **({"lr_backbone": max(backbone)} if backbone else {})}
    mix = build_mixing(args, args.num_labels)  # --mixup / --cutmix; the identity when both are 0
    criterion = nn.CrossEntropyLoss(label_smoothing=args.smoothing)  # class indices or mixed
    steps = run.epoch(epoch)
    for it, (images, targets) in steps:  # it: the global training iteration
        scale = float(lr_schedule[it])  # a numpy float would not pass weights_only
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * scale
        images = images.to(args.device, non_blocking=True)
        targets = targets.to(args.device, non_blocking=True)
        images, targets = mix(images, targets)
        with amp.autocast(args.precision, args.device):
            logits = ddp_model(images)
        loss = criterion(logits.float(), targets)
        amp.backward_step(loss, optimizer, scaler, after_unscale=clip)
        steps.update(loss, **{k: lr * scale for k, lr in lrs.items()})
    return steps.averages()


@torch.no_grad()
def predict(model, dataset, args, what="predictions"):
    """Logits (N, C) of every image of `dataset`, in order, on every rank (progress lines named
    `what`)."""
    return extract_dataset_features(model, dataset, args.batch_size_per_gpu, args.num_workers,
                                    args.device, feature_fn=lambda m, x: m(x), normalize=False,
                                    precision=args.precision, what=what)


def test_report(model, dataset_test, info, args, writer=None):
    """Accuracy, sklearn's per-class report and confusion matrix (also as a heat map), and the
    prediction grid; the two figures also go to TensorBoard when there is a writer."""
    from core.report import (class_names, classification_metrics, figure_to_array,
                             format_report, save_confusion_matrix, save_prediction_grid)
    print(f"Scoring {len(dataset_test)} images of {dataset_test.split_name}:")
    logits = predict(model, dataset_test, args, dataset_test.split_name).cpu()
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
            json.dump({**{k: v for k, v in metrics.items() if k != "report"},
                       "split": dataset_test.split_name}, f, indent=1)
        path = os.path.join(args.output_dir, "confusion_matrix.png")
        figures = {"confusion_matrix": save_confusion_matrix(
            metrics["confusion_matrix"], names, path,
            f"{args.arch} on {args.dataset} {dataset_test.split_name}: "
            f"{metrics['accuracy']:.2f}% top-1")}
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
                writer.add_image(f"test/{tag}_{dataset_test.split_key}", figure_to_array(fig),
                                 args.epochs, dataformats="HWC")
    return metrics


def check_args(args):
    eval_args.check_common_args(args)
    if args.epochs < 1 and not args.evaluate:
        raise ValueError(f"--epochs {args.epochs} trains nothing; use --epochs >= 1")
    if args.epochs <= args.warmup_epochs and not args.evaluate:
        raise ValueError(f"--warmup_epochs ({args.warmup_epochs}) must be below --epochs "
                         f"({args.epochs}); lower --warmup_epochs")
    if not 0 < args.layer_decay <= 1:
        raise ValueError(f"--layer_decay {args.layer_decay} is out of range; use a value in "
                         "(0, 1] (1: off, 0.65-0.75 as iBOT)")
    if not 0 <= args.smoothing < 1 or args.mixup < 0 or args.cutmix < 0:
        raise ValueError("--smoothing must be in [0, 1) and --mixup/--cutmix >= 0")
    if args.unfreeze_layers and args.unfreeze_last_blocks != -1:
        raise ValueError("--unfreeze_layers and --unfreeze_last_blocks both given; pick one")
    if args.val_split is None:  # select on val/ when it is not the scored split, else hold out
        args.val_split = 0.0 if selects_apart(args, 0) else 0.1
    eval_data.check_eval_data(args, args.val_split)  # before any image is read


def selects_apart(args, val_split):
    """Whether the split models are selected on is not the one scored (--eval_split)."""
    return resolve_split(args.dataset, args.data_path, "val", args.eval_split, val_split) != \
        resolve_split(args.dataset, args.data_path, "test", args.eval_split)


def build_datasets(args, info):
    """(train augmented, val (held out of train with --val_split, else val/), test (the
    --eval_split split)). Fills --num_labels."""
    val_tf = eval_transform(args.image_size, info.mean, info.std)
    split = dict(val_split=args.val_split, seed=args.seed, train_split=args.train_split)
    dataset_train = build_dataset(args.dataset, args.data_path, "train",
                                  SingleViewTransform(args.image_size, info.mean, info.std), **split)
    dataset_val = eval_data.eval_split(args, "val", val_tf, val_split=args.val_split)  # tensor / pil
    dataset_test = eval_data.eval_split(args, "test", val_tf)
    args.num_labels = args.num_labels or dataset_train.num_classes
    if args.num_labels < dataset_train.num_classes:
        raise ValueError(f"--num_labels {args.num_labels} is below the {dataset_train.num_classes} "
                         "classes of the dataset; drop --num_labels to use the dataset's")
    print(f"Data loaded: {len(dataset_train)} train ({dataset_train.split_name}), "
          f"{len(dataset_val)} val ({dataset_val.split_name}), {len(dataset_test)} test "
          f"({dataset_test.split_name}) imgs.")
    if not selects_apart(args, args.val_split):
        print(f"Warning: --val_split 0 selects the best epoch on {dataset_test.split_name}, the "
              "scored split itself; hold images out with --val_split N.")
    eval_data.check_scored_split(dataset_test)
    return dataset_train, dataset_val, dataset_test


def run_finetune(args):
    """Fine-tune (or test with --evaluate); the process group must exist. Returns
    {"best_val_acc", "test_acc", "metrics"} (metrics: classification_metrics of the test set)."""
    try:
        return _run_finetune(args)
    finally:  # the lock of --output_dir (rank 0, taken before training) ends with the run
        unlock_output_dir(args.output_dir)


def _run_finetune(args):
    """run_finetune's body; run_finetune releases the lock of --output_dir when it ends."""
    check_args(args)
    distu.fix_random_seeds(args.seed)
    amp.resolve_precision(args, args.device)
    info = dataset_info(args.dataset, args.data_path)

    # ============ building the network and the data ... ============
    backbone, _ = model_flags.load_backbone(args, default_image_size=info.image_size,
                                           drop_path_rate=args.drop_path)
    info = with_norm(info, args)  # the statistics the weights were trained with (printed)
    if not args.pretrained_weights:
        print("=> from-scratch baseline: the same recipe on a randomly initialised backbone.")
    dataset_train, dataset_val, dataset_test = build_datasets(args, info)
    model = Classifier(backbone, args.num_labels, args.n_last_blocks, args.avgpool_patchtokens,
                       args.head, args.mlp_dims)
    trainable = set_trainable(backbone, args.unfreeze_last_blocks, args.unfreeze_layers)
    n_all = sum(p.numel() for p in backbone.parameters())
    n_train = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    print(f"Training {n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M backbone parameters "
          f"({len(trainable)} tensors) and the head.")
    model.to(args.device)
    model = sync_batchnorm(model, args.device)  # BatchNorm statistics over all ranks, CPU too
    args.output_dir = args.output_dir or eval_runs.default_output_dir("finetune", args)
    cli.print_args(args)  # every flag final from here on: the listing is what checkpoints store
    print(f"Output folder: {args.output_dir}")
    make_output_dir(args.output_dir)  # writable, before any training
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    best_path = os.path.join(args.output_dir, "checkpoint_best.pth")

    if args.evaluate:
        path = args.finetuned_weights or best_path
        ckpt = load_file(path)
        if not args.finetuned_weights:
            eval_runs.check_resume(path, ckpt, args)
        model.load_state_dict(ckpt["model"])
        metrics = test_report(model, dataset_test, info, args)
        return {"best_val_acc": None, "test_acc": metrics["accuracy"], "metrics": metrics,
                "splits": {"best_val_acc": None, "test_acc": dataset_test.split_name}}

    if distu.is_main_process():
        lock_output_dir(args.output_dir)  # one training run per folder, held until this one ends
    global_batch = args.batch_size_per_gpu * args.world_size
    if len(dataset_train) < global_batch:
        raise ValueError(f"the train split has {len(dataset_train)} images, fewer than one global "
                         f"batch ({global_batch}); lower --batch_size_per_gpu")
    # each rank's DistributedSampler(shuffle=True) order with drop_last, as train_ssl.py
    loader = eval_data.train_loader(args, "train", SingleViewTransform(args.image_size, info.mean, info.std),
                                     val_split=args.val_split)
    print(f"Training images: {loader.describe}.")
    ddp_model = DistributedDataParallel(model, device_ids=[args.gpu] if args.device.type == "cuda"
                                        else None) if args.distributed else model

    # ============ preparing optimizer and schedule ... ============
    groups = param_groups(model, args.backbone_lr, args.lr, args.weight_decay, args.layer_decay)
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=args.lr)
    elif args.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=args.lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    scaler = amp.grad_scaler(args.precision, args.device)
    # one multiplier for every group: linear warmup to 1, cosine to min_lr / lr
    lr_schedule = cosine_scheduler(1.0, args.min_lr / args.lr, args.epochs, len(loader),
                                   warmup_epochs=args.warmup_epochs)
    print(f"{args.head} head lr {args.lr:.2e}, backbone lr {args.backbone_lr:.2e} (layer decay "
          f"{args.layer_decay}), global batch {global_batch}, {len(groups)} parameter groups, "
          f"precision {args.precision}")

    # ============ optionally resume training ... ============
    if distu.is_main_process():
        remove_stale_tmp(args.output_dir)  # the unfinished writes of a killed run
    ckpt, best_acc = None, -1.0
    if os.path.isfile(ckpt_path):
        ckpt = load_file(ckpt_path)
        eval_runs.check_resume(ckpt_path, ckpt, args)  # never another run's checkpoint
        # another number of processes: refused, or said (the lrs do not scale with the batch)
        preempt.check_resumable(ckpt_path, ckpt, args)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and "fp16_scaler" in ckpt:
            scaler.load_state_dict(ckpt["fp16_scaler"])
        best_acc = ckpt["best_acc"]
        print(f"Found checkpoint at {ckpt_path}: resuming from epoch {ckpt['epoch']}"
              + (f", iteration {ckpt['iteration']}." if ckpt.get("iteration") else "."))

    def save_checkpoint(position, val_acc=None):
        """checkpoint.pth (rank 0) at `position` (core/preempt.py: the epoch, the iteration in
        it, the data order, every rank's generators and running sums)."""
        if distu.is_main_process():
            save_dict = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         **position, "best_acc": best_acc, "val_acc": val_acc,
                         "args": eval_runs.run_args(args)}
            if scaler.is_enabled():
                save_dict["fp16_scaler"] = scaler.state_dict()
            save_atomic(save_dict, ckpt_path)

    writer = None
    if args.tensorboard and distu.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.output_dir, "tb"))
    # the printed lines' loss and learning rates: TensorBoard train/<name> at the global step,
    # log_steps.txt; the split models are selected on, in the per-epoch TensorBoard tags
    steps = StepLog(args.output_dir, writer, prefix="train", main_process=distu.is_main_process())
    val_key = getattr(dataset_val, "split_key", "heldout" if args.val_split else "test")

    # the epochs from the checkpoint's position; on SIGTERM / SIGUSR1 / Ctrl-C the ranks finish
    # the step, save, and stop (exit 0, or 130 after Ctrl-C)
    run = preempt.ResumableRun(args, loader, save_checkpoint, resume=ckpt, step_log=steps,
                               batch_size=args.batch_size_per_gpu, fix=NONFINITE_FIX)
    for epoch in run.epochs():
        train_stats = train_one_epoch(ddp_model, model, optimizer, scaler, lr_schedule, epoch,
                                      run, args)
        if train_stats is None:  # stopped mid-epoch by a signal, checkpoint written
            break
        logits = predict(model, dataset_val, args, "validation").float().cpu()
        val_targets = torch.as_tensor(dataset_val.targets)
        val_acc = (logits.argmax(1) == val_targets).float().mean().item() * 100
        val_loss = F.cross_entropy(logits, val_targets).item()  # plain, without --smoothing
        is_best = val_acc > best_acc
        best_acc = max(best_acc, val_acc)
        print(f"Validation accuracy at epoch {epoch} on {dataset_val.split_name}: {val_acc:.2f}%  "
              f"best: {best_acc:.2f}%")
        if is_best and distu.is_main_process():  # before checkpoint.pth, which records best_acc
            save_atomic({"model": model.state_dict(), "epoch": epoch + 1, "val_acc": val_acc,
                         "args": eval_runs.run_args(args)}, best_path)
        run.save(epoch + 1, val_acc=val_acc)
        if distu.is_main_process():
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps({**{f"train_{k}": v for k, v in train_stats.items()},
                                    "val_acc1": val_acc, "val_loss": val_loss,
                                    "split": dataset_val.split_name, "epoch": epoch}) + "\n")
            save_curves(args.output_dir)
            if writer is not None:  # (train/<name>: per step, StepLog)
                for k, v in train_stats.items():
                    writer.add_scalar(f"train_epoch/{k}", v, epoch)
                writer.add_scalar(f"val/top1_{val_key}", val_acc, epoch)
                writer.add_scalar(f"val/loss_{val_key}", val_loss, epoch)
    if run.stopped:  # by a signal, checkpoint written
        run.finish()
        if writer is not None:
            writer.close()
        return None

    # ============ the best-on-validation model on the test set ... ============
    if distu.get_world_size() > 1:
        torch.distributed.barrier()  # rank 0 has written checkpoint_best.pth
    best = load_file(best_path)
    model.load_state_dict(best["model"])
    # (the file's "epoch" counts finished epochs, as DINO's; printed as the epochs above: from 0)
    print(f"Testing the best-on-validation model (epoch {best['epoch'] - 1}, "
          f"{dataset_val.split_name} {best['val_acc']:.2f}%):")
    metrics = test_report(model, dataset_test, info, args, writer)
    print(f"Top-1 test accuracy on {dataset_test.split_name}: {metrics['accuracy']:.2f}")
    if writer is not None:
        writer.add_scalar(f"test/top1_{dataset_test.split_key}", metrics["accuracy"], args.epochs)
        writer.close()
    results = {"best_val_acc": best_acc, "test_acc": metrics["accuracy"],
               "splits": {"best_val_acc": dataset_val.split_name,
                          "test_acc": dataset_test.split_name}}
    if distu.is_main_process():
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return {**results, "metrics": metrics}


def finetune(args):
    check_args(args)  # bad flags fail before any process group exists
    distu.init_distributed_mode(args)
    results = run_finetune(args)
    distu.cleanup()
    if results is None and preempt.LAST_EXIT_CODE:
        sys.exit(preempt.LAST_EXIT_CODE)  # 130 after Ctrl-C
    return results


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.run(lambda: finetune(args))
