"""Pretrained versus random init, side by side: k-NN, linear probe and fine-tuning of one
checkpoint and of the same architecture at random init, in one Markdown table (compare.md) and
TensorBoard runs, rather than numbers gathered by hand from separate runs.

    python eval_compare.py --pretrained_weights out/rotation/checkpoint.pth --dataset digits \
        --linear_epochs 30 --finetune_epochs 10 --output_dir out/compare
    python eval_compare.py --nproc_per_node 4 --pretrained_weights out/dino/checkpoint.pth \
        --dataset cifar10 --data_path /path/to/cifar10 --output_dir out/compare_cifar \
        --finetune_args "--val_split 5000 --layer_decay 0.75"

Each evaluation is the script itself (eval_knn.py, eval_linear.py, finetune.py), started as its
own process (under torchrun with --nproc_per_node > 1) twice with the same flags but
--pretrained_weights: the model flags (arch, patch size, stem, resolution) are read once from
the checkpoint so both runs build the same network. Each run writes results.json, which this
script collects. Extra flags go through --knn_args / --linear_args / --finetune_args (they come
last, so they override). The linear probe runs on cached features unless told otherwise.
Per-run outputs and logs: <output_dir>/{pretrained,random_init}/{knn,linear,finetune}/;
`tensorboard --logdir <output_dir>` shows both inits side by side.
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from core import cli, evaluation
from data import dataset_info

ROOT = Path(__file__).resolve().parent
SCRIPTS = {"knn": "eval_knn.py", "linear": "eval_linear.py", "finetune": "finetune.py"}


def get_args_parser():
    parser = cli.ArgumentParser("Pretrained vs random init", parents=[
        evaluation.model_parser(), evaluation.data_parser(), evaluation.run_parser()])
    group = parser.add_argument_group("Comparison")
    group.add_argument("--evals", default=list(SCRIPTS), nargs="+", choices=list(SCRIPTS),
                       help="Which evaluations to run (all three by default).")
    group.add_argument("--knn_k", default=20, type=int, help="k of the k-NN row (DINO reports 20).")
    group.add_argument("--linear_epochs", default=100, type=int, help="Epochs of the linear probe.")
    group.add_argument("--finetune_epochs", default=100, type=int, help="Epochs of fine-tuning.")
    group.add_argument("--knn_args", default="", type=str,
                       help='Extra eval_knn.py flags, e.g. "--temperature 0.1".')
    group.add_argument("--linear_args", default="", type=str,
                       help='Extra eval_linear.py flags, e.g. "--lr 0.1 --cached_features false".')
    group.add_argument("--finetune_args", default="", type=str,
                       help='Extra finetune.py flags, e.g. "--layer_decay 0.75 --val_split 5000".')
    group.add_argument("--nproc_per_node", default=1, type=int,
                       help="Processes (GPUs) per evaluation; > 1 starts each one with torchrun.")
    return parser


def check_args(args):
    evaluation.check_common_args(args)
    if not args.pretrained_weights:
        raise ValueError("eval_compare.py needs --pretrained_weights (the checkpoint to compare "
                         "with its own architecture at random init)")
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        raise ValueError("eval_compare.py starts each evaluation itself: run it with python (one "
                         "process), and --nproc_per_node N for N GPUs per evaluation")
    if args.nproc_per_node < 1:
        raise ValueError(f"--nproc_per_node {args.nproc_per_node} starts nothing; use >= 1")


def resolve_model_flags(args):
    """Fill arch / patch_size / cifar_stem / image_size from the checkpoint, so that the
    random-init run builds exactly the same network (and a checkpoint that does not fit is
    refused before any run starts)."""
    evaluation.load_backbone(args, default_image_size=dataset_info(args.dataset, args.data_path).image_size)


def command(name, weights, out, args):
    """The command line of one evaluation of one init."""
    launcher = [sys.executable] if args.nproc_per_node == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc_per_node}"]
    flags = ["--pretrained_weights", weights, "--checkpoint_key", args.checkpoint_key,
             "--arch", args.arch, "--patch_size", str(args.patch_size),
             "--image_size", str(args.image_size), "--cifar_stem", str(args.cifar_stem).lower(),
             "--dataset", args.dataset, "--data_path", args.data_path, "--output_dir", out,
             "--batch_size_per_gpu", str(args.batch_size_per_gpu),
             "--num_workers", str(args.num_workers), "--seed", str(args.seed),
             "--data_backend", args.data_backend, "--data_memory_gb", str(args.data_memory_gb)]
    if args.precision is not None:
        flags += ["--precision", args.precision]
    if args.use_fp16 is not None:
        flags += ["--use_fp16", str(args.use_fp16).lower()]
    if args.cpu:
        flags += ["--cpu"]
    if name == "knn":
        flags += ["--nb_knn", str(args.knn_k)] + shlex.split(args.knn_args)
    elif name == "linear":
        flags += ["--epochs", str(args.linear_epochs), "--cached_features", "true"] + shlex.split(args.linear_args)
    else:
        warmup = min(5, args.finetune_epochs // 5)
        flags += ["--epochs", str(args.finetune_epochs), "--warmup_epochs", str(warmup)] \
            + shlex.split(args.finetune_args)
    return launcher + [str(ROOT / SCRIPTS[name])] + flags


def run_one(name, weights, init, args):
    """One evaluation of one init, as its own process; returns its headline top-1."""
    out = os.path.join(args.output_dir, init, name)
    cmd = command(name, weights, out, args)
    print(" ".join(shlex.quote(c) for c in cmd), flush=True)
    rc = subprocess.run(cmd).returncode  # in our working directory: relative paths hold
    if rc != 0:
        raise ChildProcessError(f"{SCRIPTS[name]} ({init}) stopped with exit code {rc}; its "
                                "message is above")
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    if name == "knn":
        return res["knn"].get(str(args.knn_k), next(iter(res["knn"].values())))[0]
    if name == "linear":
        return res["test_acc"] if res["test_acc"] is not None else res["best_acc"]
    return res["test_acc"]


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
    check_args(args)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    resolve_model_flags(args)
    args.output_dir = args.output_dir or evaluation.default_output_dir("eval_compare", args)
    print(f"Output folder: {args.output_dir}")
    results = {name: {} for name in args.evals}
    for init, weights in (("pretrained", args.pretrained_weights), ("random_init", "")):
        for name in args.evals:
            print(f"============ {name}: {init} ============", flush=True)
            results[name][init] = run_one(name, weights, init, args)
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
    return results


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.run(lambda: eval_compare(args))
