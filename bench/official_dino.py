"""Side by side: this repository's DINO training step against facebookresearch/dino's own, in
one process, on the same batch, so that the ratio can be reproduced.

    git clone https://github.com/facebookresearch/dino ../dino
    python bench/official_dino.py --official_path ../dino --arch vit_tiny --patch_size 4 \
        --global_crops_size 32 --local_crops_size 16 --local_crops_number 6 --out_dim 4096 \
        --batch_size_per_gpu 64 --pairs 6

Nothing of the official repository is copied here: its main_dino.DINOLoss, utils
(MultiCropWrapper, get_params_groups, clip_gradients, cancel_gradients_last_layer,
cosine_scheduler) and vision_transformer (vit_*, DINOHead) are imported from --official_path,
and official_step below drives them in the order of the body of main_dino.train_one_epoch
(fp32, i.e. without its fp16 scaler; without its .cuda() and torch.cuda.synchronize(), which a
CPU cannot run). Ours is train_ssl.train_one_epoch itself. Both:
  - the same network: DINO's ViT and head with the flags given here. The official ViT is built
    with img_size = --global_crops_size, as ours (main_dino.py leaves it at 224 and interpolates
    a 56 x 56 position grid for every crop, a cost this comparison leaves out);
  - DINO's recipe (AdamW, clipping 3.0, drop path 0.1 in the student, teacher momentum 0.996,
    its schedules), run as the last epoch, so the frozen last layer is over;
  - one synthetic batch made by our MultiCropTransform from random images, fed to both.
Timing: --warmup steps of each, then --pairs pairs A B (A: ours, B: official) of --steps steps
each, interleaved so that a change of machine load hits both. One line per block with its wall
and CPU (process) seconds per step, then the medians and the ratio official / ours (> 1: ours is
faster). On CPU only: the official step cannot run without CUDA otherwise.
"""
import contextlib
import io
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import train_ssl  # noqa: E402
from bench import throughput  # noqa: E402
from core import cli, preempt  # noqa: E402
from core import dist as distu  # noqa: E402
from core.optim import lr_for_batch  # noqa: E402
from data import dataset_info  # noqa: E402
from methods import dino  # noqa: E402


def get_args_parser(method="dino"):
    parser = cli.ArgumentParser(
        "DINO step: minissl against facebookresearch/dino", allow_abbrev=False,
        formatter_class=train_ssl.HelpFormatter,
        parents=[train_ssl.get_args_parser("dino", add_help=False)])
    group = parser.add_argument_group("Benchmark")
    group.add_argument("--official_path", required=True, type=str,
                       help="A clone of https://github.com/facebookresearch/dino (the folder "
                            "with main_dino.py, utils.py and vision_transformer.py).")
    group.add_argument("--pairs", default=6, type=int,
                       help="Timed pairs of blocks: ours, then the official step.")
    group.add_argument("--steps", default=1, type=int, help="Training steps per block.")
    group.add_argument("--warmup", default=1, type=int,
                       help="Untimed steps of each first (allocator, lazy initialisation).")
    return parser


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--method" not in argv:
        argv = ["--method", "dino", *argv]
    args = train_ssl.parse_args(argv, make_parser=get_args_parser)
    if args.method != "dino":
        raise ValueError("this benchmark compares the DINO step; pass --method dino")
    if args.pairs < 1 or args.steps < 1 or args.warmup < 0:
        raise ValueError("need --pairs >= 1, --steps >= 1 and --warmup >= 0")
    if args.arch.startswith("resnet"):
        raise ValueError("the official comparison builds the official ViTs; pass --arch vit_*")
    missing = [f for f in ("main_dino.py", "utils.py", "vision_transformer.py")
               if not os.path.isfile(os.path.join(args.official_path, f))]
    if missing:
        raise ValueError(f"--official_path {args.official_path} has no {', '.join(missing)}; "
                         "clone https://github.com/facebookresearch/dino and pass its folder")
    args.cpu, args.knn_eval, args.tensorboard, args.num_workers = True, False, False, 0
    return args


def import_official(path):
    """(main_dino, utils, vision_transformer) of the official repository at `path`."""
    sys.path.insert(0, os.path.abspath(path))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # weight_norm's deprecation warning
            import main_dino
            import utils
            import vision_transformer
    finally:
        sys.path.pop(0)
    return main_dino, utils, vision_transformer


class Official:
    """The networks, loss, optimizer and schedules as main_dino.train_dino builds them."""

    def __init__(self, args, niter):
        main_dino, self.utils, vits = import_official(args.official_path)
        if args.arch not in ("vit_tiny", "vit_small", "vit_base"):
            raise ValueError(f"--arch {args.arch} is not one of the official ViTs; use "
                             "vit_tiny, vit_small or vit_base")
        student = vits.__dict__[args.arch](patch_size=args.patch_size,
                                           img_size=[args.global_crops_size],
                                           drop_path_rate=args.drop_path_rate)
        teacher = vits.__dict__[args.arch](patch_size=args.patch_size,
                                           img_size=[args.global_crops_size])
        dim = student.embed_dim
        with contextlib.redirect_stderr(io.StringIO()):
            self.student = self.utils.MultiCropWrapper(student, vits.DINOHead(
                dim, args.out_dim, use_bn=args.use_bn_in_head,
                norm_last_layer=args.norm_last_layer))
            self.teacher = self.utils.MultiCropWrapper(teacher, vits.DINOHead(
                dim, args.out_dim, args.use_bn_in_head))
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.loss = main_dino.DINOLoss(args.out_dim, args.local_crops_number + 2,
                                       args.warmup_teacher_temp, args.teacher_temp,
                                       args.warmup_teacher_temp_epochs, args.epochs)
        self.optimizer = torch.optim.AdamW(self.utils.get_params_groups(self.student))
        lr = lr_for_batch(args.lr, args.batch_size_per_gpu)
        self.lr = self.utils.cosine_scheduler(lr, args.min_lr, args.epochs, niter,
                                              warmup_epochs=args.warmup_epochs)
        self.wd = self.utils.cosine_scheduler(args.weight_decay, args.weight_decay_end,
                                              args.epochs, niter)
        self.momentum = self.utils.cosine_scheduler(args.momentum_teacher, 1, args.epochs, niter)
        self.clip, self.freeze_last_layer = args.clip_grad, args.freeze_last_layer

    def step(self, images, epoch, it):
        """One iteration of main_dino.train_one_epoch (fp32), on the CPU."""
        for i, param_group in enumerate(self.optimizer.param_groups):
            param_group["lr"] = self.lr[it]
            if i == 0:
                param_group["weight_decay"] = self.wd[it]
        teacher_output = self.teacher(images[:2])
        student_output = self.student(images)
        loss = self.loss(student_output, teacher_output, epoch)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"official step: loss {loss.item()}")
        self.optimizer.zero_grad()
        loss.backward()
        if self.clip:
            self.utils.clip_gradients(self.student, self.clip)
        self.utils.cancel_gradients_last_layer(epoch, self.student, self.freeze_last_layer)
        self.optimizer.step()
        with torch.no_grad():  # the official EMA, a loop over the parameters
            m = self.momentum[it]
            for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        return loss.item()  # the official MetricLogger reads it every step


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None):
    args = parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        distu.init_distributed_mode(args)  # a world-size-1 group: both all-reduce the centre
    info = dataset_info(args.dataset, args.data_path or None)
    train_ssl.resolve_input(args, info)  # input_size, cifar_stem: as train_ssl.py sets them
    transform = dino.build_transform(args, info)
    niter = 1 + args.warmup + args.pairs * args.steps
    batch = throughput.synthetic_batch(transform, args.batch_size_per_gpu,
                                       max(info.image_size, args.input_size), seed=args.seed)
    views = batch[0]
    epoch = args.epochs - 1  # the last epoch: the frozen last layer is over for both
    first_it = epoch * niter

    torch.manual_seed(args.seed)
    model, optimizer, scaler = throughput.build_training(args, niter)
    lr = np.full(args.epochs * niter, lr_for_batch(args.lr, args.batch_size_per_gpu))
    wd = np.full(args.epochs * niter, args.weight_decay)
    official = Official(args, niter)
    # the same starting weights (the layouts and names are the official ones)
    official.student.load_state_dict(model.student.state_dict())
    official.teacher.load_state_dict(model.teacher.state_dict())
    position = {"official": first_it}
    losses = {"official": []}

    t = train_ssl.Training(model, model, optimizer, scaler, lr, wd, args)

    def ours(n):
        with contextlib.redirect_stdout(io.StringIO()):  # train_one_epoch's progress lines
            train_ssl.train_one_epoch(t, epoch, preempt.ResumableRun(args, [batch] * n))

    def theirs(n):
        for _ in range(n):
            losses["official"].append(official.step(views, epoch, position["official"]))
            position["official"] += 1

    print(f"DINO step, {args.arch}/{args.patch_size}, 2x{args.global_crops_size} + "
          f"{args.local_crops_number}x{args.local_crops_size} crops, out_dim {args.out_dim}, "
          f"batch {args.batch_size_per_gpu}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}", flush=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the first step: the same function?
        first, _ = model(views, epoch, first_it)
    theirs(1)
    print(f"first loss from the same weights and batch: ours {first.item():.5f}, official "
          f"{losses['official'][0]:.5f} (drop path draws differ)", flush=True)
    if args.warmup:
        ours(args.warmup)
        theirs(args.warmup)
    times = {"ours": [], "official": []}
    for pair in range(args.pairs):
        for name, run in (("ours", ours), ("official", theirs)):
            wall, cpu = timed(lambda: run(args.steps))
            times[name].append((wall / args.steps, cpu / args.steps))
            print(f"pair {pair + 1} {name:8s} wall {wall / args.steps:.2f} s/step  "
                  f"cpu {cpu / args.steps:.2f} s/step", flush=True)
    med = {k: [statistics.median(t[i] for t in v) for i in (0, 1)] for k, v in times.items()}
    print(f"median s/step: ours wall {med['ours'][0]:.2f} cpu {med['ours'][1]:.2f}; official "
          f"wall {med['official'][0]:.2f} cpu {med['official'][1]:.2f}; ratio official/ours: "
          f"wall {med['official'][0] / med['ours'][0]:.2f}x, "
          f"cpu {med['official'][1] / med['ours'][1]:.2f}x; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    distu.cleanup()


if __name__ == "__main__":
    cli.run(main)
