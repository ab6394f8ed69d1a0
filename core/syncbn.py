"""BatchNorm with statistics over the global batch (all ranks), on any device.

torch.nn.SyncBatchNorm does this on CUDA only; on CPU (gloo) its forward refuses to run, and a
plain BatchNorm then normalises each rank's share of the batch with that share's statistics, so
2 processes x 32 images no longer compute what 1 process x 64 does. `sync_batchnorm(model,
device)` is the one place that decides:

    world size 1      the model unchanged (plain BatchNorm is already global)
    CUDA              torch.nn.SyncBatchNorm.convert_sync_batchnorm
    anything else     every _BatchNorm becomes an AllReduceBatchNorm (below)

Both keep nn.BatchNorm's parameter and buffer names, so checkpoints keep their keys and
torchvision ResNet weights still load strictly.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from core.dist import get_world_size


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks. The backward of a sum over ranks is again a sum over ranks: rank r's
    local statistics feed every rank's normalisation, so their gradient is the sum of what
    every rank's loss sends back."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch: one all_reduce of
    the packed per-channel [sum, sum of squares, count] (fp32) per call. Running statistics move
    exactly as in SyncBatchNorm (momentum, or a cumulative average when momentum is None; the
    unbiased global variance). In eval mode, or with a single process, it is nn.BatchNorm.

    The backward is derived by autograd through the all-reduce above. That is the exact gradient:
    DDP averages parameter gradients over ranks, so each rank must hold the gradient of the SUM
    of all ranks' losses with respect to its own activations; the path through the shared mean
    and variance carries it, which is what SyncBatchNorm's hand-written backward computes with
    its two all-reduced reductions (sum of dy, sum of dy * (x - mean)).

    Input: (N, C) or (N, C, *) as nn.BatchNorm1d/2d/3d, any float dtype (statistics in fp32).
    The variance E[x^2] - E[x]^2 loses log10(mean^2 / var) of fp32's 7 digits: harmless while
    a channel's mean is within a few standard deviations of 0, as BatchNorm inputs usually are
    (a mean of 10 standard deviations still leaves 5 digits).
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"AllReduceBatchNorm expects (N, C, ...) input, got {input.dim()}D; "
                             "add a batch dimension")

    def forward(self, x):
        if not self.training or get_world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)

        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = xf.new_full((1,), x.numel() // c)
        stats = _AllReduceSum.apply(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        total, total_sq, n = stats[:c], stats[c:2 * c], stats[2 * c]
        mean = total / n
        var = (total_sq / n - mean * mean).clamp(min=0)  # biased: this is what normalises

        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                unbiased = var * (n / (n - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)

        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _allreduce_copy(bn):
    """An AllReduceBatchNorm holding bn's parameters and buffers (the same tensors, so an
    optimizer or EMA pairing built before the conversion still holds the live ones)."""
    new = AllReduceBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine,
                             bn.track_running_stats)
    with torch.no_grad():  # as nn.SyncBatchNorm.convert_sync_batchnorm
        new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new


def convert_batchnorm(module, convert, _done=None):
    """Replace every _BatchNorm of `module` by convert(bn), in place; returns the module (or its
    replacement, when `module` is itself a BatchNorm).

    Unlike nn.SyncBatchNorm.convert_sync_batchnorm, which walks named_children() and so skips a
    module's second name, a BatchNorm used at several places (iBOT's head reuses one after every
    hidden layer) is replaced at all of them, by one shared converted module."""
    _done = {} if _done is None else _done
    if isinstance(module, _BatchNorm):
        if isinstance(module, (nn.SyncBatchNorm, AllReduceBatchNorm)):
            return module
        if id(module) not in _done:
            _done[id(module)] = (module, convert(module))  # keep the old one alive: ids stay unique
        return _done[id(module)][1]
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = convert_batchnorm(child, convert, _done)
    return module


def sync_batchnorm(model, device):
    """BatchNorm statistics over all ranks: SyncBatchNorm on CUDA, AllReduceBatchNorm elsewhere,
    the model unchanged with one process. Call before wrapping the model in DDP."""
    if get_world_size() == 1:
        return model
    if torch.device(device).type == "cuda":
        return convert_batchnorm(model, nn.SyncBatchNorm.convert_sync_batchnorm)
    return convert_batchnorm(model, _allreduce_copy)
