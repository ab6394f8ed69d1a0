"""Self-supervised pre-training of a ViT or ResNet backbone with one of methods/.

One process (CPU or one GPU):
    python train_ssl.py --method simclr --arch resnet18 --dataset digits --epochs 20 --warmup_epochs 2
Several GPUs / CPU processes on one node (nccl on GPUs, gloo on CPUs):
    torchrun --nproc_per_node=4 train_ssl.py --method simclr --arch resnet18 \
        --dataset imagefolder --data_path /path/to/cifar10 --output_dir out/simclr
Several nodes under SLURM:
    sbatch slurm/simclr_pretrain.sh
`python train_ssl.py --method <name> --help` lists every flag with its default for that method:
the generic flags below take their defaults from the method's RECIPE (methods/<name>.py).

The file reads top to bottom like facebookresearch/dino's main_dino.py: arguments, distributed
init, data, networks, optimizer, schedules, resume, the epoch loop, and one training epoch.
Everything method-specific lives in methods/<name>.py.
"""
import argparse
import copy
import datetime
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from core import amp, cli, preempt
from core import dist as distu
from core.checkpoint import (check_same_run, checkpoint_args, load_file, load_resume,
                             lock_output_dir, make_output_dir, remove_stale_tmp,
                             restart_from_checkpoint, save_atomic)
from core.curves import save_curves
from core.eval_args import add_eval_split_arg
from core.eval_data import check_knn_data
from core.knn import KNNEvaluator
from core.logger import StepLog, bool_flag
from core.syncbn import sync_batchnorm
from core.optim import (build_optimizer, clip_gradients, cosine_scheduler, get_params_groups,
                        lr_for_batch)
from data import DATASETS, dataset_info, resolve_dataset
from data.loaders import add_data_args, build_train_loader
from data.normalization import add_norm_args, check_norm_args, resolve_train_norm
from methods import METHODS
from models import (ARCHS, ResNet, VisionTransformer, build_backbone, check_patch_size,
                    check_vit_shape, is_vit, vit_shape)

# Generic flags whose default is the method's RECIPE (every methods/<name>.py sets them all).
RECIPE_FLAGS = ("arch", "optimizer", "lr", "min_lr", "weight_decay", "weight_decay_end",
                "clip_grad", "warmup_epochs", "epochs", "batch_size_per_gpu", "drop_path_rate",
                "adamw_betas", "saveckp_freq")


class HelpFormatter(cli.HelpFormatter):
    recipe_flags = RECIPE_FLAGS


def get_args_parser(method, add_help=True):
    """All flags of `method` (None: the generic ones only, for `--help` without --method), with
    the method's RECIPE as the defaults of the generic flags."""
    parser = cli.ArgumentParser("minissl pre-training", add_help=add_help,
                                formatter_class=HelpFormatter)
    parser.add_argument("--method", default=method, type=str, choices=sorted(METHODS),
                        help="Self-supervised method (required); `--method <name> --help` lists "
                             "its flags and recipe.")

    # Model parameters
    parser.add_argument("--arch", default=None, type=str, choices=ARCHS,
                        help="Backbone. vit_small is DINO's default on ImageNet; resnet18 with "
                             "--cifar_stem for 32px images.")
    parser.add_argument("--patch_size", default=16, type=int,
                        help="ViT patch size: 16 (or 8) at 224px, 4 at 32px CIFAR, 8 at 64px.")
    parser.add_argument("--embed_dim", default=None, type=int,
                        help="ViT width instead of --arch's, e.g. 512 for the RotNet ViT recipe "
                             "(default: the arch's own, vit_small: 384). Stored in the "
                             "checkpoint, so the evaluation scripts rebuild the same shape.")
    parser.add_argument("--depth", default=None, type=int,
                        help="ViT blocks instead of --arch's (default: the arch's own, "
                             "vit_small: 12).")
    parser.add_argument("--num_heads", default=None, type=int,
                        help="ViT attention heads instead of --arch's; must divide the width "
                             "(default: the arch's own, vit_small: 6).")
    parser.add_argument("--drop_path_rate", default=None, type=float,
                        help="Stochastic depth rate of the (student) ViT (DINO: 0.1).")
    parser.add_argument("--cifar_stem", default=None, type=bool_flag,
                        help="ResNet 3x3 stride-1 first conv without max-pool; default: on when "
                             "the input is 64px or smaller.")
    parser.add_argument("--compile", default=False, type=bool_flag,
                        help="torch.compile the backbone(s) the step runs (student and teacher; "
                             "one graph per crop size, mask and train/eval mode), compiled "
                             "during the first steps. Off by default: on a 2-core CPU it took "
                             "1.5-5 min to compile, then saved 5-9%% of a ViT step and cost "
                             "22%% of a ResNet-18 step; on GPUs it is not measured yet "
                             "(bench/gpu_suite.py measures it).")

    # Training/Optimization parameters
    amp.add_precision_args(parser)
    amp.add_tf32_arg(parser)
    parser.add_argument("--weight_decay", type=float, default=None,
                        help="Initial weight decay (DINO: 0.04; SimCLR with LARS: 1e-6).")
    parser.add_argument("--weight_decay_end", type=float, default=None,
                        help="Final weight decay of the cosine schedule (DINO: 0.4; set it equal "
                             "to --weight_decay for a constant value).")
    parser.add_argument("--clip_grad", type=float, default=None,
                        help="Per-parameter gradient norm clipping as DINO (3.0); 0 disables.")
    parser.add_argument("--batch_size_per_gpu", default=None, type=int,
                        help="Per-process batch size: the global batch is this times the number "
                             "of processes.")
    parser.add_argument("--epochs", default=None, type=int, help="Number of epochs of training.")
    parser.add_argument("--lr", default=None, type=float,
                        help="Learning rate at the end of the warmup, for a global batch of 256; "
                             "scaled linearly with the batch (DINO: 5e-4 with adamw; SimCLR with "
                             "lars: 0.3); with --lr_scaling none, the rate itself.")
    parser.add_argument("--lr_scaling", default="linear", type=str, choices=["linear", "none"],
                        help="linear: --lr is for a global batch of 256 and the run uses --lr * "
                             "batch / 256 (DINO, MAE's --blr); none: --lr is the rate itself, "
                             "whatever the batch (MAE's --lr).")
    parser.add_argument("--min_lr", type=float, default=None,
                        help="Final learning rate of the cosine schedule.")
    parser.add_argument("--warmup_epochs", default=None, type=int,
                        help="Epochs of linear learning-rate warmup (must be below --epochs).")
    parser.add_argument("--optimizer", default=None, type=str,
                        choices=["adamw", "adam", "sgd", "lars"],
                        help="adamw for ViTs (DINO); lars for large-batch SimCLR / ResNets; adam "
                             "(weight decay as an L2 term, as torch.optim.Adam) for recipes "
                             "written with it.")
    parser.add_argument("--adamw_betas", default=None, type=float, nargs=2,
                        help="AdamW (and adam) betas (DINO: PyTorch's 0.9 0.999; MAE-style "
                             "recipes such as the rotation-prediction recipe (RotNet ViT on "
                             "ImageNet): 0.9 0.95).")

    # Data
    parser.add_argument("--dataset", default=None, type=str, choices=sorted(DATASETS),
                        help="Default: inferred from --data_path (torchvision's CIFAR/STL-10 "
                             "files, train/images.npy: npy, train/<class>/: imagefolder), or "
                             "digits (scikit-learn's bundled 8x8 digits, no download) without it.")
    parser.add_argument("--data_path", default="", type=str,
                        help="Dataset root (none for digits).")
    parser.add_argument("--download", default=False, type=bool_flag,
                        help="Let torchvision download CIFAR/STL-10 if missing.")
    parser.add_argument("--skip_bad_images", default=False, type=bool_flag,
                        help="Image folders: train on, in place of an image file that cannot be "
                             "decoded, the next one, naming and counting each on stderr; false "
                             "stops at the first with one line naming the file.")
    add_data_args(parser)  # --data_backend {tensor,pil}, --data_memory_gb (data/loaders.py)
    add_norm_args(parser)  # --norm_stats {dataset,imagenet,auto}, --norm_mean, --norm_std

    # Misc
    parser.add_argument("--output_dir", default="out", type=str,
                        help="Where checkpoint.pth, log.txt and TensorBoard runs go.")
    parser.add_argument("--saveckp_freq", default=None, type=int,
                        help="Keep a numbered snapshot checkpoint{epoch:04}.pth every this many "
                             "epochs (0: never).")
    preempt.add_args(parser)
    parser.add_argument("--resume_from", default="", type=str,
                        help="Resume from this checkpoint (e.g. a snapshot <output_dir>/"
                             "checkpoint0040.pth) instead of <output_dir>/checkpoint.pth; once "
                             "this run has written its own checkpoint.pth, the same command "
                             "continues from that. Never used unless given.")
    parser.add_argument("--seed", default=0, type=int, help="Random seed.")
    parser.add_argument("--num_workers", default=10, type=int,
                        help="Data loading workers per process.")
    parser.add_argument("--print_freq", default=10, type=int,
                        help="Print a progress line every this many iterations.")
    parser.add_argument("--dist_url", default="env://", type=str,
                        help="URL used to set up distributed training (launch with torchrun, "
                             "which passes the ranks in the environment).")
    distu.add_dist_args(parser)  # --dist_backend {nccl,gloo}
    parser.add_argument("--cpu", default=False, type=bool_flag, nargs="?", const=True,
                        help="Train on CPU even if CUDA is there (`--cpu` alone: true).")
    parser.add_argument("--knn_eval", default=True, type=bool_flag,
                        help="After training, print the 20-NN accuracy of the trained backbone "
                             "(beside the same backbone at its random init, see "
                             "--knn_random_init).")
    parser.add_argument("--knn_random_init", default=True, type=bool_flag,
                        help="With --knn_eval: also score the backbone at its random init (a "
                             "copy kept from the start), the baseline the trained number is "
                             "read against; it extracts the train and test features a second "
                             "time. false: the trained backbone only.")
    parser.add_argument("--knn_k", default=20, type=int, help="k of the k-NN evaluations.")
    parser.add_argument("--knn_freq", default=0, type=int,
                        help="Also evaluate the k-NN top-1 of the backbone every this many epochs "
                             "on the dataset's labelled train and --eval_split splits (log.txt "
                             "knn_top1, TensorBoard knn/top1_<split>); 0: only the final check. "
                             "Skipped for datasets without labels.")
    add_eval_split_arg(parser)
    parser.add_argument("--tensorboard", default=True, type=bool_flag,
                        help="Write TensorBoard scalars to <output_dir>/tb (rank 0).")
    parser.add_argument("--cudnn_benchmark", default=True, type=bool_flag,
                        help="torch.backends.cudnn.benchmark: on CUDA, time the convolution "
                             "algorithms for each new input shape and keep the fastest (faster "
                             "ResNet steps; the algorithm chosen may change from run to run: "
                             "false for repeatable convolutions). No effect on CPU.")
    if method is not None:
        METHODS[method].add_args(parser)
        parser.set_defaults(**METHODS[method].RECIPE)
    return parser


def parse_args(argv=None, make_parser=None):
    """Two passes: find --method first, then parse with that method's flags and recipe.
    make_parser(method) builds the full parser (default: get_args_parser; bench/ extends it).
    Then every check that needs no data: the method's check_args, --dataset from --data_path,
    the precision. Raises ValueError (the script's entry point prints it as one line)."""
    pre = cli.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    pre.add_argument("-h", "--help", action="store_true")
    known, _ = pre.parse_known_args(argv)
    choices = ", ".join(sorted(METHODS))
    if known.method is None and not known.help:
        raise ValueError(f"pass --method, one of {choices} (e.g. --method simclr); "
                         "`--method <name> --help` lists its flags and recipe")
    if known.method is not None and known.method not in METHODS:
        raise ValueError(f"unknown --method '{known.method}'; choose one of: {choices}")
    args = (make_parser or get_args_parser)(known.method).parse_args(argv)
    check_args(args)
    METHODS[args.method].check_args(args)
    preempt.check_args(args)
    args.dataset = resolve_dataset(args.dataset, args.data_path)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    amp.resolve_precision(args, device)
    distu.process_group_backend(device, args.dist_backend)  # nccl without CUDA: one clear line
    return args


def check_args(args):
    """The generic flags: values that cannot work fail here, before anything starts."""
    if args.epochs < 1:
        raise ValueError(f"--epochs {args.epochs} trains nothing; use --epochs >= 1")
    if not 0 <= args.warmup_epochs < args.epochs:
        raise ValueError(f"--warmup_epochs ({args.warmup_epochs}) must be >= 0 and below --epochs "
                         f"({args.epochs})")
    for name, low in (("batch_size_per_gpu", 1), ("num_workers", 0), ("print_freq", 1),
                      ("saveckp_freq", 0), ("knn_k", 1), ("knn_freq", 0), ("patch_size", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name} {getattr(args, name)} must be >= {low}")
    for name in ("lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} {getattr(args, name)} must be >= 0")
    if not 0 <= args.drop_path_rate < 1:
        raise ValueError(f"--drop_path_rate {args.drop_path_rate} must be in [0, 1)")
    check_vit_shape(args.arch, args)  # --embed_dim / --depth / --num_heads that fit --arch
    check_norm_args(args)


# Flags a resumed run may change: how long or how it runs, not what it computes (DINO extends
# runs with a larger --epochs). Every other flag stored in checkpoint.pth defines the run:
# method, model, head, data, crops, optimisation, batch size, seed.
RESUMABLE = {"epochs", "output_dir", "num_workers", "print_freq", "dist_url", "dist_backend",
             "cpu", "download",
             "tensorboard", "knn_eval", "knn_k", "knn_freq", "eval_split", "saveckp_freq",
             "knn_random_init", "cudnn_benchmark", "skip_bad_images",
             "precision", "use_fp16", "tf32", "compile", "data_backend", "data_memory_gb",
             "checkpoint_every_iters", "checkpoint_every_minutes", "resume_from",
             "rank", "world_size", "gpu", "device", "distributed"}  # set by init_distributed_mode
FIRST = ("method", "arch", "patch_size", "dataset", "data_path")  # named first when several differ


def check_output_dir(args):
    """Before any data is read: --output_dir is a folder this process can write in, and the
    checkpoint.pth there (and the --resume_from file), if any, was written by this same run
    (core/checkpoint.check_same_run), not by a run of another method, model or dataset that
    would crash the resume or, worse, be continued silently; nor by another number of
    processes, unless --allow_world_size_change true (core/preempt.check_world_size). Flags
    left unset (None) are derived from the compared ones."""
    make_output_dir(args.output_dir)
    paths = [p for p in [os.path.join(args.output_dir, "checkpoint.pth")] if os.path.isfile(p)]
    if args.resume_from:
        paths.append(args.resume_from)  # a missing one is reported here, before any data
    current = {k: os.path.abspath(v) if k == "data_path" and v else v
               for k, v in vars_plain(args).items() if v is not None}
    for path in paths:
        try:
            ckpt = load_file(path, mmap=True)
        except ValueError:
            continue  # an unreadable checkpoint is the resume's to report
        stored = checkpoint_args(ckpt)
        if stored.get("data_path"):
            stored = {**stored, "data_path": os.path.abspath(stored["data_path"])}
        check_same_run(path, stored, current, RESUMABLE, FIRST)
        preempt.check_world_size(path, ckpt, getattr(args, "world_size", None),
                                 args.batch_size_per_gpu, args.allow_world_size_change,
                                 lambda batch: lr_for_batch(args.lr, batch))


def train_ssl(args):
    check_knn_data(args)  # the k-NN check has a labelled split to score, before any image is read
    distu.init_distributed_mode(args)
    make_output_dir(args.output_dir)
    if distu.is_main_process():  # one run per folder: a second one stops here, in one line
        lock_output_dir(args.output_dir)  # held until this process ends, however it ends
    check_output_dir(args)
    distu.fix_random_seeds(args.seed)
    method = METHODS[args.method]
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    amp.set_tf32(args.tf32)  # the exact parts keep full float32 (amp.full_fp32)

    # ============ preparing data ... ============
    info = dataset_info(args.dataset, args.data_path)
    # the mean / std of every Normalize, kept in the checkpoint's args for the evaluations
    info = resolve_train_norm(args, info)
    resolve_input(args, info)
    cli.print_args(args)  # every flag final from here on: the listing is what checkpoints store
    check_patch_size(args.arch, args.patch_size, args.input_size, "the dataset's image size")
    transform = method.build_transform(args, info)
    # tensor: views made in batches on the device from a resident uint8 copy of the split (or
    # JPEGs decoded there); pil: the method's PIL transform per image in DataLoader workers.
    # Both visit each rank's DistributedSampler order with drop_last (data/loaders.py).
    data_loader = build_train_loader(
        args.data_backend, args.dataset, args.data_path, transform, args.batch_size_per_gpu,
        device=args.device, seed=args.seed, rank=args.rank, world_size=args.world_size,
        num_workers=args.num_workers, memory_gb=args.data_memory_gb, download=args.download,
        skip_bad_images=args.skip_bad_images)
    global_batch = args.batch_size_per_gpu * args.world_size
    if data_loader.num_images < global_batch:
        raise ValueError(f"the train split has {data_loader.num_images} images, fewer than one "
                         f"global batch ({global_batch}); lower --batch_size_per_gpu")
    print(f"Data loaded: there are {data_loader.num_images} images ({data_loader.describe}).")

    # ============ building the networks ... ============
    model, backbone, init_backbone = build_networks(args, len(data_loader))
    model = sync_batchnorm(model, args.device)  # BatchNorm statistics over all ranks, CPU too
    # DDP averages the gradients of the parameters that require them (the student); the EMA
    # teacher gets none and stays identical on every rank because the student does. The buffers
    # stay identical too: BatchNorm running statistics move with the global batch statistics on
    # every backend (core/syncbn.py) and the loss buffers (DINO's centre) are all-reduced, so
    # re-broadcasting rank 0's buffers before every forward would be a wasted collective.
    # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets (one copy
    # and one gradient-sized buffer less); clipping and zero_grad(set_to_none=True) work on them.
    ddp_model = DistributedDataParallel(model, device_ids=[args.gpu] if args.device.type == "cuda"
                                        else None, **ddp_kwargs(buffers_in_sync=True)) \
        if args.distributed else model
    shape = f" of width {backbone.embed_dim}, depth {len(backbone.blocks)}, " \
        f"{backbone.blocks[0].attn.num_heads} heads" if vit_shape(args) else ""
    print(f"Backbone {args.arch}{shape} ({backbone.embed_dim}-d features, "
          f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M parameters) and "
          f"{args.method} built.")

    # ============ preparing optimizer ... ============
    optimizer = build_optimizer(args.optimizer, get_params_groups(model), args.device,
                                betas=args.adamw_betas)
    scaler = amp.grad_scaler(args.precision, args.device)  # a no-op unless fp16

    # ============ init schedulers ... ============
    niter = len(data_loader)
    base_lr = lr_for_batch(args.lr, global_batch, args.lr_scaling)  # linear scaling, or none
    print(f"base lr: {args.lr:.3e}  actual lr: {base_lr:.3e}  global batch: {global_batch} "
          f"({args.batch_size_per_gpu} x {args.world_size}; --lr_scaling {args.lr_scaling})")
    lr_schedule = cosine_scheduler(base_lr, args.min_lr, args.epochs, niter,
                                   warmup_epochs=args.warmup_epochs)
    wd_schedule = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter)

    # ============ optionally resume training ... ============
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if distu.is_main_process():
        remove_stale_tmp(args.output_dir)  # the unfinished writes of a killed run
    ckpt_path, ckpt = load_resume(os.path.join(args.output_dir, "checkpoint.pth"), args.resume_from)
    to_restore = {"epoch": 0, "iteration": 0, "ranks": None}
    if ckpt is not None:
        preempt.check_position(ckpt, args.world_size, args.batch_size_per_gpu)
        restart_from_checkpoint(ckpt_path, run_variables=to_restore, ckpt=ckpt,
                                optimizer=optimizer,
                                fp16_scaler=scaler if scaler.is_enabled() else None,
                                **model.checkpoint_modules())
        del ckpt

    def save_checkpoint(position):
        """checkpoint.pth (rank 0) at `position` (core/preempt.py: the epoch, the iteration in
        it, the data order, every rank's generators and running sums), and at the end of every
        --saveckp_freq-th epoch a snapshot checkpoint{epoch:04}.pth."""
        save_dict = checkpoint_dict(model, optimizer, scaler, args, position)
        if distu.is_main_process():
            save_atomic(save_dict, os.path.join(args.output_dir, "checkpoint.pth"))
            epoch = position["epoch"]
            if position["iteration"] == 0 and args.saveckp_freq and epoch % args.saveckp_freq == 0:
                save_atomic(save_dict, os.path.join(args.output_dir, f"checkpoint{epoch:04}.pth"))

    writer = None
    if args.tensorboard and distu.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.output_dir, "tb"))
    # every printed line's loss, lr, wd and method stats: TensorBoard train/<name> at the global
    # step and log_steps.txt (curves.png draws them per step); rank 0 only
    steps = StepLog(args.output_dir, writer, prefix="train", main_process=distu.is_main_process())

    knn = None  # the labelled splits, built once for every k-NN evaluation
    if (args.knn_eval or args.knn_freq) and info.num_classes != 0:
        knn = KNNEvaluator.for_run(args, info)

    knn_top1 = None  # the k-NN top-1 after the last epoch, when --knn_freq evaluated it
    # the epochs from the checkpoint's position; on SIGTERM / SIGUSR1 / Ctrl-C the ranks finish
    # the step, save, and exit (0, or 130 after Ctrl-C; a second Ctrl-C stops at once)
    run = preempt.ResumableRun(args, data_loader, save_checkpoint, resume=to_restore,
                               step_log=steps, batch_size=args.batch_size_per_gpu,
                               fix=NONFINITE_FIX)
    training = Training(ddp_model, model, optimizer, scaler, lr_schedule, wd_schedule, args)
    start_time = time.time()
    print(f"Starting {args.method} training from epoch {run.start_epoch}"
          + (f", iteration {run.start_iter}" if run.start_iter else "") + "!")
    for epoch in run.epochs():
        # ============ training one epoch ... ============
        train_stats = train_one_epoch(training, epoch, run)
        if train_stats is None:  # stopped mid-epoch by a signal, checkpoint written
            break
        # the method's own check of the epoch (DINO/iBOT: one warning line if the teacher collapsed)
        method.diagnose(train_stats, args, epoch)
        knn_top1 = None
        if knn is not None and args.knn_freq and (epoch + 1) % args.knn_freq == 0:
            knn_top1 = knn_during_training(knn, model.eval_backbone(), epoch, args)

        # ============ writing logs and checkpoint ... ============
        run.save(epoch + 1)
        if distu.is_main_process():
            log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}
            if knn_top1 is not None:
                log_stats.update(knn_top1=knn_top1, knn_split=knn.split_name)
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(log_stats) + "\n")
            save_curves(args.output_dir)  # curves.png: log.txt per epoch, log_steps.txt per step
            if writer is not None:  # (train/<name>: per step, StepLog)
                for k, v in train_stats.items():
                    writer.add_scalar(f"train_epoch/{k}", v, epoch)
                if knn_top1 is not None:
                    writer.add_scalar(f"knn/top1_{knn.split_key}", knn_top1, epoch)
                writer.flush()
        done = epoch + 1 - run.start_epoch
        left = (time.time() - start_time) / done * (args.epochs - epoch - 1)
        print(f"Epoch {epoch + 1}/{args.epochs} done; eta of the training "
              f"{datetime.timedelta(seconds=int(left))}", flush=True)
    total_time = time.time() - start_time
    print(f"Training time {datetime.timedelta(seconds=int(total_time))}")
    if run.stopped:  # by a signal (also after the last step: the final k-NN check is skipped)
        code = run.finish()  # 130 after Ctrl-C: an interrupted command
        if writer is not None:
            writer.close()
        distu.cleanup()
        if code:
            sys.exit(code)
        return

    if args.knn_eval and knn is not None:
        final_knn_check(knn, model.eval_backbone(), init_backbone, args, writer, knn_top1)
    if writer is not None:
        writer.close()
    distu.cleanup()


def ddp_kwargs(buffers_in_sync):
    """DDP flags: gradients as views of the buckets, and rank 0's buffers re-broadcast before
    every forward only if the ranks' buffers can drift apart. torch 2.14 renamed that flag from
    broadcast_buffers to forward_sync_buffers (the old name warns there); under either name
    the buffers are still broadcast once, when DDP wraps the model."""
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {name: not buffers_in_sync, "gradient_as_bucket_view": True}


def resolve_input(args, info):
    """The flags the data decides, set before the args are printed and stored: input_size (the
    method's training crop) and, unless given, cifar_stem (on at 64px and below)."""
    args.input_size = METHODS[args.method].input_size(args, info)
    if args.cifar_stem is None:
        args.cifar_stem = args.input_size <= 64


def build_networks(args, niter_per_ep):
    """Backbone + the method's module around it, on the device. Returns (model, backbone, a CPU
    copy of that backbone at its random init when --knn_eval and --knn_random_init, for the
    final baseline). Reads args.input_size (resolve_input) and leaves args as they are."""
    method = METHODS[args.method]
    if args.cifar_stem is None:  # the methods build their teacher from args.cifar_stem too
        raise ValueError("build_networks needs args.cifar_stem; call resolve_input first")
    cifar_stem = args.cifar_stem
    backbone, embed_dim = build_backbone(args.arch, patch_size=args.patch_size,
                                         img_size=[args.input_size],
                                         drop_path_rate=args.drop_path_rate,
                                         cifar_stem=cifar_stem, **vit_shape(args),
                                         **method.backbone_kwargs(args))
    init_backbone = copy.deepcopy(backbone) if args.knn_eval and args.knn_random_init else None
    model = method.build(args, backbone, embed_dim, niter_per_ep).to(args.device)
    if not is_vit(backbone) and args.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # faster convolutions
    if args.compile:
        compile_backbones(model)
    return model, backbone, init_backbone


def checkpoint_dict(model, optimizer, scaler, args, position):
    """What checkpoint.pth holds: DINO's keys (the networks and loss buffers under the method's
    names, "optimizer", "fp16_scaler", "epoch" = finished epochs, "args") and what an exact
    resume at `position` needs (core/preempt.py ResumableRun.position: "epoch", "iteration",
    the data order "sampler", every rank's random generators and running sums "ranks"). The
    schedules are indexed by (epoch, iteration), so they need nothing more."""
    save_dict = {k: m.state_dict() for k, m in model.checkpoint_modules().items()}
    save_dict.update(optimizer=optimizer.state_dict(), **position, args=vars_plain(args))
    if scaler.is_enabled():
        save_dict["fp16_scaler"] = scaler.state_dict()  # main_dino.py's key
    return save_dict


def compile_backbones(model, backend="inductor"):
    """torch.compile every backbone inside the method's module, in place (nn.Module.compile):
    the state_dict keys, the checkpoints and the method code stay as they are. Each backbone is
    traced lazily at its first call, with static shapes, once per input signature (DINO's two
    crop sizes, iBOT's masked and unmasked calls, train and eval mode: 2-4 graphs, within
    dynamo's recompile limit of 8). Heads and losses stay eager: little compute, and their
    schedules are indexed by epoch on the host."""
    for module in model.modules():
        if isinstance(module, (VisionTransformer, ResNet)):
            module.compile(backend=backend, dynamic=False)


@dataclass
class Training:
    """What a training step works with (train_one_epoch's `t`)."""
    ddp_model: nn.Module  # the method's module (methods/), DDP-wrapped with several processes
    model: nn.Module  # the same, unwrapped: after_backward, after_step, eval_backbone
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # a no-op unless fp16
    lr_schedule: np.ndarray  # per global iteration
    wd_schedule: np.ndarray
    args: argparse.Namespace


# the end of the one line a loss gone nan/inf stops the run with (core/preempt.py)
NONFINITE_FIX = ("Lower --lr, raise --warmup_epochs, keep --clip_grad on, or train in --precision "
                 "bf16 or fp32 if this was fp16.")


def train_one_epoch(t, epoch, run):
    """One epoch of training, from where `run` (core.preempt.ResumableRun) stands in it: the
    run deals the batches, agrees with the other ranks every print_freq steps, stops on a
    non-finite loss and saves and stops on a signal. Returns the epoch's averaged stats, or
    None when the ranks stopped mid-epoch (checkpoint written)."""
    args = t.args
    t.ddp_model.train()
    channels_last = input_channels_last(t.model, args.device)

    def edit_gradients():  # between backward and step, on the unscaled gradients
        if args.clip_grad:
            clip_gradients(t.model, args.clip_grad)
        t.model.after_backward(epoch)  # e.g. DINO's frozen last layer

    steps = run.epoch(epoch)
    for it, (views, _) in steps:  # it: the global training iteration
        lr, wd = float(t.lr_schedule[it]), float(t.wd_schedule[it])  # host floats: no sync
        for j, group in enumerate(t.optimizer.param_groups):
            group["lr"] = lr
            if j == 0:  # only the first group is regularized
                group["weight_decay"] = wd

        views = to_device(views, args.device, channels_last)
        with amp.autocast(args.precision, args.device):
            loss, stats = t.ddp_model(views, epoch, it)
        amp.backward_step(loss, t.optimizer, t.scaler, after_unscale=edit_gradients)
        t.model.after_step(it)
        # kept on the device; a nan/inf loss is read on the host every print_freq steps
        steps.update(loss, lr=lr, wd=wd, **stats)
    stats = steps.averages()
    if stats is None:  # stopped by a signal
        return None
    stats.update(lr=t.optimizer.param_groups[0]["lr"],
                 wd=t.optimizer.param_groups[0]["weight_decay"])
    print("Averaged stats:", "  ".join(f"{k}: {v:.4g}" for k, v in stats.items()))
    return stats


def to_device(obj, device, channels_last=False):
    """Tensors (in lists, tuples, dicts) to `device`; with channels_last, image batches in the
    channels-last layout (see input_channels_last)."""
    if torch.is_tensor(obj):
        obj = obj.to(device, non_blocking=True)
        if channels_last and obj.ndim == 4 and obj.is_floating_point():
            obj = obj.contiguous(memory_format=torch.channels_last)
        return obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device, channels_last) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, channels_last) for k, v in obj.items()}
    return obj


def input_channels_last(model, device):
    """Channels-last images only for a convolutional backbone on CUDA (build_networks converts
    its weights): a ViT's only convolution is its patch embedding, and the layout change would
    be one more copy of every batch."""
    return device.type == "cuda" and not is_vit(model.eval_backbone())


def vars_plain(args):
    """args as a dict of plain Python values, so torch.load(weights_only=True) can read it."""
    return {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}


def knn_during_training(knn, backbone, epoch, args):
    """--knn_freq: the k-NN top-1 of the backbone after `epoch`, printed; the next epoch's
    train() call puts it back in training mode. Its data loaders draw their seeds from the CPU
    generator: forked, so that training goes on exactly as without --knn_freq."""
    start = time.time()
    with torch.random.fork_rng(devices=[]):
        top1, _ = knn(backbone, f"epoch {epoch + 1} backbone")
    print(f"Epoch {epoch + 1}/{args.epochs}: {knn.describe()} {top1:.2f}% "
          f"({time.time() - start:.0f}s)", flush=True)
    return top1


def final_knn_check(knn, trained, init_backbone, args, writer, trained_top1=None):
    """The quickstart's proof of learning: k-NN top-1 of the trained backbone beside the
    same backbone at random init (init_backbone; None: --knn_random_init false, the trained one
    only), on the dataset's labelled train/test splits (`knn`, a KNNEvaluator). trained_top1:
    the trained backbone's number when already measured."""
    results = {}
    for name, net in (("pretrained", trained), ("random init", init_backbone)):
        if net is None:
            continue
        if name == "pretrained" and trained_top1 is not None:
            top1 = trained_top1
        else:
            top1, _ = knn(net.to(args.device), f"{name} backbone")
        results[name] = top1
        print(f"{knn.describe()} ({name}): {top1:.2f}%")
    results = {name.replace(" ", "_"): top1 for name, top1 in results.items()}
    if writer is not None:
        for name, top1 in results.items():
            writer.add_scalar(f"knn/top1_{name}_{knn.split_key}", top1, args.epochs)
    if distu.is_main_process():
        with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps({"knn_k": knn.k_used,
                                **{f"knn_top1_{name}": top1 for name, top1 in results.items()},
                                "knn_split": knn.split_name}) + "\n")


if __name__ == "__main__":
    cli.run(lambda: train_ssl(parse_args()))
