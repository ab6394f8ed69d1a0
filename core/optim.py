"""Optimizer pieces shared by every method: parameter groups, LARS, per-iteration cosine
schedules and DINO's per-parameter gradient clipping (facebookresearch/dino utils.py)."""
import numpy as np
import torch


def get_params_groups(model):
    """Two groups, as DINO: everything with ndim > 1 is weight-decayed; biases and 1-D
    parameters (norm weights/biases) are not. pos_embed, cls_token and masked_embed are decayed
    (DINO/iBOT pre-training does so, unlike timm). Frozen parameters are skipped."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by DINO (from barlowtwins): parameters with ndim == 1 get
    neither weight decay nor the trust-ratio adaptation.

    Per group, multi-tensor kernels over all parameters instead of a Python loop per parameter
    (the same arithmetic, so the same numbers as that loop). Under fp16 GradScaler.step hands
    the step its found_inf (_step_supports_amp_scaling): a step with non-finite gradients is
    skipped on the device, leaving parameters and momentum bit-for-bit as they were, instead of
    the scaler reading found_inf on the host (a sync every step)."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        # set by GradScaler.step: grad_scale when it has not unscaled the gradients yet
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if grad_scale is not None:  # as GradScaler.unscale_ does it
                grads = torch._foreach_mul(grads, grad_scale.double().reciprocal().float())
            if found_inf is not None:
                grads = _zero_if(found_inf, grads)  # finite, so that the skip below is exact
            updates = list(grads)
            matrices = [i for i, p in enumerate(params) if p.ndim != 1]
            if matrices:
                weights = [params[i] for i in matrices]
                dp = torch._foreach_add([grads[i] for i in matrices], weights,
                                        alpha=g["weight_decay"])
                param_norm = torch.stack(torch._foreach_norm(weights))
                update_norm = torch.stack(torch._foreach_norm(dp))
                one = torch.ones_like(param_norm)
                q = torch.where(param_norm > 0.0,
                                torch.where(update_norm > 0, g["eta"] * param_norm / update_norm,
                                            one), one)
                torch._foreach_mul_(dp, q.unbind(0))
                for i, d in zip(matrices, dp):
                    updates[i] = d
            mus = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mus.append(state["mu"])
            if found_inf is None:
                torch._foreach_mul_(mus, g["momentum"])
                torch._foreach_add_(mus, updates)
                torch._foreach_add_(params, mus, alpha=-g["lr"])
            else:  # the same step out of place, kept (weight 1: exactly) or dropped (weight 0)
                new_mus = torch._foreach_mul(mus, g["momentum"])
                torch._foreach_add_(new_mus, updates)
                new_params = torch._foreach_add(params, new_mus, alpha=-g["lr"])
                keep = (found_inf == 0).to(params[0].dtype)
                torch._foreach_lerp_(mus, new_mus, [keep.expand_as(m) for m in mus])
                torch._foreach_lerp_(params, new_params, [keep.expand_as(p) for p in params])


def _zero_if(found_inf, tensors):
    """The tensors, or zeros of their shapes where found_inf > 0, decided on the device (a
    multiplication by 0 would keep NaN and inf): one select over their concatenation."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    flat = torch.where(found_inf > 0, torch.zeros((), dtype=flat.dtype, device=flat.device), flat)
    return [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def fused_supported(device):
    """Whether torch has fused AdamW/SGD kernels for this device type: CUDA, and the CPU since
    torch 2.4 (one kernel per parameter for the whole update instead of one per operation)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:
        return device.type == "cuda"
    return device.type in _get_fused_kernels_supported_devices()


def build_optimizer(name, param_groups, device, betas=(0.9, 0.999)):
    """adamw | adam | sgd | lars. lr and weight decay are set every iteration from the
    schedules; betas: AdamW's and Adam's. AdamW, Adam and SGD use torch's fused kernels wherever
    torch has them (CUDA and CPU)."""
    fused = {"fused": True} if fused_supported(device) else {}
    if name == "adamw":
        return torch.optim.AdamW(param_groups, betas=tuple(betas), **fused)  # eps 1e-8 as DINO
    if name == "adam":  # weight decay as an L2 term of the gradient, not decoupled as AdamW's
        return torch.optim.Adam(param_groups, betas=tuple(betas), **fused)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=0, momentum=0.9, **fused)
    if name == "lars":
        return LARS(param_groups)  # wd and lr are filled in by the schedules
    raise ValueError(f"unknown --optimizer '{name}'; choose adamw, adam, sgd or lars")


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                     start_warmup_value=0):
    """Per-iteration values (length epochs * niter_per_ep): linear warmup from
    start_warmup_value to base_value (endpoint included), then a cosine from base_value towards
    final_value, as DINO's utils.cosine_scheduler."""
    warmup_iters = int(warmup_epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 \
        else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


@torch.no_grad()
def clip_gradients(model, clip):
    """DINO's clipping: each parameter's gradient separately to norm <= clip (not the global
    norm), as utils.clip_gradients's loop computes it (scale clip / (norm + 1e-6) where below
    1), in three multi-tensor kernels and no host sync: the norms, the scales as one tensor,
    the products."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    scales = torch.clamp(clip / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, scales.unbind(0))


def lr_for_batch(lr, global_batch, scaling="linear"):
    """The learning rate a run uses. scaling "linear" (--lr_scaling, the default): the linear
    scaling rule (Goyal et al.), --lr is for a global batch of 256 (DINO, MAE's --blr);
    "none": --lr is the rate itself, whatever the batch (MAE's --lr)."""
    if scaling == "none":
        return lr
    if scaling != "linear":
        raise ValueError(f"unknown --lr_scaling '{scaling}'; choose linear or none")
    return lr * global_batch / 256.0

