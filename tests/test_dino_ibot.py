"""CPU tests for methods/dino.py, methods/ibot.py and visualize_attention.py: losses against slow
references written here, temperature / momentum schedules, centring (also across 2 gloo
processes), heads and official checkpoint layouts, masks, multi-crop batching, EMA, frozen last
layer, attention maps, and a short 2-rank run of each method that resumes."""
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.checkpoint import load_file, load_pretrained_weights
from methods import dino, ibot
from methods.dino import (DINOHead, DINOLoss, MultiCropWrapper, WeightNormLinear, matched_parameters,
                          resolution_groups, teacher_temp_schedule)
from methods.ibot import MaskGenerator, MultiCropMaskTransform, iBOTHead, iBOTLoss
from models import build_backbone
from models.vision_transformer import VisionTransformer
import visualize_attention as va

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: on a busy 2-core machine, waking a second OpenMP thread for each
    op costs more than the op (tens of ms per BatchNorm call)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit(**kwargs):
    """Depth-2 ViT on 16x16 images with 4x4 patches (4x4 = 16 patches)."""
    cfg = dict(img_size=[16], patch_size=4, embed_dim=24, depth=2, num_heads=3, qkv_bias=True)
    cfg.update(kwargs)
    return VisionTransformer(**cfg)


@pytest.fixture
def small_vits(monkeypatch):
    """build() gets depth-2, 24-wide ViTs instead of the 12-block vit_tiny: the methods do not
    care, and the unit tests stay fast on a busy 2-core machine. Returns the builder."""
    def build_small(arch, patch_size=16, img_size=224, drop_path_rate=0.0, cifar_stem=False, **kw):
        model = tiny_vit(patch_size=patch_size, img_size=img_size, drop_path_rate=drop_path_rate, **kw)
        return model, model.embed_dim
    monkeypatch.setattr(dino, "build_backbone", build_small)
    monkeypatch.setattr(ibot, "build_backbone", build_small)
    return build_small


def method_args(method="dino", **overrides):
    """The namespace train_ssl.py would hand to build(): defaults of the method's flags."""
    from train_ssl import get_args_parser
    args = get_args_parser(method).parse_args([])
    args.input_size, args.cifar_stem = 16, False
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def soft_ce(logits, target_probs):
    """Slow reference: batch mean of -sum(q * log softmax(logits)), via F.cross_entropy's
    probability targets (a different code path from the losses)."""
    return F.cross_entropy(logits.double(), target_probs.double())


# ============ DINO loss ============

def test_dino_loss_uniform_student_gives_log_k():
    K, B, ncrops = 50, 4, 5
    loss_fn = DINOLoss(K, ncrops, 0.04, 0.04, 0, 10)
    teacher = torch.randn(2 * B, K) * 3
    loss = loss_fn(torch.zeros(ncrops * B, K), teacher, epoch=0)
    assert loss.item() == pytest.approx(math.log(K), rel=1e-6)


def test_dino_loss_matches_slow_reference_and_updates_center_after():
    torch.manual_seed(0)
    K, B, ncrops = 16, 3, 4
    loss_fn = DINOLoss(K, ncrops, 0.04, 0.07, 3, 10)
    old_center = torch.randn(1, K) * 0.1
    loss_fn.center.copy_(old_center)
    student, teacher = torch.randn(ncrops * B, K), torch.randn(2 * B, K)
    epoch = 1
    temp = 0.055  # linspace(0.04, 0.07, 3)[1]
    loss = loss_fn(student, teacher, epoch)

    terms = []
    for iq in range(2):
        q = F.softmax((teacher[iq * B:(iq + 1) * B].double() - old_center.double()) / temp, dim=-1)
        for v in range(ncrops):
            if v != iq:
                terms.append(soft_ce(student[v * B:(v + 1) * B] / 0.1, q))
    assert len(terms) == 2 * ncrops - 2
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    # the centre moved after the loss, towards the mean raw teacher logit
    expected = 0.9 * old_center + 0.1 * teacher.mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected)


def test_dino_loss_skips_same_view_pairs():
    """Student crop 0 is compared with teacher view 1 only (never with teacher view 0), crop 1
    with view 0 only, and local crops with both."""
    torch.manual_seed(0)
    K, B, ncrops = 8, 2, 3
    student = torch.randn(ncrops * B, K)
    teacher = torch.randn(2 * B, K)
    teacher_changed = teacher.clone()
    teacher_changed[:B] += torch.randn(B, K) * 5  # change the teacher's view 0 only

    def grads(t):
        s = student.clone().requires_grad_()
        DINOLoss(K, ncrops, 0.04, 0.04, 0, 1)(s, t, 0).backward()
        return s.grad.chunk(ncrops)

    g, g_changed = grads(teacher), grads(teacher_changed)
    torch.testing.assert_close(g[0], g_changed[0])        # crop 0 never sees teacher view 0
    assert not torch.allclose(g[1], g_changed[1])        # crop 1 does
    assert not torch.allclose(g[2], g_changed[2])        # and so do the local crops


def official_dino_loss(student_output, teacher_output, center, ncrops, temp):
    """main_dino.DINOLoss.forward as the official code computes it, in float32: one
    log-softmax and one product per (teacher view, student view) pair."""
    student_out = (student_output / 0.1).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


def test_two_product_loss_equals_the_official_pairwise_loss():
    """The benchmark's shapes (out_dim 4096, 2 + 6 crops) with cosine logits as the head gives
    them: the loss to float32 rounding, and its gradient."""
    torch.manual_seed(0)
    K, B, ncrops = 4096, 16, 8
    student = F.normalize(torch.randn(ncrops * B, K), dim=-1) * 30  # logits in about [-1, 1]
    teacher = F.normalize(torch.randn(2 * B, K), dim=-1) * 30
    center = torch.randn(1, K) * 0.05
    loss_fn = DINOLoss(K, ncrops, 0.04, 0.04, 0, 1)
    loss_fn.center.copy_(center)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    ours = loss_fn(s1, teacher, 0)
    want = official_dino_loss(s2, teacher, center, ncrops, 0.04)
    assert ours.item() == pytest.approx(want.item(), rel=1e-6)
    ours.backward()
    want.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-4 * s2.grad.abs().max().item())


@pytest.mark.parametrize("method", ["dino", "ibot"])
def test_collapse_diagnostics_only_every_print_interval(method, small_vits, monkeypatch):
    """teacher_stats runs on the steps a line may print (it % --print_freq == 0, and the first
    step of a run); the steps in between repeat its values."""
    module = {"dino": dino, "ibot": ibot}[method]
    calls, original = [], module.teacher_stats

    def counting(probs, ce):
        calls.append(1)
        return original(probs, ce)

    monkeypatch.setattr(module, "teacher_stats", counting)
    args = method_args(method, arch="vit_tiny", patch_size=8, out_dim=32, patch_out_dim=32,
                       local_crops_number=1, epochs=2, print_freq=3)
    backbone, dim = small_vits("vit_tiny", patch_size=8, img_size=[16],
                               **module.backbone_kwargs(args))
    model = module.build(args, backbone, dim, niter_per_ep=10)
    crops = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    views = crops if method == "dino" else (crops, [torch.rand(2, 2, 2) < 0.5] * 2)
    seen = []
    for it in range(5, 12):  # a resumed run: the first step computes them too
        _, stats = model(views, 0, it)
        seen.append(stats["teacher_entropy"])
    assert len(calls) == 3  # it = 5, 6, 9
    assert seen[0] is not seen[1] and seen[1] is seen[2] is seen[3] and seen[4] is not seen[3]


def test_teacher_temperature_schedule_endpoints():
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.07, 3, 6),
                               [0.04, 0.055, 0.07, 0.07, 0.07, 0.07])
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.07, 0, 4), [0.07] * 4)
    long_warmup = teacher_temp_schedule(0.04, 0.07, 30, 2)  # warmup longer than the run
    assert long_warmup[0] == pytest.approx(0.04) and long_warmup[1] < 0.05
    # the loss really divides by the scheduled temperature: at the last epoch, 0.07
    K, B = 6, 2
    loss_fn = DINOLoss(K, 2, 0.04, 0.07, 3, 5)
    s, t = torch.randn(2 * B, K), torch.randn(2 * B, K)
    ref = (soft_ce(s[B:] / 0.1, F.softmax(t[:B].double() / 0.07, -1))
           + soft_ce(s[:B] / 0.1, F.softmax(t[B:].double() / 0.07, -1))) / 2
    assert loss_fn(s, t, 4).item() == pytest.approx(ref.item(), rel=1e-5)


def _center_worker(rank, init_file, results):
    import torch.distributed as dist
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP thread pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)
    K, B = 5, 3
    dino_loss = DINOLoss(K, 2, 0.04, 0.04, 0, 1)
    teacher = torch.randn(2 * B, K) + rank * 10  # very different logits on the two ranks
    dino_loss(torch.randn(2 * B, K), teacher, 0)
    ibot_loss = iBOTLoss(K, 4, 2, 0, 0.04, 0.04, 0.04, 0.07, 0, 1)
    t_patch = torch.randn(2 * B, 6, 4) + rank
    ibot_loss((torch.randn(2 * B, K), torch.randn(2 * B, 6, 4)), (teacher, t_patch), None,
              [torch.ones(B, 2, 3, dtype=torch.bool)] * 2, 0)
    results[rank] = (teacher, t_patch, dino_loss.center.clone(), ibot_loss.center.clone(),
                     ibot_loss.center2.clone())
    dist.destroy_process_group()


def test_center_update_all_reduces_over_processes(tmp_path):
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    # fork: the children need not re-import torch and this module (spawn takes ~10 s here)
    mp.start_processes(_center_worker, args=(str(tmp_path / "init"), results), nprocs=2,
                       start_method="fork")
    t0, p0, c0, i0, j0 = results[0]
    t1, p1, c1, i1, j1 = results[1]
    expected = 0.1 * torch.cat([t0, t1]).mean(0, keepdim=True)       # sum / (2B * world)
    torch.testing.assert_close(c0, expected)
    torch.testing.assert_close(c1, expected)
    torch.testing.assert_close(i0, expected)
    expected2 = 0.1 * torch.cat([p0, p1]).mean((0, 1)).view(1, 1, -1)  # mean over all patches
    torch.testing.assert_close(j0, expected2)
    torch.testing.assert_close(j1, expected2)


# ============ heads ============

def test_dino_head_keys_match_official():
    keys = list(DINOHead(24, 64, hidden_dim=32, bottleneck_dim=16).state_dict())
    assert keys == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                    "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v"]
    bn_keys = DINOHead(24, 64, use_bn=True, hidden_dim=32, bottleneck_dim=16).state_dict()
    assert {"mlp.1.running_mean", "mlp.3.weight", "mlp.4.num_batches_tracked",
            "mlp.6.weight"} <= set(bn_keys)
    assert list(DINOHead(24, 64, nlayers=1, bottleneck_dim=16).state_dict())[:2] == \
        ["mlp.weight", "mlp.bias"]
    head = DINOHead(24, 64, hidden_dim=32, bottleneck_dim=16)
    assert head.last_layer.weight_g.shape == (64, 1) and head.last_layer.weight_v.shape == (64, 16)
    assert not head.last_layer.weight_g.requires_grad  # norm_last_layer: g stays 1
    assert DINOHead(24, 64, norm_last_layer=False).last_layer.weight_g.requires_grad
    out = head(torch.randn(5, 24))
    assert out.shape == (5, 64) and out.abs().max() <= 1 + 1e-6  # cosine similarities


def test_weight_norm_layer_loads_torch_weight_norm_checkpoint():
    """Official heads are nn.utils.weight_norm(nn.Linear(bias=False)): weight_g/weight_v load
    into ours and give the same outputs."""
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):
        official = nn.utils.weight_norm(nn.Linear(16, 40, bias=False))
    with torch.no_grad():
        official.weight_g.uniform_(0.5, 2.0)
    ours = WeightNormLinear(16, 40)
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(7, 16)
    torch.testing.assert_close(ours(x), official(x))
    assert list(ours.state_dict()) == list(official.state_dict()) == ["weight_g", "weight_v"]


def test_dino_head_loads_official_style_head():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 16))
    with pytest.warns(FutureWarning):
        last = nn.utils.weight_norm(nn.Linear(16, 64, bias=False))
    official = nn.Module()
    official.mlp, official.last_layer = mlp, last
    head = DINOHead(24, 64, hidden_dim=32, bottleneck_dim=16)
    head.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(5, 24)
    torch.testing.assert_close(head(x), last(F.normalize(mlp(x), dim=-1)))


def test_ibot_head_shared_and_separate_layers():
    shared = iBOTHead(24, 64, patch_out_dim=64, hidden_dim=32, bottleneck_dim=16, shared_head=True)
    keys = set(shared.state_dict())
    assert {"last_layer.weight_g", "last_layer.weight_v", "last_layer2.weight_g",
            "last_layer2.weight_v"} <= keys  # state_dict lists the shared layer twice
    assert shared.last_layer2 is shared.last_layer
    assert not any(n.startswith("last_layer2") for n, _ in shared.named_parameters())
    separate = iBOTHead(24, 64, patch_out_dim=48, hidden_dim=32, bottleneck_dim=16)
    tokens = torch.randn(3, 1 + 9, 24)
    cls, patches = separate(tokens)
    assert cls.shape == (3, 64) and patches.shape == (3, 9, 48)
    # [CLS] through the token path equals the 2-D (DINO) path on the [CLS] feature
    torch.testing.assert_close(cls, separate(tokens[:, 0]))
    # one BatchNorm module reused after every hidden layer, as the official head
    bn = iBOTHead(24, 64, norm="bn", hidden_dim=32, bottleneck_dim=16)
    assert bn.mlp[1] is bn.mlp[4] and isinstance(bn.mlp[1], nn.BatchNorm1d)
    bn.train()
    cls, patches = bn(tokens)  # BatchNorm over (B, N, C) tokens through the channel permute
    assert patches.shape == (3, 9, 8192)


# ============ multi-crop wrapper ============

def test_resolution_groups():
    crops = [torch.zeros(1, 3, s, s) for s in (224, 224, 96, 96, 96, 224)]
    assert resolution_groups(crops) == [2, 5, 6]
    assert resolution_groups(crops[:1]) == [1]


def test_multicrop_wrapper_batches_same_resolution_crops():
    torch.manual_seed(0)
    vit = tiny_vit().eval()
    calls = []
    vit.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    wrapper = MultiCropWrapper(vit, nn.Identity())
    crops = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8),
             torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    with torch.no_grad():
        out = wrapper(crops)
        separate = torch.cat([vit(c) for c in crops])
    assert calls[:2] == [4, 6]  # one backbone call per resolution group
    assert out.shape == (10, 24)
    torch.testing.assert_close(out, separate, atol=1e-5, rtol=1e-5)  # crop-major order kept


def test_dino_with_resnet_backbone_runs():
    torch.manual_seed(0)
    args = method_args("dino", arch="resnet18", out_dim=32, local_crops_number=2, cifar_stem=False)
    backbone, dim = build_backbone("resnet18", cifar_stem=False)
    model = dino.build(args, backbone, dim, niter_per_ep=2)
    views = [torch.randn(4, 3, 16, 16)] * 2 + [torch.randn(4, 3, 8, 8)] * 2
    loss, stats = model(views, 0, 0)
    loss.backward()
    assert torch.isfinite(loss) and model.student.backbone.conv1.weight.grad is not None
    assert model.eval_backbone() is model.teacher.backbone


def test_build_trains_the_backbone_it_is_given():
    """train_ssl.py prints the parameter count of, and keeps a random-init copy of, the backbone
    it builds: the method must train that very module (iBOT used to build its own)."""
    import train_ssl
    for method, extra in (("dino", []), ("ibot", ["--patch_out_dim", "32"])):
        args = train_ssl.parse_args(["--method", method, "--arch", "vit_tiny", "--patch_size", "8",
                                     "--global_crops_size", "16", "--local_crops_size", "8",
                                     "--out_dim", "32", *extra])
        args.input_size, args.cifar_stem, args.knn_eval, args.device = 16, False, True, torch.device("cpu")
        model, backbone, init_backbone = train_ssl.build_networks(args, niter_per_ep=1)
        assert model.student.backbone is backbone and model.eval_backbone() is not backbone
        torch.testing.assert_close(init_backbone.state_dict(), backbone.state_dict())
        assert hasattr(backbone, "masked_embed") == (method == "ibot")


# ============ EMA teacher, frozen last layer ============

def test_ema_update_and_momentum_schedule(small_vits):
    args = method_args("dino", arch="vit_tiny", patch_size=8, out_dim=32, epochs=2)
    backbone, dim = small_vits("vit_tiny", patch_size=8, img_size=[16], drop_path_rate=0.1)
    model = dino.build(args, backbone, dim, niter_per_ep=5)
    sched = model.momentum_schedule
    assert len(sched) == 10 and sched[0] == pytest.approx(0.996) and sched[-1] < 1
    assert np.all(np.diff(sched) > 0)
    # teacher starts as the student
    for (n, s), t in zip(model.student.named_parameters(), model.teacher.parameters()):
        assert torch.equal(s, t) and not t.requires_grad, n
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before = [t.clone() for t in model.teacher.parameters()]
    model.after_step(3)
    m = sched[3]
    for t0, s, t in zip(before, model.student.parameters(), model.teacher.parameters()):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s)


def test_freeze_last_layer_drops_its_gradients_in_the_first_epoch(small_vits):
    args = method_args("dino", arch="vit_tiny", patch_size=8, out_dim=32, local_crops_number=0,
                       norm_last_layer=False, freeze_last_layer=1)
    backbone, dim = small_vits("vit_tiny", patch_size=8, img_size=[16])
    model = dino.build(args, backbone, dim, niter_per_ep=1)
    views = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)]
    for epoch, frozen in ((0, True), (1, False)):
        model.zero_grad(set_to_none=True)
        model(views, epoch, 0)[0].backward()
        model.after_backward(epoch)
        last = model.student.head.last_layer
        assert (last.weight_v.grad is None) == frozen and (last.weight_g.grad is None) == frozen
        assert model.student.head.mlp[0].weight.grad is not None


# ============ iBOT ============

def test_mask_generator_ratio_and_shapes():
    random.seed(0)
    block = MaskGenerator([0.3], [0.0], pred_shape="block")
    masks = torch.stack([block(14, 14) for _ in range(300)])
    assert masks.shape == (300, 14, 14) and masks.dtype == torch.bool
    ratio = masks.float().mean().item()
    assert 0.27 < ratio <= 0.3  # BEiT's generator lands slightly below the target (~0.29)
    assert masks.flatten(1).sum(1).max() <= int(0.3 * 196) + 1
    rand = MaskGenerator([0.3], [0.0], pred_shape="rand")
    assert all(rand(14, 10).sum() == int(0.3 * 140) for _ in range(20))
    assert not MaskGenerator([0.0], [0.0])(7, 7).any()
    assert block(4, 6).shape == (4, 6)
    # blocks: the masked patches fill most of their bounding box; random patches do not

    def bbox_fill(m):
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        return m.sum().item() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)).item()
    block_small = MaskGenerator([0.1], [0.0], pred_shape="block")
    rand_small = MaskGenerator([0.1], [0.0], pred_shape="rand")
    assert np.mean([bbox_fill(block_small(14, 14)) for _ in range(50)]) > 0.75
    assert np.mean([bbox_fill(rand_small(14, 14)) for _ in range(50)]) < 0.25


def test_mask_generator_ratio_list_as_ibot_recipe():
    random.seed(1)
    gen = MaskGenerator([0.0, 0.3], [0.0, 0.2])
    ratios = np.array([gen(14, 14).float().mean().item() for _ in range(400)])
    assert 0.4 < np.mean(ratios == 0) < 0.6  # half of the crops unmasked
    assert ratios.max() <= 0.5 and np.mean(ratios) == pytest.approx(0.147, abs=0.03)
    with pytest.raises(ValueError, match="pred_ratio_var"):
        MaskGenerator([0.0, 0.3], [0.0])


def test_multicrop_mask_transform_shapes():
    from PIL import Image
    from data import MultiCropTransform
    tf = MultiCropMaskTransform(MultiCropTransform(32, 16, local_number=3), MaskGenerator(), 2, 4)
    crops, masks = tf(Image.new("RGB", (40, 40)))
    assert [c.shape for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert [m.shape for m in masks] == [(8, 8)] * 2 and masks[0].dtype == torch.bool


def _ibot_reference(s_cls, s_patch, t_cls, t_patch, local_cls, masks, center, center2, temp,
                    temp2, ng, lambda1, lambda2):
    B = t_cls.shape[0] // ng
    all_cls = torch.cat([s_cls, local_cls])
    n = all_cls.shape[0] // B
    cls_terms, patch_terms = [], []
    for q in range(ng):
        tq = F.softmax((t_cls[q * B:(q + 1) * B].double() - center) / temp, -1)
        for v in range(n):
            if v != q:
                cls_terms.append(soft_ce(all_cls[v * B:(v + 1) * B] / 0.1, tq))
        per_image = []
        for b in range(B):  # loop over images and patches: the slowest possible reference
            m = masks[q][b].flatten()
            tp = F.softmax((t_patch[q * B + b].double() - center2[0]) / temp2, -1)
            sp = F.log_softmax(s_patch[q * B + b].double() / 0.1, -1)
            ce = [-(tp[k] * sp[k]).sum() for k in range(len(m)) if m[k]]
            per_image.append(torch.stack(ce).mean() if ce else torch.zeros((), dtype=torch.double))
        patch_terms.append(torch.stack(per_image).mean())
    cls = torch.stack(cls_terms).mean() * lambda1
    patch = torch.stack(patch_terms).mean() * lambda2
    return cls, patch


def test_ibot_loss_matches_slow_reference():
    torch.manual_seed(0)
    K, Kp, B, ng, nl, H, W = 10, 7, 3, 2, 2, 2, 3
    loss_fn = iBOTLoss(K, Kp, ng, nl, 0.04, 0.07, 0.04, 0.07, 2, 5, lambda1=0.7, lambda2=1.3)
    center, center2 = torch.randn(1, K) * 0.1, torch.randn(1, 1, Kp) * 0.1
    loss_fn.center.copy_(center)
    loss_fn.center2.copy_(center2)
    s_cls, s_patch = torch.randn(ng * B, K), torch.randn(ng * B, H * W, Kp)
    t_cls, t_patch = torch.randn(ng * B, K), torch.randn(ng * B, H * W, Kp)
    local = torch.randn(nl * B, K)
    masks = [torch.rand(B, H, W) < 0.5 for _ in range(ng)]
    masks[0][1] = False  # an image without masked patches counts as 0 in the batch mean
    masks[1][0] = True
    out = loss_fn((s_cls, s_patch), (t_cls, t_patch), local, masks, epoch=0)
    cls, patch = _ibot_reference(s_cls, s_patch, t_cls, t_patch, local, masks, center.double(),
                                 center2.double(), 0.04, 0.04, ng, 0.7, 1.3)
    assert out["cls"].item() == pytest.approx(cls.item(), rel=1e-5)
    assert out["patch"].item() == pytest.approx(patch.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((cls + patch).item(), rel=1e-5)
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * t_cls.mean(0, keepdim=True))
    torch.testing.assert_close(loss_fn.center2, 0.9 * center2 + 0.1 * t_patch.mean((0, 1)).view(1, 1, -1))


def test_ibot_loss_uniform_logits_and_patch_schedule():
    K, Kp, B = 12, 9, 2
    loss_fn = iBOTLoss(K, Kp, 2, 0, 0.04, 0.04, 0.04, 0.07, 3, 10, mim_start_epoch=2)
    out = loss_fn((torch.zeros(2 * B, K), torch.zeros(2 * B, 4, Kp)),
                  (torch.randn(2 * B, K), torch.randn(2 * B, 4, Kp)), None,
                  [torch.ones(B, 2, 2, dtype=torch.bool)] * 2, 0)
    assert out["cls"].item() == pytest.approx(math.log(K), rel=1e-6)
    assert out["patch"].item() == pytest.approx(math.log(Kp), rel=1e-6)
    # patch temperature: held at the warmup value until masking starts, then warmed up
    np.testing.assert_allclose(loss_fn.teacher_temp2_schedule[:6], [0.04, 0.04, 0.04, 0.055, 0.07, 0.07])
    assert len(loss_fn.teacher_temp2_schedule) == 10


def build_ibot(builder, **overrides):
    args = method_args("ibot", arch="vit_tiny", patch_size=8, out_dim=32, patch_out_dim=32,
                       local_crops_number=2, epochs=2, **overrides)
    backbone, dim = builder("vit_tiny", patch_size=8, img_size=[16], **ibot.backbone_kwargs(args))
    return ibot.build(args, backbone, dim, niter_per_ep=2)


def test_ibot_teacher_init_quirk_and_ema_pairs(small_vits):
    """Separate student heads, shared teacher head: the teacher's one last layer starts as the
    student's last_layer2 (copied last) and is then EMA'd towards the student's last_layer."""
    model = build_ibot(small_vits, shared_head=False, shared_head_teacher=True)
    s_head, t_head = model.student.head, model.teacher.head
    assert t_head.last_layer is t_head.last_layer2
    torch.testing.assert_close(t_head.last_layer.weight_v, s_head.last_layer2.weight_v)
    assert not torch.equal(t_head.last_layer.weight_v, s_head.last_layer.weight_v)
    assert hasattr(model.student.backbone, "masked_embed")
    assert not hasattr(model.teacher.backbone, "masked_embed")
    student_params, teacher_params = matched_parameters(model.student, model.teacher)
    assert len(student_params) == len(teacher_params) == len(list(model.teacher.parameters()))
    pairs = {id(t): s for s, t in zip(student_params, teacher_params)}
    assert pairs[id(t_head.last_layer.weight_v)] is s_head.last_layer.weight_v
    assert all(s is not model.student.backbone.masked_embed for s in student_params)


def test_ibot_forward_masks_and_pred_start_epoch(small_vits):
    torch.manual_seed(0)
    model = build_ibot(small_vits, pred_start_epoch=1)
    B = 2
    crops = [torch.randn(B, 3, 16, 16)] * 2 + [torch.randn(B, 3, 8, 8)] * 2
    masks = [torch.ones(B, 2, 2, dtype=torch.bool)] * 2
    loss, stats = model((crops, masks), 0, 0)  # before pred_start_epoch: masks zeroed
    assert stats["patch"].item() == 0
    loss.backward()
    assert model.student.backbone.masked_embed.grad is not None  # in the graph all the same
    loss, stats = model((crops, masks), 1, 2)
    assert stats["patch"].item() > 0
    assert set(stats) == {"cls", "patch", "teacher_temp", "teacher_patch_temp", "acc",
                          "teacher_entropy", "teacher_batch_entropy", "kl"}
    assert set(model.checkpoint_modules()) == {"student", "teacher", "ibot_loss"}
    assert "center2" in model.ibot_loss.state_dict()
    # without masked image modelling the student has no masked_embed; masks still pick the patches
    plain = build_ibot(small_vits, use_masked_im_modeling=False)
    assert not hasattr(plain.student.backbone, "masked_embed")
    loss, stats = plain((crops, masks), 0, 0)
    assert torch.isfinite(loss) and stats["patch"].item() > 0


# ============ flags ============

def test_flags_mirror_official_defaults_and_parse_booleans():
    from train_ssl import parse_args
    a = parse_args(["--method", "dino"])
    assert (a.arch, a.out_dim, a.norm_last_layer, a.momentum_teacher, a.teacher_temp,
            a.warmup_teacher_temp_epochs, a.local_crops_number, a.global_crops_size,
            a.local_crops_size, a.batch_size_per_gpu, a.lr, a.clip_grad, a.drop_path_rate,
            a.saveckp_freq) == ("vit_small", 65536, True, 0.996, 0.04, 0, 8, 224, 96, 64,
                                0.0005, 3.0, 0.1, 20)
    assert list(a.global_crops_scale) == [0.4, 1.0]
    b = parse_args(["--method", "ibot", "--norm_last_layer", "false", "--drop_path", "0.2",
                    "--pred_ratio", "0", "0.3", "--pred_ratio_var", "0", "0.2"])
    assert (b.out_dim, b.patch_out_dim, b.shared_head, b.shared_head_teacher, b.norm_last_layer,
            b.drop_path_rate, b.batch_size_per_gpu, b.saveckp_freq, b.warmup_teacher_temp_epochs,
            b.teacher_patch_temp, b.local_crops_number, b.pred_ratio) == \
        (8192, 8192, False, True, False, 0.2, 128, 40, 30, 0.07, 0, [0.0, 0.3])
    assert list(b.global_crops_scale) == [0.14, 1.0]
    with pytest.raises(SystemExit):
        parse_args(["--method", "dino", "--norm_last_layer", "maybe"])


def test_check_args_rejects_bad_flags():
    args = method_args("dino", global_crops_scale=[0.4])
    with pytest.raises(ValueError, match="^--global_crops_scale"):
        dino.check_args(args)
    with pytest.raises(ValueError, match="^iBOT predicts patch tokens"):
        ibot.check_args(method_args("ibot", arch="resnet18"))
    with pytest.raises(ValueError, match="^--pred_ratio 0.3 with --pred_ratio_var 0.5"):
        ibot.check_args(method_args("ibot", pred_ratio_var=[0.5]))
    # input_size only reads the flags: it no longer validates them
    assert dino.input_size(args, None) == args.global_crops_size


# ============ attention maps ============

def test_attention_maps_shape_and_rows_sum_to_one():
    torch.manual_seed(0)
    vit = tiny_vit().eval()
    img = torch.randn(1, 3, 16, 12)
    full = vit.get_last_selfattention(img)
    assert full.shape == (1, 3, 1 + 4 * 3, 1 + 4 * 3)
    torch.testing.assert_close(full.sum(-1), torch.ones(1, 3, 13))
    maps = va.cls_attention_maps(vit, img)
    assert maps.shape == (3, 4, 3)
    torch.testing.assert_close(maps.sum((1, 2)) + full[0, :, 0, 0], torch.ones(3))


def test_threshold_masks_keep_smallest_set_holding_the_mass():
    torch.manual_seed(0)
    attn = torch.rand(4, 5, 6) ** 3
    for th in (0.3, 0.6, 0.9):
        masks = va.threshold_masks(attn, th)
        for h in range(4):
            a = attn[h].flatten() / attn[h].sum()
            order = a.argsort(descending=True)
            k = next(k for k in range(1, len(a) + 1) if a[order[:k]].sum() >= th)  # slow reference
            expected = torch.zeros(len(a), dtype=torch.bool)
            expected[order[:k]] = True
            assert torch.equal(masks[h].flatten(), expected), (th, h)


# ============ end to end: torchrun (gloo, 2 processes), resume, eval, visualisation ============

def _npy_dataset(root, n_train=64, n_test=32, size=16):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split).mkdir(parents=True)
        labels = rng.integers(0, 4, n)
        images = (rng.random((n, size, size, 3)) * 60).astype(np.uint8)
        for i, label in enumerate(labels):  # a bright square whose place depends on the class
            y, x = divmod(int(label), 2)
            images[i, y * 8:y * 8 + 8, x * 8:x * 8 + 8] += 150
        np.save(root / split / "images.npy", images)
        np.save(root / split / "labels.npy", labels)


def _argv(method, data, out, epochs, extra=()):
    """`train_ssl.py` flags of a 2-epoch run of 4 steps per epoch on 2 ranks (8 x 2 images)."""
    return ["--method", method, "--dataset", "npy", "--data_path", str(data),
            "--arch", "vit_nano", "--patch_size", "8", "--global_crops_size", "16",
            "--local_crops_size", "8", "--local_crops_number", "2", "--out_dim", "64",
            "--batch_size_per_gpu", "8", "--epochs", str(epochs), "--warmup_epochs", "0",
            "--num_workers", "0", "--knn_eval", "false", "--tensorboard", "false",
            "--output_dir", str(out), "--print_freq", "100", *extra]


def _two_ranks(starts):
    """Run {method: (argv, log)} side by side, each as 2 gloo ranks; returns rank 0's logs.

    Each rank is a fork of this process running train_ssl.py's entry point with the
    environment torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    no interpreter start and torch import per rank (tests/test_preempt.py's Run). torchrun
    itself, launching and resuming train_ssl.py, is tests/test_train.py's 2-process run."""
    from test_preempt import Run
    runs = {m: Run(argv, log, world_size=2) for m, (argv, log) in starts.items()}
    try:
        for run in runs.values():
            run.finish()
    finally:
        for run in runs.values():
            run.kill()
    return {m: run.text(0) for m, run in runs.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DINO and iBOT, each on 2 ranks: 1 epoch, then the same command with --epochs 2 resumes
    (4 iterations per epoch). The two methods run side by side (4 processes on 2 cores)."""
    tmp = tmp_path_factory.mktemp("runs")
    _npy_dataset(tmp / "data")
    extra = {"dino": (), "ibot": ("--patch_out_dim", "64", "--pred_ratio", "0", "0.5",
                                  "--pred_ratio_var", "0", "0.2")}
    logs = [_two_ranks({m: (_argv(m, tmp / "data", tmp / m, epochs, extra[m]), tmp / f"{m}_{epochs}")
                        for m in extra}) for epochs in (1, 2)]
    first, second = logs
    return tmp, {m: (first[m], second[m]) for m in extra}


@pytest.mark.parametrize("method,loss_key", [("dino", "dino_loss"), ("ibot", "ibot_loss")])
def test_two_rank_run_resumes_with_official_checkpoint_keys(runs, method, loss_key):
    tmp, logs = runs
    first, second = logs[method]
    assert "Found checkpoint" not in first
    assert "Found checkpoint" in second and f"Starting {method} training from epoch 1" in second
    ckpt = load_file(str(tmp / method / "checkpoint.pth"))
    assert ckpt["epoch"] == 2
    assert {"student", "teacher", "optimizer", loss_key, "args", "epoch"} <= set(ckpt)
    assert ckpt[loss_key]["center"].shape == (1, 64) and ckpt[loss_key]["center"].abs().sum() > 0
    assert "head.last_layer.weight_g" in ckpt["teacher"]
    assert "backbone.cls_token" in ckpt["student"]
    lines = [json.loads(l) for l in (tmp / method / "log.txt").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [0, 1] and all(math.isfinite(l["train_loss"]) for l in lines)
    if method == "ibot":
        assert "backbone.masked_embed" in ckpt["student"]
        assert "backbone.masked_embed" not in ckpt["teacher"]
        assert ckpt[loss_key]["center2"].shape == (1, 1, 64)
        assert "train_patch" in lines[0] and "train_acc" in lines[0]
    # eval_knn.py --checkpoint_key teacher: the teacher backbone loads strictly (no missing keys)
    backbone, _ = build_backbone("vit_nano", patch_size=8, img_size=[16])
    msg = load_pretrained_weights(backbone, str(tmp / method / "checkpoint.pth"), "teacher")
    assert not msg.missing_keys and not msg.unexpected_keys
    teacher_sd = {k[len("backbone."):]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
    torch.testing.assert_close(backbone.state_dict()["pos_embed"], teacher_sd["pos_embed"])


def test_visualize_attention_reads_flags_from_released_weights(tmp_path):
    """A bare backbone state dict (like dino_deitsmall8_pretrain.pth) has no args: --arch and
    --patch_size come from the patch embedding (192 wide: vit_tiny; 8 x 8 kernels)."""
    backbone, _ = build_backbone("vit_tiny", patch_size=8, img_size=[224])
    torch.save(backbone.state_dict(), tmp_path / "released.pth")
    args = va.get_args_parser().parse_args([
        "--pretrained_weights", str(tmp_path / "released.pth"), "--image_size", "24", "32",
        "--output_dir", str(tmp_path / "out")])
    attentions = va.main(args)
    assert (args.arch, args.patch_size) == ("vit_tiny", 8)
    assert attentions.shape == (3, 3, 4)
    assert not (tmp_path / "out" / "mask_th0.6_head0.png").exists()  # no --threshold, no masks


def test_visualize_attention_on_trained_checkpoint(runs, tmp_path):
    tmp, _ = runs
    args = va.get_args_parser().parse_args([
        "--pretrained_weights", str(tmp / "dino" / "checkpoint.pth"), "--dataset", "npy",
        "--data_path", str(tmp / "data"), "--output_dir", str(tmp_path), "--threshold", "0.6"])
    attentions = va.main(args)
    assert (args.arch, args.patch_size) == ("vit_nano", 8)  # read from the checkpoint's args
    assert attentions.shape == (3, 2, 2)
    from PIL import Image
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(["img.png", "attention.png"] + [f"attn-head{j}.png" for j in range(3)]
                           + [f"mask_th0.6_head{j}.png" for j in range(3)])
    assert Image.open(tmp_path / "attn-head0.png").size == (256, 256)  # 16px x display scale 16


# ============ bench/official_dino.py ============

def test_official_side_by_side_needs_the_official_clone(tmp_path):
    """The side-by-side imports facebookresearch/dino from --official_path (nothing vendored):
    without a clone there, one line saying what to clone."""
    from bench import official_dino
    with pytest.raises(ValueError, match="no main_dino.py, utils.py, vision_transformer.py; "
                                         "clone https://github.com/facebookresearch/dino"):
        official_dino.main(["--official_path", str(tmp_path)])
    assert "--official_path" in official_dino.get_args_parser().format_help()
