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
    neither weight decay nor the trust-ratio adaptation."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, g["eta"] * param_norm / update_norm, one),
                                    one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def build_optimizer(name, param_groups, device, betas=(0.9, 0.999)):
    """adamw | adam | sgd | lars. lr and weight decay are set every iteration from the
    schedules; betas: AdamW's and Adam's."""
    fused = {"fused": True} if device.type == "cuda" else {}
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
    norm). One fused norm kernel for all gradients, and no host sync: the scale is a tensor."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """Drop gradients of DINO/iBOT heads' last layer during the first epochs: AdamW then skips
    those parameters entirely (no update, no weight decay), as the official code."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


def lr_for_batch(lr, global_batch, scaling="linear"):
    """The learning rate a run uses. scaling "linear" (--lr_scaling, the default): the linear
    scaling rule (Goyal et al.), --lr is for a global batch of 256 (DINO, MAE's --blr);
    "none": --lr is the rate itself, whatever the batch (MAE's --lr)."""
    if scaling == "none":
        return lr
    if scaling != "linear":
        raise ValueError(f"unknown --lr_scaling '{scaling}'; choose linear or none")
    return lr * global_batch / 256.0

