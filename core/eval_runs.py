"""An evaluation run's folder and the guard that keeps two runs apart in it:

    default_output_dir(script, args)   out/<script>/<weights>_<dataset>
    run_args(args)                     the run's flags as a plain dict, kept in its checkpoints
    check_resume(path, ckpt, args)     never resume (or evaluate) another run's checkpoint
"""
import os
from pathlib import Path

import torch

from core.checkpoint import check_same_run, checkpoint_args


def default_output_dir(script, args, subject=None):
    """out/<script>/<run>: the run is named by the weights (their folder and file name, e.g.
    out/eval_linear/dino_checkpoint_cifar10 for out/dino/checkpoint.pth) or random_init_<arch>,
    then `subject` (default: the dataset). Kept under out/ as train_ssl.py's runs, never next to
    the weights (often a read-only or shared folder); the runs that still meet in one folder
    (e.g. another --checkpoint_key) are refused by check_resume."""
    if args.pretrained_weights:
        path = Path(args.pretrained_weights)
        run = "_".join(x for x in (path.parent.name, path.stem) if x)
    else:
        run = f"random_init_{args.arch}"
    return os.path.join("out", script, f"{run}_{subject or args.dataset}")


# Flags a resumed run may change: how it runs, or how long, not what it computes. Every other
# flag defines the run (weights, data, model, features, head, optimisation, seed).
RESUMABLE = {"epochs", "output_dir", "evaluate", "linear_weights", "finetuned_weights",
             "save_predictions", "num_workers", "print_freq", "val_freq", "tensorboard",
             "precision", "use_fp16", "dist_url", "cpu", "data_backend", "data_memory_gb",
             "checkpoint_every_iters", "checkpoint_every_minutes",
             "rank", "world_size", "gpu", "device", "distributed"}  # set by init_distributed_mode
# named first when several differ: the usual reason two runs meet in one folder
FIRST = ("pretrained_weights", "checkpoint_key", "arch", "patch_size", "embed_dim", "depth",
         "num_heads", "dataset", "data_path")


def run_args(args):
    """The flags of this run as a plain dict (weights_only=True reads it), the paths absolute
    so a run resumed from another working directory still matches."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, torch.device):
            v = str(v)
        elif k in ("pretrained_weights", "data_path") and v:
            v = os.path.abspath(v)
        out[k] = v
    return out


def check_resume(path, ckpt, args):
    """Refuse to resume (or evaluate) `path` when the run that wrote it had other weights, data
    or flags than this command: a ValueError naming the first flag that differs and the way out
    (core/checkpoint.check_same_run, shared with train_ssl.py). Otherwise a second run in one
    folder would report the first one's accuracy."""
    check_same_run(path, checkpoint_args(ckpt), run_args(args), RESUMABLE, FIRST)
