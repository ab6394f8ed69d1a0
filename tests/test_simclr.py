"""methods/simclr.py: the NT-Xent loss and its accuracies against slow loop references, its
gradient across 2 gloo processes against one process on the global batch (this is what
core.dist.all_gather_with_grad's backward all-reduce is for), and a loss that drops."""
import argparse
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _ddp import run_ranks
from methods import simclr
from methods.simclr import info_nce_loss, similarity_logits

T = 0.2


def reference_loss(z1, z2, temperature):
    """NT-Xent with explicit loops: for each of the 2N anchors,
    -log(exp(s_pos / T) / sum_{j != anchor} exp(s_j / T)), averaged over the 2N anchors."""
    n = z1.shape[0]
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    losses = []
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        denom = sum(torch.exp(z[a] @ z[j] / temperature) for j in range(2 * n) if j != a)
        losses.append(-torch.log(torch.exp(z[a] @ z[pos] / temperature) / denom))
    return torch.stack(losses).mean()


def reference_accuracy(z1, z2):
    """Brute force: sort each anchor's 2N - 1 candidates by cosine similarity and find where
    its positive lands. Returns (top1 %, top5 %)."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    hits1 = hits5 = 0
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        others = [j for j in range(2 * n) if j != a]
        ranked = sorted(others, key=lambda j: -float(z[a] @ z[j]))
        place = ranked.index(pos)
        hits1 += place < 1
        hits5 += place < 5
    return 100.0 * hits1 / (2 * n), 100.0 * hits5 / (2 * n)


def correlated_pair(n=8, d=16, noise=0.8, seed=0):
    """Two 'views' that agree only partly, so accuracies land strictly between 0 and 100."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g)
    z2 = z1 + noise * torch.randn(n, d, generator=g)
    return z1, z2


def test_info_nce_loss_matches_loop_reference():
    z1, z2 = correlated_pair()
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    loss, _, _ = info_nce_loss(z1, z2, T)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    ref = reference_loss(z1, z2, T)
    r1, r2 = torch.autograd.grad(ref, (z1, z2))
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)
    torch.testing.assert_close(g1, r1.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g2, r2.float(), rtol=1e-4, atol=1e-6)


def test_logits_are_float32_under_autocast():
    """Issue 20: under autocast the similarity matmul ran in bfloat16 (on CUDA by default),
    moving logits at temperature 0.1 by ~0.04. CPU bfloat16 autocast imitates it."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    want = similarity_logits(z1, z2, 0.1)
    want_loss = info_nce_loss(z1, z2, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = similarity_logits(z1, z2, 0.1)
        got_loss = info_nce_loss(z1, z2, 0.1)
        # bfloat16 embeddings, as a head under autocast returns them: the same upcast logits
        got_bf16 = similarity_logits(z1.bfloat16(), z2.bfloat16(), 0.1)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_loss, want_loss))
    ref = F.normalize(torch.cat([z1, z2]).bfloat16().float(), dim=1)
    assert got_bf16.dtype == torch.float32 and torch.equal(got_bf16, ref @ ref.T / 0.1)


def test_info_nce_loss_known_values():
    # identical, orthogonal views: positive similarity 1, every negative 0, so
    # loss = -log(e^{1/T} / (e^{1/T} + 2N - 2)) exactly
    n = 4
    z = torch.eye(n, 8)
    loss, top1, top5 = info_nce_loss(z, z, T)
    expected = -math.log(math.exp(1 / T) / (math.exp(1 / T) + 2 * n - 2))
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    assert top1.item() == 100.0 and top5.item() == 100.0
    # the loss is scale-invariant (embeddings are L2-normalised first)
    assert math.isclose(info_nce_loss(3 * z, 0.5 * z, T)[0].item(), expected, rel_tol=1e-5)


@pytest.mark.parametrize("noise, seed", [(1.5, 0), (2.5, 1), (4.0, 2)])
def test_contrastive_accuracies_match_brute_force_ranking(noise, seed):
    z1, z2 = correlated_pair(n=8, noise=noise, seed=seed)
    _, top1, top5 = info_nce_loss(z1, z2, T)
    ref1, ref5 = reference_accuracy(z1, z2)
    assert top1.item() == pytest.approx(ref1)
    assert top5.item() == pytest.approx(ref5)
    if noise > 2:  # the noisier cases must not be trivially 0 or 100 %
        assert 0 < ref1 < 100


# ============ two processes, gloo ============

def _pairs():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(8, 6, generator=g)
    x2 = x1 + 0.5 * torch.randn(8, 6, generator=g)
    return x1, x2


def _linear():
    torch.manual_seed(0)
    return nn.Linear(6, 5)


def _ddp_worker(rank, world_size):
    """Each rank: 4 of the 8 pairs through a DDP-wrapped Linear, the loss, backward. Returns the
    rank's loss/accuracies and the DDP-averaged weight gradient, once with the real
    all_gather_with_grad and once with a broken backward that skips the all-reduce."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from core import dist as distu

    x1, x2 = _pairs()
    local = slice(4 * rank, 4 * rank + 4)
    results = {}
    for variant in ("real", "no_allreduce"):
        if variant == "no_allreduce":  # what some SimCLR ports do: keep only this rank's slice
            distu._GatherWithGrad.backward = staticmethod(
                lambda ctx, *grads: grads[dist.get_rank()])
        model = DistributedDataParallel(_linear())
        loss, top1, top5 = info_nce_loss(model(x1[local]), model(x2[local]), T)
        loss.backward()
        results[variant] = {"loss": loss.detach(), "top1": top1, "top5": top5,
                            "weight_grad": model.module.weight.grad.clone(),
                            "bias_grad": model.module.bias.grad.clone()}
    return results


def test_ddp_gradient_equals_single_process_global_batch():
    ranks = run_ranks(_ddp_worker)  # forked: the broken backward stays in the children

    # one process, all 8 pairs (no process group: world size 1)
    x1, x2 = _pairs()
    model = _linear()
    loss, top1, top5 = info_nce_loss(model(x1), model(x2), T)
    loss.backward()

    real = [r["real"] for r in ranks]
    assert math.isclose(sum(r["loss"].item() for r in real) / 2, loss.item(), rel_tol=1e-5)
    # each rank ranks its anchors' positives among all 15 global candidates
    assert sum(r["top1"].item() for r in real) / 2 == pytest.approx(top1.item())
    assert sum(r["top5"].item() for r in real) / 2 == pytest.approx(top5.item())
    for r in real:  # DDP leaves the same averaged gradient on both ranks
        torch.testing.assert_close(r["weight_grad"], model.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r["bias_grad"], model.bias.grad, rtol=1e-4, atol=1e-6)

    # the check has teeth: without the all-reduce in backward the gradient is wrong
    broken = ranks[0]["no_allreduce"]["weight_grad"]
    assert not torch.allclose(broken, model.weight.grad, rtol=1e-2, atol=1e-4)


# ============ the SimCLR module trains ============

def test_simclr_module_loss_drops_with_sgd():
    torch.manual_seed(0)
    args = argparse.Namespace(temperature=0.2, proj_hidden_dim=64, proj_output_dim=16)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                             nn.Flatten())  # (B, 32)
    model = simclr.build(args, backbone, 32, niter_per_ep=1)
    assert model.checkpoint_modules() == {"model": model} and model.eval_backbone() is backbone
    images = torch.randn(16, 3, 8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for it in range(20):
        views = [images + 0.7 * torch.randn_like(images), images + 0.7 * torch.randn_like(images)]
        loss, stats = model(views, 0, it)
        assert set(stats) == {"acc1", "acc5", "emb_std", "erank"} and stats["acc1"].ndim == 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
