"""The flags the evaluation scripts share (eval_knn.py, eval_linear.py, finetune.py,
eval_compare.py, visualize_attention.py), declared once here so that no script imports another:

    get_args_parser()        parent parser of the flags they share, used through parents=[...]:
                             model_parser() + features_parser() + data_parser() + run_parser()
    add_eval_split_arg(parser)   --eval_split, also train_ssl.py's (its k-NN check)
    check_common_args(args)  --dataset given or inferred from --data_path (never ignored), the
                             norm statistics, workers and batch size, --precision / --use_fp16

The rest of what they share: core/model_flags.py (checkpoint -> backbone), core/eval_data.py
(the labelled splits), core/features.py, core/knn.py, core/eval_runs.py (output folder, resume
guard). Errors are ordinary exceptions (ValueError, FileNotFoundError) with a one-line message;
each script's entry point prints them (core/cli.py).
"""
import argparse

from core import amp
from core.logger import bool_flag
from data import DATASETS, resolve_dataset
from data.datasets import EVAL_SPLITS
from data.loaders import add_data_args
from data.normalization import add_norm_args, check_norm_args
from models import ARCHS


# ============ the shared flags ============

def avgpool_type(s):
    """DINO's bool flag (false -> 0, true -> 2: CLS and patch mean) or iBOT's 0 / 1 / 2."""
    if s.lower() in {"false", "off", "no"}:
        return 0
    if s.lower() in {"true", "on", "yes"}:
        return 2
    if s in {"0", "1", "2"}:
        return int(s)
    raise argparse.ArgumentTypeError("use 0 (CLS), 1 (patch mean), 2 (both), or false / true")


def model_parser(image_size=True):
    """--pretrained_weights --checkpoint_key --arch --patch_size --embed_dim --depth --num_heads,
    and unless image_size=False
    (visualize_attention.py has its own --image_size H W) --image_size --cifar_stem."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("Model")
    group.add_argument("--pretrained_weights", default="", type=str,
                       help="Weights to evaluate: a train_ssl.py checkpoint, an official DINO/iBOT "
                            "checkpoint or released backbone weights; empty: random init (the "
                            "baseline every number should be read against).")
    group.add_argument("--checkpoint_key", default="teacher", type=str,
                       help='Key to use in the checkpoint (example: "teacher"); a checkpoint '
                            "without it (SimCLR, rotation) falls back to its one network.")
    group.add_argument("--arch", default=None, type=str, choices=ARCHS,
                       help="Architecture (default: from the checkpoint's args or the shape of its "
                            "weights, else vit_small).")
    group.add_argument("--patch_size", default=None, type=int,
                       help="ViT patch size (default: from the checkpoint's args or its patch "
                            "embedding, else 16).")
    group.add_argument("--embed_dim", default=None, type=int,
                       help="ViT width instead of --arch's (default: from the checkpoint's args "
                            "or the width of its weights, else the arch's own).")
    group.add_argument("--depth", default=None, type=int,
                       help="ViT blocks instead of --arch's (default: from the checkpoint's args "
                            "or its number of blocks, else the arch's own).")
    group.add_argument("--num_heads", default=None, type=int,
                       help="ViT attention heads instead of --arch's (default: from the "
                            "checkpoint's args; bare weights do not show them: the fewest heads "
                            "of at most 64 channels each, as every DINO size; else the arch's own).")
    if image_size:
        group.add_argument("--image_size", default=None, type=int,
                           help="Input resolution (default: the checkpoint's training crop, else "
                                "the dataset's native size).")
        group.add_argument("--cifar_stem", default=None, type=bool_flag,
                           help="ResNet CIFAR stem (default: from the checkpoint, else true at "
                                "64px and below).")
    return parser


def features_parser():
    """--n_last_blocks --avgpool_patchtokens: which ViT tokens make the evaluation feature."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("Features (ViT; a ResNet's are its pooled map)")
    group.add_argument("--n_last_blocks", default=1, type=int,
                       help="Concatenate the CLS tokens of the last n blocks (DINO's linear "
                            "probe: 4 for ViT-S, 1 for ViT-B; k-NN: 1).")
    group.add_argument("--avgpool_patchtokens", default=0, type=avgpool_type,
                       help="0 (false) = CLS tokens only, 1 = mean of the last block's patch "
                            "tokens, 2 (true) = both concatenated (iBOT's 0/1/2, DINO's false/true).")
    return parser


def add_eval_split_arg(parser):
    """--eval_split, shared with train_ssl.py's k-NN check."""
    parser.add_argument("--eval_split", default="auto", type=str, choices=EVAL_SPLITS,
                        help="The split the reported accuracy is measured on, when the dataset "
                             "has both val/ and test/: auto takes test/ (and selects models on "
                             "val/), val or test name the folder. With only val/ (ImageNet's "
                             "layout, DINO's convention) or only test/, auto scores that one. "
                             "Every printed and logged number names its split "
                             "(default: %(default)s).")


def data_parser(train_split=False):
    """--dataset --data_path --eval_split --output_dir, and --norm_stats --norm_mean --norm_std
    (data/normalization.py: by default the statistics the weights were trained with); with
    train_split=True also --train_split (the scripts that train a classifier or k-NN on it)."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("Data and outputs")
    group.add_argument("--dataset", default=None, type=str, choices=sorted(DATASETS),
                       help="Dataset name (default: inferred from --data_path: a folder with "
                            "train/ is imagefolder, train/images.npy is npy, torchvision's CIFAR / "
                            "STL-10 files name theirs; without --data_path: digits, embedded).")
    group.add_argument("--data_path", default="", type=str, help="Dataset root.")
    add_eval_split_arg(group)
    if train_split:
        group.add_argument("--train_split", default="train", type=str,
                           help="The split the probe, the fine-tuning or the k-NN memory bank "
                                "trains on: train, or another split of an npy or imagefolder "
                                "dataset by name, e.g. probe (<data_path>/probe/images.npy + "
                                "labels.npy, probe_images.npy + probe_labels.npy, or the class "
                                "folders of <data_path>/probe/); --val_split holds images out "
                                "of it.")
    group.add_argument("--output_dir", default=None, type=str,
                       help="Folder for logs, checkpoints and results.json (default: "
                            "out/<script>/<weights folder>_<weights file>_<dataset>, or "
                            "random_init_<arch>_<dataset>; eval_knn.py writes nothing without it).")
    add_norm_args(parser, evaluation=True)  # --norm_stats --norm_mean --norm_std
    return parser


def run_parser():
    """--batch_size_per_gpu --num_workers --seed --precision --use_fp16 --dist_url --cpu
    --data_backend --data_memory_gb."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("Run")
    group.add_argument("--batch_size_per_gpu", default=128, type=int, help="Per-GPU batch-size.")
    group.add_argument("--num_workers", default=10, type=int, help="Data loading workers.")
    group.add_argument("--seed", default=0, type=int,
                       help="Random seed (held-out split, shuffling, few-shot episodes).")
    amp.add_precision_args(group)
    group.add_argument("--dist_url", default="env://", type=str,
                       help="url used to set up distributed training (torchrun sets the rest).")
    group.add_argument("--cpu", default=False, type=bool_flag, nargs="?", const=True,
                       help="Run on CPU even if CUDA is there (`--cpu` alone: true).")
    add_data_args(parser)  # --data_backend {tensor,pil}, --data_memory_gb, as train_ssl.py
    return parser


def get_args_parser(add_help=False):
    """Every flag eval_knn.py, eval_linear.py and finetune.py share."""
    return argparse.ArgumentParser(add_help=add_help, parents=[
        model_parser(), features_parser(), data_parser(train_split=True), run_parser()])


def check_common_args(args):
    """Before anything starts: --dataset as given or inferred from --data_path (a given path is
    never ignored), and --precision / --use_fp16 not contradicting each other."""
    args.dataset = resolve_dataset(args.dataset, args.data_path)
    if hasattr(args, "norm_stats"):
        check_norm_args(args)  # --norm_mean / --norm_std: both or neither, 3 values
    for name, low in (("num_workers", 0), ("batch_size_per_gpu", 1)):
        if getattr(args, name, low) < low:
            raise ValueError(f"--{name} {getattr(args, name)} must be >= {low}")
    if getattr(args, "precision", None) is not None and getattr(args, "use_fp16", None) is not None:
        # the device is not known yet; resolve_precision sets the final value after dist init
        amp.resolve_precision(argparse.Namespace(precision=args.precision, use_fp16=args.use_fp16), "cuda")
