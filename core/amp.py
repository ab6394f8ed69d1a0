"""Mixed precision in one place: the --precision flag (with DINO's --use_fp16 as its alias),
the autocast context, the GradScaler, and the one optimizer step every training script uses.

    add_precision_args(parser)          --precision {bf16,fp16,fp32}, --use_fp16 true/false
    resolve_precision(args, device)     -> "bf16" | "fp16" | "fp32" (also sets args.precision)
    autocast(precision, device)         context for the forward pass
    grad_scaler(precision, device)      GradScaler, enabled only for fp16
    backward_step(loss, optimizer, scaler, after_unscale=None)
    add_tf32_arg(parser)                --tf32 true/false (CUDA float32 products in TF32)
    set_tf32(enabled)                   applies it; full_fp32() keeps a block in full float32

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


# ============ TF32 ============
# On Ampere and later GPUs, float32 matrix products and convolutions may run on tensor cores in
# TF32 (10 bits of mantissa instead of 23). PyTorch's defaults differ per op (convolutions: on,
# matrix products: off), so the training scripts set both from --tf32. The current API is
# torch.backends.{cuda.matmul,cudnn.conv}.fp32_precision ("tf32" / "ieee", torch >= 2.9); the
# older allow_tf32 flags are deprecated, and reading them after the new API was used raises,
# so everything in this repository goes through set_tf32 / full_fp32. (In torch 2.14 only
# inductor's max-autotune and graph-deduplication paths still read the old flags; --compile
# uses neither.)

def _new_tf32_api():
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and \
        hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")


def add_tf32_arg(parser):
    parser.add_argument("--tf32", default=True, type=bool_flag,
                        help="On CUDA, run float32 matrix products and convolutions on TF32 "
                             "tensor cores (10-bit mantissa; several times faster on A100/H100 "
                             "for --precision fp32 and the float32 parts of a bf16 step). "
                             "Default: true. Exact either way: the device augmentation's "
                             "resize products and blur, DINO/iBOT's last layer, SimCLR's logits "
                             "run in full float32. No effect on CPU.")


def tf32_state():
    """The current float32 precision of CUDA matrix products and cuDNN convolutions, as a value
    set_tf32_state takes back."""
    if _new_tf32_api():
        return (torch.backends.cuda.matmul.fp32_precision,
                torch.backends.cudnn.conv.fp32_precision)
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32


def set_tf32_state(state):
    if _new_tf32_api():
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = state
    else:
        torch.set_float32_matmul_precision(state[0])
        torch.backends.cudnn.allow_tf32 = state[1]


def set_tf32(enabled):
    """--tf32: float32 matrix products and convolutions on CUDA in TF32 (True) or in full
    IEEE float32 (False)."""
    if _new_tf32_api():
        value = "tf32" if enabled else "ieee"
        set_tf32_state((value, value))
    else:
        set_tf32_state(("high" if enabled else "highest", bool(enabled)))


@contextlib.contextmanager
def full_fp32():
    """Inside: float32 matrix products and convolutions in full IEEE precision whatever --tf32
    says (the settings are global, read when an op is launched); restored on the way out. For
    the forward of the parts that must be exact (their backward runs later, outside, as set):
    TF32 rounds the inputs of a product to ~5e-4 relative, which moves a resampled pixel in
    [0, 1] by up to ~1e-3 and a cosine logit divided by a temperature of 0.04 by ~0.02."""
    state = tf32_state()
    set_tf32(False)
    try:
        yield
    finally:
        set_tf32_state(state)
