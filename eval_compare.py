"""Pretrained versus random init, side by side: k-NN, linear probe and fine-tuning of one
checkpoint and of the same architecture at random init, in one Markdown table (compare.md) and
TensorBoard runs (what the SimCLR seeds showed by hand).

    python eval_compare.py --pretrained_weights out/rotation/checkpoint.pth --dataset digits \
        --linear_epochs 30 --finetune_epochs 10 --output_dir out/compare
    torchrun --nproc_per_node=4 eval_compare.py --pretrained_weights out/dino/checkpoint.pth \
        --dataset cifar10 --data_path ../shared/data --output_dir out/compare_cifar \
        --finetune_args "--val_split 5000 --layer_decay 0.75"

Each evaluation is the script itself (eval_knn.run_knn, eval_linear.run_linear,
finetune.run_finetune), run twice with the same flags but --pretrained_weights: the model flags
(arch, patch size, stem, resolution) are read once from the checkpoint so both runs build the
same network. Extra flags go through --knn_args / --linear_args / --finetune_args (they come
last, so they override). The linear probe runs on cached features unless told otherwise.
Per-run outputs and logs: <output_dir>/{pretrained,random_init}/{linear,finetune}/;
`tensorboard --logdir <output_dir>` shows both inits side by side.
"""
import argparse
import json
import os
import shlex
from pathlib import Path

from core import dist as distu
from core.checkpoint import load_backbone
from core.logger import bool_flag
from data import DATASETS, dataset_info
from models import ARCHS

EVALS = ("knn", "linear", "finetune")


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("Pretrained vs random init", add_help=add_help)
    parser.add_argument("--pretrained_weights", required=True, type=str,
                        help="The checkpoint to compare with its own architecture at random init.")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='Key to use in the checkpoint (example: "teacher").')
    parser.add_argument("--arch", default=None, type=str, choices=ARCHS,
                        help="Architecture (default: from the checkpoint, else vit_small).")
    parser.add_argument("--patch_size", default=None, type=int,
                        help="ViT patch size (default: from the checkpoint).")
    parser.add_argument("--image_size", default=None, type=int,
                        help="Resolution (default: the checkpoint's crop, else the dataset's).")
    parser.add_argument("--cifar_stem", default=None, type=bool_flag,
                        help="ResNet CIFAR stem (default: from the checkpoint / image size).")
    parser.add_argument("--dataset", default="digits", type=str, choices=sorted(DATASETS),
                        help="Dataset name (digits: embedded, no download).")
    parser.add_argument("--data_path", default="", type=str, help="Dataset root.")
    parser.add_argument("--evals", default=list(EVALS), nargs="+", choices=EVALS,
                        help="Which evaluations to run (all three by default).")
    parser.add_argument("--knn_k", default=20, type=int, help="k of the k-NN row (DINO reports 20).")
    parser.add_argument("--linear_epochs", default=100, type=int, help="Epochs of the linear probe.")
    parser.add_argument("--finetune_epochs", default=100, type=int, help="Epochs of fine-tuning.")
    parser.add_argument("--knn_args", default="", type=str,
                        help='Extra eval_knn.py flags, e.g. "--temperature 0.1".')
    parser.add_argument("--linear_args", default="", type=str,
                        help='Extra eval_linear.py flags, e.g. "--lr 0.1 --cached_features false".')
    parser.add_argument("--finetune_args", default="", type=str,
                        help='Extra finetune.py flags, e.g. "--layer_decay 0.75 --val_split 5000".')
    parser.add_argument("--batch_size_per_gpu", default=128, type=int,
                        help="Per-GPU batch size of every run.")
    parser.add_argument("--num_workers", default=10, type=int, help="Data loading workers.")
    parser.add_argument("--seed", default=0, type=int, help="Random seed of every run.")
    parser.add_argument("--output_dir", default="compare", type=str,
                        help="Where compare.md and the runs go.")
    parser.add_argument("--dist_url", default="env://", type=str,
                        help="url used to set up distributed training")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int, help="Ignored.")
    parser.add_argument("--cpu", action="store_true", help="Run on CPU even if CUDA is there.")
    return parser


def resolve_model_flags(args):
    """Fill arch / patch_size / cifar_stem / image_size from the checkpoint (as load_backbone
    does) so the random-init run builds exactly the same network."""
    probe = argparse.Namespace(**{k: getattr(args, k) for k in
                                  ("pretrained_weights", "checkpoint_key", "arch", "patch_size",
                                   "image_size", "cifar_stem")})
    if probe.image_size is None and probe.cifar_stem is None:
        from core.checkpoint import load_file
        stored = load_file(args.pretrained_weights).get("args")
        stored = vars(stored) if isinstance(stored, argparse.Namespace) else (stored or {})
        if not (stored.get("input_size") or stored.get("global_crops_size")):
            probe.image_size = dataset_info(args.dataset, args.data_path).image_size
    load_backbone(probe)  # also refuses a checkpoint that does not fit, before any run starts
    args.arch, args.patch_size, args.cifar_stem = probe.arch, probe.patch_size, probe.cifar_stem
    args.image_size = probe.image_size or dataset_info(args.dataset, args.data_path).image_size


def sub_args(module, flags, args):
    """Parse `flags` with the script's own parser and hand it this process's distributed state."""
    sub = module.get_args_parser().parse_args(flags)
    for k in ("rank", "world_size", "gpu", "device", "distributed"):
        setattr(sub, k, getattr(args, k))
    return sub


def run_one(name, weights, init, args):
    """One evaluation of one init; returns its headline top-1 (rank 0) or None."""
    import eval_knn
    import eval_linear
    import finetune
    common = ["--pretrained_weights", weights, "--checkpoint_key", args.checkpoint_key,
              "--arch", args.arch, "--patch_size", str(args.patch_size),
              "--image_size", str(args.image_size), "--cifar_stem", str(args.cifar_stem).lower(),
              "--dataset", args.dataset, "--data_path", args.data_path,
              "--batch_size_per_gpu", str(args.batch_size_per_gpu),
              "--num_workers", str(args.num_workers), "--seed", str(args.seed)]
    out = os.path.join(args.output_dir, init, name)
    if name == "knn":
        sub = sub_args(eval_knn, common + ["--nb_knn", str(args.knn_k)] + shlex.split(args.knn_args), args)
        res = eval_knn.run_knn(sub)
        if "knn" not in res:  # ranks other than 0
            return None
        return res["knn"].get(args.knn_k, next(iter(res["knn"].values())))[0]
    if name == "linear":
        flags = ["--epochs", str(args.linear_epochs), "--cached_features", "true", "--output_dir", out]
        sub = sub_args(eval_linear, common + flags + shlex.split(args.linear_args), args)
        res = eval_linear.run_linear(sub)
        return res["test_acc"] if res["test_acc"] is not None else res["best_acc"]
    warmup = min(5, args.finetune_epochs // 5)
    flags = ["--epochs", str(args.finetune_epochs), "--warmup_epochs", str(warmup), "--output_dir", out]
    sub = sub_args(finetune, common + flags + shlex.split(args.finetune_args), args)
    return finetune.run_finetune(sub)["test_acc"]


ROW_NAMES = {"knn": "{k}-NN top-1 (test)", "linear": "linear probe top-1 (test, {le} epochs)",
             "finetune": "fine-tuning top-1 (test, best-on-val of {fe} epochs)"}


def markdown_table(results, args):
    lines = [f"# Pretrained vs random init: {args.arch} on {args.dataset}", "",
             f"Checkpoint: `{args.pretrained_weights}` (key `{args.checkpoint_key}`); "
             f"{args.image_size}px" + (f", patch {args.patch_size}" if args.arch.startswith("vit") else "")
             + f". Runs and logs under `{args.output_dir}/`.", "",
             "| evaluation | pretrained | random init | difference |", "|---|---|---|---|"]
    for name in args.evals:
        p, r = results[name]["pretrained"], results[name]["random_init"]
        row = ROW_NAMES[name].format(k=args.knn_k, le=args.linear_epochs, fe=args.finetune_epochs)
        lines.append(f"| {row} | {p:.2f} | {r:.2f} | {p - r:+.2f} |")
    return "\n".join(lines) + "\n"


def eval_compare(args):
    distu.init_distributed_mode(args)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    resolve_model_flags(args)
    results = {name: {} for name in args.evals}
    for init, weights in (("pretrained", args.pretrained_weights), ("random_init", "")):
        for name in args.evals:
            print(f"============ {name}: {init} ============")
            results[name][init] = run_one(name, weights, init, args)
    if distu.is_main_process():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        table = markdown_table(results, args)
        print(table)
        with open(os.path.join(args.output_dir, "compare.md"), "w") as f:
            f.write(table)
        with open(os.path.join(args.output_dir, "compare.json"), "w") as f:
            json.dump(results, f, indent=1)
        from torch.utils.tensorboard import SummaryWriter
        for init in ("pretrained", "random_init"):  # one run per init: the bars side by side
            with SummaryWriter(os.path.join(args.output_dir, "tb", init)) as w:
                for name in args.evals:
                    w.add_scalar(f"compare/{name}_top1", results[name][init], 0)
    distu.cleanup()
    return results


if __name__ == "__main__":
    eval_compare(get_args_parser().parse_args())
