"""Mixed precision in one place: the --precision flag (with DINO's --use_fp16 as its alias),
the autocast context, the GradScaler, and the one optimizer step every training script uses.

    add_precision_args(parser)          --precision {bf16,fp16,fp32}, --use_fp16 true/false
    resolve_precision(args, device)     -> "bf16" | "fp16" | "fp32" (also sets args.precision)
    autocast(precision, device)         context for the forward pass
    grad_scaler(precision, device)      GradScaler, enabled only for fp16
    backward_step(loss, optimizer, scaler, after_unscale=None)

The step body is the same for all three precisions: with bf16/fp32 the scaler is disabled and
scale/unscale_/step/update reduce to backward and optimizer.step().
"""
import contextlib
import os

import torch

from core.logger import bool_flag

PRECISIONS = ("bf16", "fp16", "fp32")


def add_precision_args(parser):
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="Autocast dtype of the forward pass on CUDA (default: bf16; fp16 adds "
                             "a GradScaler; fp32 is DINO's recommendation for small patches). "
                             "CPU always runs fp32 (an explicit bf16/fp16 says so in a note).")
    parser.add_argument("--use_fp16", default=None, type=bool_flag,
                        help="DINO's flag, kept as an alias: true means --precision fp16, false "
                             "means --precision fp32 (default: unset, i.e. --precision decides).")


def resolve_precision(args, device):
    """The precision this run uses, from --precision and its alias --use_fp16; CPU is fp32."""
    precision = getattr(args, "precision", None)
    use_fp16 = getattr(args, "use_fp16", None)
    alias = None if use_fp16 is None else ("fp16" if use_fp16 else "fp32")
    if precision is not None and alias is not None and precision != alias:
        raise ValueError(f"--precision {precision} contradicts --use_fp16 {str(use_fp16).lower()} "
                         f"(which means {alias}); give only one of the two flags")
    asked = precision or alias
    precision = asked or "bf16"
    if torch.device(device).type != "cuda":
        precision = "fp32"  # autocast on CPU is slower than fp32 and changes the numerics
        # a note, not an error: fp32 computes what was asked at least as precisely, and a GPU
        # command run on a CPU machine to try it should run; said once (rank 0), in one line
        if asked in ("fp16", "bf16") and os.environ.get("RANK", "0") == "0":
            flag = f"--precision {asked}" if getattr(args, "precision", None) else \
                "--use_fp16 true"
            print(f"note: {flag} is CUDA-only here; training in fp32 on {torch.device(device).type} "
                  "(mixed precision runs only on CUDA GPUs)", flush=True)
    args.precision = precision
    return precision


def autocast(precision, device):
    """Autocast context for the forward pass (a no-op in fp32 and on CPU)."""
    device = torch.device(device)
    if precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision, device):
    """A GradScaler that scales only in fp16 (bf16 has fp32's range and needs none)."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")


def backward_step(loss, optimizer, scaler, after_unscale=None):
    """zero_grad, scaled backward, unscale (so clipping sees the true gradients), the caller's
    gradient edits (clipping, DINO's frozen last layer), step, scaler update."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if after_unscale is not None:
        scaler.unscale_(optimizer)
        after_unscale()
    scaler.step(optimizer)
    scaler.update()
