"""2 processes x B/2 on ONE device against 1 process x B: one fp32 training step (forward,
loss, backward) of the real model, through train_ssl.py's DDP wrapper and BatchNorm
synchronisation, over a gloo process group (NCCL refuses two ranks on one GPU). A check passes
when the mean of the ranks' losses and DDP's averaged gradients equal the single process's.

    ddp     rotation ViT-Tiny/4: no BatchNorm, no gather; DDP's gradient average alone
    syncbn  rotation ResNet-18: BatchNorm in the backbone (nn.SyncBatchNorm on CUDA,
            core/syncbn.AllReduceBatchNorm elsewhere: core/syncbn.sync_batchnorm decides)
    simclr  SimCLR ViT-Tiny/4: each rank's anchors against the negatives of both ranks
            (core/dist.all_gather_with_grad), BatchNorm in the projector

bench/gpu_suite.py runs these as its "2 ranks x B/2 vs 1 x B" rows: it computes the reference
(world size 1) in its own process with `reference`, then starts
    torchrun --standalone --nproc_per_node=2 bench/two_ranks.py --check ddp --device cuda \
        --ref <ref.pth> --out <result.json>
and reads the result. tests/test_dist.py checks the same on CPU, in more detail (two steps,
EMA teachers, centres, every method).

Tolerances, relative: the loss within 1e-4, the gradients within 1e-4 (all of them as one
vector) and 1e-3 (the worst single tensor, among tensors whose norm is above 1e-4 of the whole
gradient's: the bias right before a BatchNorm has an exact gradient of 0 and only rounding
noise on both sides). Both sides run the same fp32 arithmetic in another order (two half-batch
sums, a gloo all-reduce), TF32 off and cuDNN deterministic: on CPU the differences measured are
< 1e-6 on the loss and < 1e-5 on the gradients, while a missing synchronisation moves them by
1e-3 to 1 (tests/test_dist.py's figures).
"""
import argparse
import contextlib
import ctypes
import io
import json
import os
import signal
import sys
from pathlib import Path

if __name__ == "__main__" and "TORCHELASTIC_RUN_ID" in os.environ \
        and sys.platform.startswith("linux"):
    # under torchrun, die with the launcher from the first instant (PR_SET_PDEATHSIG), not only
    # once torch is imported: a launcher killed during the imports would leave this rank waiting
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from core.checkpoint import load_file  # noqa: E402  (the one safe torch.load)

CHECKS = {"ddp": ("rotation", "vit_tiny"), "syncbn": ("rotation", "resnet18"),
          "simclr": ("simclr", "vit_tiny")}
LOSS_RTOL, GRAD_RTOL, TENSOR_RTOL = 1e-4, 1e-4, 1e-3


def exact_fp32():
    """TF32 off and deterministic cuDNN kernels: both sides compute plain fp32."""
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True


def setup(check, device, tiny):
    """(args, batch) of the check: train_ssl.py's parse for one process on `device`, and the
    global batch B (the same on every rank: the method's transform on seeded random images)."""
    from bench import gpu_suite

    method, arch = CHECKS[check]
    size, batch_size = (gpu_suite.tiny_size(arch), 8) if tiny else (32, 64)
    args, info, transform = gpu_suite.bench_args(
        [*gpu_suite.small_flags(method, arch, size), "--precision", "fp32"], device)
    return args, gpu_suite.fixed_batch(args, info, transform, batch_size)


def rank_share(obj, rank, world_size):
    """This rank's part of a global batch, as DistributedSampler deals it (every
    world_size-th sample from `rank`), for every tensor of the views."""
    if torch.is_tensor(obj):
        return obj[rank::world_size]
    if isinstance(obj, (list, tuple)):
        return type(obj)(rank_share(o, rank, world_size) for o in obj)
    return obj


def one_step(args, views, rank=0, world_size=1):
    """loss (a float) and {name: gradient on the CPU} of one fp32 step of a fresh model (seed
    0), wrapped as train_ssl.py wraps it when world_size > 1."""
    import train_ssl
    from core.syncbn import sync_batchnorm

    torch.manual_seed(0)
    args.batch_size_per_gpu = len(views[0]) // world_size
    with contextlib.redirect_stdout(io.StringIO()):
        model, _, _ = train_ssl.build_networks(args, 1)
    model.train()
    ddp_model = model
    if world_size > 1:
        model = sync_batchnorm(model, args.device)
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.device.index] if args.device.type == "cuda" else None,
            **train_ssl.ddp_kwargs(buffers_in_sync=True))
    loss, _ = ddp_model(rank_share(views, rank, world_size), args.epochs - 1, 0)
    loss.backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters()
             if p.grad is not None}
    return loss.detach().double().cpu(), grads


def reference(check, device, tiny, path):
    """The 1 x B side, in the calling process (world size 1), saved to `path`; the caller's
    TF32 and cuDNN settings are restored afterwards."""
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    exact_fp32()
    try:
        args, (views, _) = setup(check, device, tiny)
        loss, grads = one_step(args, views)
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved[0]
        torch.backends.cudnn.conv.fp32_precision = saved[1]
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2:]
    torch.save({"loss": loss, "grads": grads}, path)


def compare(loss, grads, ref):
    """Relative errors of (mean loss of the ranks, averaged gradients) against the reference."""
    missing = sorted(set(ref["grads"]) ^ set(grads))
    if missing:
        raise ValueError(f"gradients of different parameters: {missing[:3]}")
    names = sorted(ref["grads"])
    diff = torch.cat([(grads[n] - ref["grads"][n]).flatten() for n in names])
    whole = torch.cat([ref["grads"][n].flatten() for n in names]).norm()
    tensor = max(((grads[n] - ref["grads"][n]).norm() / ref["grads"][n].norm()).item()
                 for n in names if ref["grads"][n].norm() > 1e-4 * whole)
    return {"loss_rel": abs((loss - ref["loss"]) / ref["loss"]).item(),
            "grad_rel": (diff.norm() / whole).item(), "worst_tensor_rel": tensor,
            "tensors": len(names)}


def ranks_main(argv=None):
    """Under torchrun: both ranks on the same device, a gloo group; rank 0 writes the result."""
    parser = argparse.ArgumentParser("two_ranks")
    parser.add_argument("--check", required=True, choices=sorted(CHECKS))
    parser.add_argument("--device", required=True, choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="The tiny CPU sizes.")
    parser.add_argument("--ref", required=True, help="The reference written by `reference`.")
    parser.add_argument("--out", required=True, help="The result, JSON (rank 0).")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from core import dist as distu

    distu.exit_with_launcher()  # a killed launcher takes this process with it
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cpu":
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(0)  # both ranks on the one GPU
    dist.init_process_group("gloo")
    exact_fp32()
    step_args, (views, _) = setup(args.check, args.device, args.tiny)
    step_args.rank, step_args.world_size, step_args.distributed = rank, world_size, True
    loss, grads = one_step(step_args, views, rank, world_size)
    mean_loss = loss.clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world_size
    if rank == 0:
        errors = compare(mean_loss, grads, load_file(args.ref))
        tmp = f"{args.out}.tmp"
        Path(tmp).write_text(json.dumps({**errors, "world_size": world_size,
                                         "backend": dist.get_backend(),
                                         "device": str(step_args.device)}))
        os.replace(tmp, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    ranks_main()
