"""Pretrained versus random init, side by side, in one command: k-NN, linear and MLP probes, a
probe of every layer and a ladder of fine-tuning variants (head only, the last K blocks + head,
all layers), each for one checkpoint and for the same architecture at random init, in one
Markdown table (compare.md), its JSON (compare.json), one figure (compare.png) and TensorBoard
runs (what the SimCLR and RotNet recipes tabulated by hand).

    python eval_compare.py --pretrained_weights out/rotation/checkpoint.pth --dataset digits \
        --linear_epochs 30 --finetune_epochs 10 --output_dir out/compare
The whole ladder (the RotNet ViT recipe's table):
    python eval_compare.py --pretrained_weights out/rotation/checkpoint.pth --dataset digits \
        --evals all --finetune_variants head last1 last2 all --output_dir out/ladder
    python eval_compare.py --nproc_per_node 4 --pretrained_weights out/dino/checkpoint.pth \
        --dataset cifar10 --data_path /path/to/cifar10 --output_dir out/compare_cifar \
        --finetune_args "--val_split 5000 --layer_decay 0.75"

Each evaluation is the script itself (eval_knn.py, eval_linear.py, finetune.py), started as its
own process (under torchrun with --nproc_per_node > 1) twice with the same flags but
--pretrained_weights: the model flags (arch, ViT shape, patch size, stem, resolution) are read
once from the checkpoint so both runs build the same network. Each run writes results.json,
which this script collects. The flags given here (--num_workers, --batch_size_per_gpu, ...)
go to every run; extra flags go through --knn_args / --linear_args (every eval_linear.py run:
linear, mlp, probe_layers) / --mlp_args / --finetune_args, which come last and so override.
The probes run on cached features unless told otherwise. --knn_votes weighted majority gives
one k-NN row per vote (eval_knn.py --knn_vote); --train_split probe trains every run on that
split.
Per-run outputs and logs: <output_dir>/{pretrained,random_init}/<evaluation>/ (finetune_head,
finetune_last1, ... for the variants; finetune for all layers); `tensorboard --logdir
<output_dir>` shows both inits side by side.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from core import cli, eval_args, eval_runs, model_flags
from core.knn import KNN_VOTES
from core.checkpoint import extract_backbone_state, load_file
from data import dataset_info
from models import VIT_SHAPE

ROOT = Path(__file__).resolve().parent
EVALS = {"knn": "eval_knn.py", "linear": "eval_linear.py", "mlp": "eval_linear.py",
         "probe_layers": "eval_linear.py", "finetune": "finetune.py"}


def finetune_variant(s):
    """head | last<K> | all: what fine-tuning trains (finetune.py --unfreeze_last_blocks 0, K, -1)."""
    if s in ("head", "all") or re.fullmatch(r"last[1-9]\d*", s):
        return s
    raise argparse.ArgumentTypeError(f"'{s}' is not head, last<K> (e.g. last2) or all")


def unfreeze_last_blocks(variant):
    """finetune.py's --unfreeze_last_blocks of a variant: head 0, last<K> K, all -1."""
    return {"head": 0, "all": -1}[variant] if variant in ("head", "all") else int(variant[4:])


def available_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def get_args_parser():
    parser = cli.ArgumentParser("Pretrained vs random init", parents=[
        eval_args.model_parser(), eval_args.data_parser(train_split=True),
        eval_args.run_parser()])
    # one value for every run, sized to this machine unless given
    parser.set_defaults(num_workers=None)
    for action in parser._actions:
        if action.dest == "num_workers":
            action.help = ("Data loading workers of every run (no need to repeat it in the "
                           "*_args) (default: min(10, the CPU cores per process)).")
    group = parser.add_argument_group("Comparison")
    group.add_argument("--evals", default=["knn", "linear", "finetune"], nargs="+",
                       choices=list(EVALS) + ["all"],
                       help="Which evaluations to run: knn, linear (probe), mlp (probe with "
                            "--mlp_dims), probe_layers (a linear probe of every ViT block / "
                            "ResNet stage), finetune (one run per --finetune_variants); all: "
                            "every one.")
    group.add_argument("--finetune_variants", default=["all"], nargs="+", type=finetune_variant,
                       help="The fine-tuning ladder: head (head only), last<K> (the last K "
                            "blocks / stages + head, e.g. last1 last2), all (every layer).")
    group.add_argument("--knn_k", default=20, type=int, help="k of the k-NN row (DINO reports 20).")
    group.add_argument("--knn_votes", default=["weighted"], nargs="+", choices=KNN_VOTES,
                       help="One k-NN row per vote (eval_knn.py --knn_vote): weighted (DINO's "
                            "exp(cosine / T)), majority (one vote per neighbour, as "
                            "scikit-learn's KNeighborsClassifier). --knn_args \"--knn_metric "
                            "euclidean\" changes the distance of every row.")
    group.add_argument("--mlp_dims", default=[512, 256], type=int, nargs="+",
                       help="Hidden widths of the MLP probe.")
    group.add_argument("--linear_epochs", default=100, type=int,
                       help="Epochs of the linear, MLP and per-layer probes.")
    group.add_argument("--finetune_epochs", default=100, type=int,
                       help="Epochs of each fine-tuning run.")
    group.add_argument("--knn_args", default="", type=str,
                       help='Extra eval_knn.py flags, e.g. "--temperature 0.1".')
    group.add_argument("--linear_args", default="", type=str,
                       help='Extra flags of every eval_linear.py run (linear, mlp, probe_layers), '
                            'e.g. "--lr 0.1 --cached_features false".')
    group.add_argument("--mlp_args", default="", type=str,
                       help='Extra eval_linear.py flags of the MLP probe only, after --linear_args.')
    group.add_argument("--finetune_args", default="", type=str,
                       help='Extra flags of every finetune.py run, e.g. "--layer_decay 0.75 '
                            '--val_split 5000".')
    group.add_argument("--nproc_per_node", default=1, type=int,
                       help="Processes (GPUs) per evaluation; > 1 starts each one with torchrun.")
    return parser


def check_args(args):
    if args.num_workers is None:  # one value for every run, sized to this machine
        args.num_workers = min(10, max(available_cpus() // max(args.nproc_per_node, 1), 1))
    eval_args.check_common_args(args)
    if not args.pretrained_weights:
        raise ValueError("eval_compare.py needs --pretrained_weights (the checkpoint to compare "
                         "with its own architecture at random init)")
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        raise ValueError("eval_compare.py starts each evaluation itself: run it with python (one "
                         "process), and --nproc_per_node N for N GPUs per evaluation")
    if args.nproc_per_node < 1:
        raise ValueError(f"--nproc_per_node {args.nproc_per_node} starts nothing; use >= 1")
    if "all" in args.evals:
        args.evals = list(EVALS)
    args.evals = list(dict.fromkeys(args.evals))  # each once, in the order given
    args.finetune_variants = list(dict.fromkeys(args.finetune_variants))


def resolve_model_flags(args):
    """Fill arch / ViT shape / patch_size / cifar_stem / image_size and the normalisation
    statistics from the checkpoint, so that the random-init run builds exactly the same network
    and reads the same inputs (and a checkpoint that does not fit is refused before any run
    starts); a variant deeper than the network is refused. Returns the depth: ViT blocks, or
    ResNet stages (4)."""
    backbone, _ = model_flags.load_backbone(
        args, default_image_size=dataset_info(args.dataset, args.data_path).image_size)
    depth = len(backbone.blocks) if hasattr(backbone, "blocks") else 4
    for v in args.finetune_variants if "finetune" in args.evals else ():
        if v.startswith("last") and int(v[4:]) > depth:
            raise ValueError(f"--finetune_variants {v} exceeds the {depth} "
                             f"{'blocks' if args.arch.startswith('vit') else 'stages'} of "
                             f"{args.arch}; use last1..last{depth}")
    return depth


def weights_source(args):
    """Which network of the checkpoint the runs evaluate, as load_pretrained_weights picks it:
    "key 'teacher'" for DINO / iBOT, "key 'model'" for SimCLR / rotation (no teacher), ..."""
    _, desc = extract_backbone_state(load_file(args.pretrained_weights, mmap=True),
                                     args.checkpoint_key)
    return desc


def runs(args, depth):
    """[(name, script, its own flags)] in the table's order: one per evaluation, one per
    fine-tuning variant; name is the run's folder and its key in compare.json. depth: the
    ViT's blocks, for the probes' --n_last_blocks (eval_linear.py's 4, or all of fewer)."""
    epochs = ["--epochs", str(args.linear_epochs), "--cached_features", "true"]
    if args.arch.startswith("vit") and depth < 4:
        epochs += ["--n_last_blocks", str(depth)]
    linear = shlex.split(args.linear_args)
    out = []
    for ev in args.evals:
        if ev == "knn":
            for vote in dict.fromkeys(args.knn_votes):
                out.append(("knn" if vote == "weighted" else f"knn_{vote}", EVALS[ev],
                            ["--nb_knn", str(args.knn_k), "--knn_vote", vote]
                            + shlex.split(args.knn_args)))
            continue
        elif ev == "linear":
            flags = epochs + linear
        elif ev == "mlp":
            flags = epochs + ["--head", "mlp", "--mlp_dims", *map(str, args.mlp_dims)] \
                + linear + shlex.split(args.mlp_args)
        elif ev == "probe_layers":
            flags = epochs + ["--probe_layers", "true"] + linear
        else:
            warmup = str(min(5, args.finetune_epochs // 5))
            for v in args.finetune_variants:
                out.append(("finetune" if v == "all" else f"finetune_{v}", EVALS[ev],
                            ["--epochs", str(args.finetune_epochs), "--warmup_epochs", warmup,
                             "--unfreeze_last_blocks", str(unfreeze_last_blocks(v))]
                            + shlex.split(args.finetune_args)))
            continue
        out.append((ev, EVALS[ev], flags))
    return out


def command(script, flags, weights, out, args):
    """The command line of one evaluation of one init."""
    launcher = [sys.executable] if args.nproc_per_node == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc_per_node}"]
    common = ["--pretrained_weights", weights, "--checkpoint_key", args.checkpoint_key,
              "--arch", args.arch, "--patch_size", str(args.patch_size),
              "--image_size", str(args.image_size), "--cifar_stem", str(args.cifar_stem).lower(),
              "--dataset", args.dataset, "--data_path", args.data_path, "--output_dir", out,
              "--batch_size_per_gpu", str(args.batch_size_per_gpu),
              "--num_workers", str(args.num_workers), "--seed", str(args.seed),
              "--data_backend", args.data_backend, "--data_memory_gb", str(args.data_memory_gb),
              "--eval_split", args.eval_split, "--train_split", args.train_split]
    if getattr(args, "norm_mean", None) is not None:  # the checkpoint's, read by load_backbone
        common += ["--norm_mean", *map(str, args.norm_mean), "--norm_std", *map(str, args.norm_std)]
    for name in VIT_SHAPE:  # the ViT shape read from the checkpoint, for both inits
        if getattr(args, name, None) is not None:
            common += [f"--{name}", str(getattr(args, name))]
    if args.precision is not None:
        common += ["--precision", args.precision]
    if args.use_fp16 is not None:
        common += ["--use_fp16", str(args.use_fp16).lower()]
    if args.cpu:
        common += ["--cpu", "true"]
    return launcher + [str(ROOT / script)] + common + flags


def run_one(name, script, flags, weights, init, args):
    """One evaluation of one init, as its own process; returns {row key: (top-1, the split it
    was measured on, a note for the row's label)}: one row, or one per layer for probe_layers
    (probe_<layer>). The note: how a k-NN voted ("majority vote", "euclidean"), else ""."""
    out = os.path.join(args.output_dir, init, name)
    cmd = command(script, flags, weights, out, args)
    print(" ".join(shlex.quote(c) for c in cmd), flush=True)
    rc = subprocess.run(cmd).returncode  # in our working directory: relative paths hold
    if rc != 0:
        raise ChildProcessError(f"{script} ({name}, {init}) stopped with exit code {rc}; its "
                                "message is above")
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)

    def test_top1(r):  # the held-out test number when the run has one, else its best
        return r["test_acc"] if r.get("test_acc") is not None else r["best_acc"]
    if name.startswith("knn"):
        note = ", ".join(x for x in ("majority vote" if res.get("vote") == "majority" else "",
                                     "euclidean" if res.get("metric") == "euclidean" else "") if x)
        return {name: (res["knn"].get(str(args.knn_k), next(iter(res["knn"].values())))[0],
                       res["split"], note)}
    split = res["splits"]["test_acc"] or res["splits"].get("best_acc")
    if name == "probe_layers":
        return {f"probe_{x['name']}": (test_top1(x), split, "") for x in res["layers"]}
    if name.startswith("finetune"):
        return {name: (res["test_acc"], split, "")}
    return {name: (test_top1(res), split, "")}


def row_label(key, split, args, note=""):
    unit = "block" if args.arch.startswith("vit") else "stage"
    le = f"{args.linear_epochs} epoch{'s' if args.linear_epochs > 1 else ''}"
    fe = f"{args.finetune_epochs} epoch{'s' if args.finetune_epochs > 1 else ''}"
    if key.startswith("knn"):
        return f"{args.knn_k}-NN top-1{', ' + note if note else ''} ({split})"
    if key == "linear":
        return f"linear probe top-1 ({split}, {le})"
    if key == "mlp":
        return f"MLP probe {'-'.join(map(str, args.mlp_dims))} top-1 ({split}, {le})"
    if key.startswith("probe_"):
        return f"linear probe of {key[len('probe_'):]} ({split}, {le})"
    what = {"finetune": "all layers", "finetune_head": "head only"}.get(key)
    if what is None:
        k = int(key[len("finetune_last"):])
        what = f"last {k} {unit}{'s' if k > 1 else ''} + head"
    return f"fine-tuning, {what} ({split}, best-on-val of {fe})"


def arch_name(args):
    """--arch, with the ViT shape flags that change it: "vit_small (embed_dim 512, depth 8)"."""
    shape = ", ".join(f"{n} {getattr(args, n)}" for n in VIT_SHAPE
                      if getattr(args, n, None) is not None)
    return f"{args.arch} ({shape})" if shape else args.arch


def markdown_table(rows, args, source):
    lines = [f"# Pretrained vs random init: {arch_name(args)} on {args.dataset}", "",
             f"Checkpoint: `{args.pretrained_weights}` ({source}); "
             f"{args.image_size}px" + (f", patch {args.patch_size}" if args.arch.startswith("vit") else "")
             + f". Runs and logs under `{args.output_dir}/`.", "",
             "| evaluation | pretrained | random init | difference |", "|---|---|---|---|"]
    for r in rows.values():
        p, q = r["pretrained"], r["random_init"]
        lines.append(f"| {r['label']} | {p:.2f} | {q:.2f} | {p - q:+.2f} |")
    return "\n".join(lines) + "\n"


def save_comparison_figure(rows, path, title):
    """compare.png: one horizontal pair of bars (pretrained, random init) per evaluation, the
    value at each bar's end; with per-layer probes, a second panel with top-1 against depth."""
    from core.report import new_figure, save_figure
    main = [(k, r) for k, r in rows.items() if not k.startswith("probe_")]
    layers = [(k[len("probe_"):], r) for k, r in rows.items() if k.startswith("probe_")]
    colours = {"pretrained": "tab:blue", "random_init": "tab:gray"}
    names = {"pretrained": "pretrained", "random_init": "random init"}
    height = max(2.6, 0.62 * len(main) + 1.4)
    fig = new_figure(13.0 if layers and main else 8.0, max(height, 4.0 if layers else 0))
    grid = fig.add_gridspec(1, 2, width_ratios=[1.35, 1]) if layers and main else None
    if main:
        ax = fig.add_subplot(grid[0, 0] if grid is not None else 111)
        y = list(range(len(main)))[::-1]  # the table's first row on top
        h = 0.38
        for j, init in enumerate(("pretrained", "random_init")):
            pos = [v + (h / 2 if j == 0 else -h / 2) for v in y]
            bars = ax.barh(pos, [r[init] for _, r in main], height=h, color=colours[init],
                           label=names[init])
            ax.bar_label(bars, fmt="%.1f", padding=3, fontsize=9)
        ax.set_yticks(y, [r["label"].split(" (")[0] for _, r in main], fontsize=10)
        ax.set_xlim(0, 112)
        ax.set_xlabel("top-1 on the scored split (%)")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="best", fontsize=9)
        ax.set_title("each evaluation", fontsize=11)
    if layers:
        ax = fig.add_subplot(grid[0, 1] if grid is not None else 111)
        x = range(len(layers))
        for init, dy, va in (("pretrained", 7, "bottom"), ("random_init", -7, "top")):
            vals = [r[init] for _, r in layers]
            ax.plot(x, vals, marker="o", color=colours[init], label=names[init])
            for i, v in zip(x, vals):  # pretrained above its point, random init below
                ax.annotate(f"{v:.1f}", (i, v), textcoords="offset points", xytext=(0, dy),
                            ha="center", va=va, fontsize=8, color=colours[init])
        ax.set_xticks(list(x), [n for n, _ in layers], rotation=45 if len(layers) > 6 else 0,
                      fontsize=9)
        ax.set_ylim(0, 105)
        ax.margins(x=0.08)
        ax.set_xlabel("probed layer (input side first)")
        ax.set_ylabel("linear probe top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
        ax.set_title("a linear probe of every layer", fontsize=11)
    fig.suptitle(title, fontsize=12)
    save_figure(fig, path)
    return fig


def eval_compare(args):
    check_args(args)
    depth = resolve_model_flags(args)
    source = weights_source(args)
    args.output_dir = args.output_dir or eval_runs.default_output_dir("eval_compare", args)
    cli.print_args(args)  # every flag resolved (the checkpoint's model flags, the folder)
    print(f"Output folder: {args.output_dir} ({len(runs(args, depth))} evaluations, each for the "
          f"checkpoint ({source}) and at random init; {args.num_workers} data workers each)")
    found = {}  # init -> {row key: (top-1, split, note)}
    for init, weights in (("pretrained", args.pretrained_weights), ("random_init", "")):
        found[init] = {}
        for name, script, flags in runs(args, depth):
            print(f"============ {name}: {init} ============", flush=True)
            found[init].update(run_one(name, script, flags, weights, init, args))
    splits = {k: split for k, (_, split, _) in found["pretrained"].items()}
    notes = {k: note for k, (_, _, note) in found["pretrained"].items()}
    found = {init: {k: top1 for k, (top1, _, _) in rows.items()} for init, rows in found.items()}
    rows = {k: {"label": row_label(k, splits[k], args, notes[k]), "split": splits[k],
                "pretrained": found["pretrained"][k], "random_init": found["random_init"][k],
                "difference": found["pretrained"][k] - found["random_init"][k]}
            for k in found["pretrained"]}
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, args, source)
    print(table)
    with open(os.path.join(args.output_dir, "compare.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.output_dir, "compare.json"), "w") as f:
        json.dump(rows, f, indent=1)
    path = os.path.join(args.output_dir, "compare.png")
    save_comparison_figure(rows, path, f"{arch_name(args)} on {args.dataset}: pretrained "
                                       f"({source}) vs random init")
    print(f"Saved the table to {args.output_dir}/compare.md (.json) and the figure to {path}")
    from torch.utils.tensorboard import SummaryWriter
    for init in ("pretrained", "random_init"):  # one run per init: the bars side by side
        with SummaryWriter(os.path.join(args.output_dir, "tb", init)) as w:
            for k, r in rows.items():
                w.add_scalar(f"compare/{k}_top1", r[init], 0)
    return rows


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.run(lambda: eval_compare(args))
