"""Distributed setup: torchrun env vars, then SLURM, then a single process.

Mirrors facebookresearch/dino utils.init_distributed_mode, with three changes: it falls back to
gloo on CPU (the official code refuses to run without a GPU); a single process still gets a
(world size 1) process group, so code that all-reduces (DINO's centre) runs unchanged; and on
CUDA the group serves CPU tensors too ("cpu:gloo,cuda:nccl": NCCL alone serves CUDA tensors
only, and a CPU all-reduce would fail with "No backend type associated with device type cpu").
--dist_backend gloo lets several processes share one GPU (NCCL refuses two ranks on one
device), so DDP, SyncBatchNorm and SimCLR's gathered negatives can be checked on one GPU.
"""
import builtins
import ctypes
import datetime
import os
import random
import signal
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_with_launcher():
    """Under torchrun, die with the launcher: a launcher killed with SIGKILL cannot stop its
    workers, which would train on as orphans and write checkpoints while a restarted job
    trains the same epochs. Linux's prctl(PR_SET_PDEATHSIG) has the kernel send SIGKILL to this
    process when its parent (torchrun's agent) dies. Elsewhere a no-op. A launcher that died
    before the call (while this process was still importing) is caught by looking at the
    parent: no longer torchrun's agent."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    pr_set_pdeathsig = 1  # from <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    # The launcher may have died before the call (while this process imported torch): this
    # process then belongs to init or a subreaper, which the death signal does not cover.
    if not _parent_is_launcher():
        os._exit(1)


def _parent_is_launcher():
    """Whether the parent process is torchrun's agent (`torchrun` or `python -m
    torch.distributed.run`), read from /proc; True where /proc cannot tell."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        return any(a == b"torch.distributed.run" or os.path.basename(a) == b"torchrun"
                   for a in argv[:3])
    except OSError:
        return os.getppid() != 1


DIST_BACKENDS = ("nccl", "gloo")


def add_dist_args(parser):
    """--dist_backend, for every script that calls init_distributed_mode."""
    parser.add_argument("--dist_backend", default=None, choices=DIST_BACKENDS,
                        help="Collective backend: nccl (default on CUDA, with gloo beside it for "
                             "CPU tensors) or gloo (the default on CPU; on CUDA it lets several "
                             "processes share one GPU, e.g. torchrun --nproc_per_node=2 on a "
                             "one-GPU machine).")


def process_group_backend(device_type, requested=None):
    """The backend string for init_process_group on `device_type` ("cpu" or "cuda"), from
    --dist_backend (None: nccl on CUDA, gloo on CPU). On CUDA with nccl, CPU tensors go to gloo:
    "cpu:gloo,cuda:nccl". gloo serves both CPU and CUDA tensors."""
    if requested not in (None,) + DIST_BACKENDS:
        raise ValueError(f"--dist_backend {requested} is not supported; use nccl or gloo")
    if device_type != "cuda":
        if requested == "nccl":
            raise ValueError("--dist_backend nccl needs CUDA, and this run is on the CPU; use "
                             "--dist_backend gloo (the default on CPU)")
        return "gloo"
    if requested == "gloo":
        return "gloo"
    return "cpu:gloo,cuda:nccl"


def local_gpu(local_rank, backend):
    """The GPU of the process with this node-local rank. With more processes than GPUs, gloo
    lets them share the GPUs (local_rank % count); NCCL refuses two ranks on one device, so that
    is a clear error here rather than NCCL's "Duplicate GPU detected" later."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if "nccl" in backend:
        raise ValueError(f"process {local_rank} of this node has no GPU of its own ({count} "
                         "visible) and NCCL cannot share one; start at most one process per "
                         "GPU, or pass --dist_backend gloo to let processes share the GPUs")
    return local_rank % count


_ONE_OF_SEVERAL = False  # set when this process is one rank of several (see cli.run)


def one_of_several_ranks():
    """Whether init_distributed_mode made this process one rank of several (world size > 1)."""
    return _ONE_OF_SEVERAL


def init_distributed_mode(args):
    """Sets args.rank, args.world_size, args.gpu, args.device, args.distributed; reads
    args.dist_url, args.cpu and args.dist_backend (each optional)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        exit_with_launcher()
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        # one task per GPU, launched by srun (slurm/*.sh export MASTER_ADDR / MASTER_PORT)
        args.rank = int(os.environ["SLURM_PROCID"])
        args.world_size = int(os.environ["SLURM_NTASKS"])
        args.gpu = int(os.environ.get("SLURM_LOCALID", 0))
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    else:  # one process: still build a group so collectives work everywhere
        args.rank, args.world_size, args.gpu = 0, 1, 0
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    use_cuda = torch.cuda.is_available() and not getattr(args, "cpu", False)
    backend = process_group_backend("cuda" if use_cuda else "cpu",
                                    getattr(args, "dist_backend", None))
    device_id = None
    if use_cuda:
        args.gpu = local_gpu(args.gpu, backend)
        torch.cuda.set_device(args.gpu)
        args.device = torch.device("cuda", args.gpu)
        if "nccl" in backend:
            device_id = args.device
    else:
        args.device = torch.device("cpu")
    dist_url = getattr(args, "dist_url", "env://")
    # device_id binds the group to this rank's GPU (NCCL connects at once, and barriers and
    # object collectives know the device); CPU tensors still go to the group's gloo half.
    # (With gloo alone, which copies CUDA tensors through the host, nothing is bound.)
    dist.init_process_group(backend, init_method=dist_url, world_size=args.world_size,
                            rank=args.rank, timeout=datetime.timedelta(minutes=30),
                            device_id=device_id)
    args.distributed = args.world_size > 1
    global _ONE_OF_SEVERAL
    _ONE_OF_SEVERAL = args.distributed and dist.is_initialized()  # (not a test's fake group)
    print(f"| distributed init (rank {args.rank}/{args.world_size}, {backend}, {args.device})",
          flush=True)
    setup_for_distributed(args.rank == 0)


def setup_for_distributed(is_master):
    """Silence print() on non-master ranks; print(..., force=True) still prints."""
    builtin_print = builtins.print

    def print_(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print_


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def cleanup():
    if is_dist():
        dist.destroy_process_group()


def fix_random_seeds(seed=0):
    """Same seed on every rank, as DINO; DistributedSampler splits the data."""
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)
    random.seed(seed)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's
    slice. Each rank's loss uses every rank's embeddings, so the gradient for an embedding is the
    sum over all ranks' losses; DDP then averages parameter gradients over ranks, which gives
    exactly the single-process gradient of the mean loss on the global batch. (Returning
    grads[rank] without the all-reduce, as some SimCLR ports do, scales gradients by 1/W.)"""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[dist.get_rank()]


def all_gather_with_grad(x):
    """(B, D) on each rank -> (W*B, D), rank-major, differentiable."""
    if get_world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), 0)


@torch.no_grad()
def all_gather_nograd(x):
    if get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)

