"""The cost of one train_ssl.py checkpoint: seconds per write of checkpoint.pth as a mid-epoch
checkpoint (--checkpoint_every_iters / --checkpoint_every_minutes) writes it, and its size.

    python bench/checkpoint_write.py --method dino --arch vit_small --patch_size 16
    python bench/checkpoint_write.py --method dino --arch resnet50 --optimizer adamw
    python bench/checkpoint_write.py --method dino --arch vit_small --output_dir /scratch/$USER

The dict is train_ssl.checkpoint_dict itself: the method's networks (DINO: student and teacher
with their heads) and loss buffers, the optimizer's state after one step (AdamW: two moments
per parameter), every rank's random generators. The write is core/checkpoint.save_atomic:
torch.save to a temporary file, fsync, rename, fsync of the folder. One line per repetition,
e.g. `method=dino arch=vit_small/16 size_MB=... write_s=... gather_s=...`. Every train_ssl.py
flag of the method is accepted; networks stay on the CPU (where checkpoints are written from).
"""
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import train_ssl  # noqa: E402
from core import amp, cli, preempt  # noqa: E402
from core import dist as distu  # noqa: E402
from core.checkpoint import save_atomic  # noqa: E402
from core.optim import build_optimizer, get_params_groups  # noqa: E402
from data import dataset_info  # noqa: E402


def get_args_parser(method):
    parser = cli.ArgumentParser(
        "minissl checkpoint write cost", allow_abbrev=False, formatter_class=train_ssl.HelpFormatter,
        parents=[train_ssl.get_args_parser(method, add_help=False)])
    parser.add_argument("--repeats", default=3, type=int, help="Writes timed, one line each.")
    return parser


def main(argv=None):
    args = train_ssl.parse_args(argv, make_parser=get_args_parser)
    args.cpu, args.knn_eval = True, False
    with contextlib.redirect_stdout(io.StringIO()):
        distu.init_distributed_mode(args)
    info = dataset_info(args.dataset, args.data_path or None)
    train_ssl.resolve_input(args, info)  # input_size, cifar_stem: as train_ssl.py sets them
    model, _, _ = train_ssl.build_networks(args, niter_per_ep=1)
    optimizer = build_optimizer(args.optimizer, get_params_groups(model), args.device,
                                betas=args.adamw_betas)
    for p in model.parameters():  # one step with zero gradients: the optimizer state exists
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    scaler = amp.grad_scaler(args.precision, args.device)
    arch = f"{args.arch}/{args.patch_size}" if args.arch.startswith("vit") else args.arch
    with tempfile.TemporaryDirectory(dir=args.output_dir if os.path.isdir(args.output_dir) else None) as tmp:
        for _ in range(args.repeats):
            start = time.perf_counter()
            position = preempt.ResumableRun(args, []).position(0, 1)  # gathers the generators
            save_dict = train_ssl.checkpoint_dict(model, optimizer, scaler, args, position)
            gathered = time.perf_counter()
            save_atomic(save_dict, os.path.join(tmp, "checkpoint.pth"))
            done = time.perf_counter()
            size = os.path.getsize(os.path.join(tmp, "checkpoint.pth")) / 2**20
            print(f"method={args.method} arch={arch} optimizer={args.optimizer} size_MB={size:.0f} "
                  f"write_s={done - gathered:.2f} gather_s={gathered - start:.3f}", flush=True)
    distu.cleanup()


if __name__ == "__main__":
    cli.run(main)
