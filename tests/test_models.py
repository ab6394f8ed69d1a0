"""CPU tests for models/: official key layout, attention and positional-embedding interpolation
against slow references written here, iBOT masking, stochastic depth, torchvision ResNet parity."""
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from models import (ARCHS, build_backbone, extract_features, feature_dim, is_vit, layerwise_features)
from models.resnet import BasicBlock, Bottleneck, resnet18, resnet34, resnet50
from models.vision_transformer import DropPath, VisionTransformer, vit_small, vit_tiny


def small_vit(**kwargs):
    """A depth-2 ViT on 32x32 images with 4x4 patches (8x8 = 64 patches), official-style norm."""
    cfg = dict(img_size=[32], patch_size=4, embed_dim=48, depth=2, num_heads=3, qkv_bias=True,
               norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(kwargs)
    torch.manual_seed(0)
    return VisionTransformer(**cfg).eval()


def randomize_(model, std=0.2):
    """Replace the tiny init by larger random weights, so attention is far from uniform."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, std)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.)  # LayerNorm gains around 1, not around 0
    return model


# ============ ViT: state_dict layout ============

BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias"]


def test_vit_small_state_dict_matches_official_layout():
    model = vit_small(patch_size=16)
    sd = model.state_dict()
    expected = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    expected += [f"blocks.{i}.{k}" for i in range(12) for k in BLOCK_KEYS]
    expected += ["norm.weight", "norm.bias"]
    assert list(sd) == expected  # same names and order as dino_deitsmall16_pretrain.pth
    assert len(sd) == 150
    D = 384
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 197, D), "patch_embed.proj.weight": (D, 3, 16, 16),
              "patch_embed.proj.bias": (D,), "blocks.11.attn.qkv.weight": (3 * D, D),
              "blocks.11.attn.qkv.bias": (3 * D,), "blocks.0.attn.proj.weight": (D, D),
              "blocks.0.mlp.fc1.weight": (4 * D, D), "blocks.0.mlp.fc2.weight": (D, 4 * D), "norm.weight": (D,)}
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert sum(p.numel() for p in model.parameters()) == 21_665_664  # ViT-S/16 without classifier
    assert model.embed_dim == model.num_features == D and model.patch_size == 16
    assert model.norm.eps == 1e-6 and model.blocks[0].attn.scale == (D // 6) ** -0.5


def test_vit_optional_keys_and_init():
    m = small_vit(masked_im_modeling=True, num_classes=10)
    keys = list(m.state_dict())
    assert keys[:4] == ["cls_token", "pos_embed", "masked_embed", "patch_embed.proj.weight"]
    assert keys[-4:] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert m.masked_embed.shape == (1, 48) and torch.count_nonzero(m.masked_embed) == 0
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # init: trunc_normal(0.02) tokens and Linear weights, zero biases, LayerNorm 1/0
    assert 0.01 < m.pos_embed.std() < 0.03 and 0.01 < m.blocks[0].attn.qkv.weight.std() < 0.03
    assert torch.count_nonzero(m.blocks[1].mlp.fc1.bias) == 0
    assert torch.all(m.blocks[0].norm1.weight == 1) and torch.count_nonzero(m.blocks[0].norm1.bias) == 0
    mp = small_vit(use_mean_pooling=True)
    keys = list(mp.state_dict())
    assert "norm.weight" not in keys and keys[-2:] == ["fc_norm.weight", "fc_norm.bias"]
    assert isinstance(mp.norm, nn.Identity)


# ============ ViT: attention ============

def slow_forward(model, x, scale):
    """Explicit-softmax ViT forward on the model's weights; returns (normed CLS, last attention)."""
    x = model.prepare_tokens(x)
    for blk in model.blocks:
        B, N, C = x.shape
        h = blk.attn.num_heads
        qkv = F.linear(blk.norm1(x), blk.attn.qkv.weight, blk.attn.qkv.bias)
        q, k, v = qkv.reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(y, blk.attn.proj.weight, blk.attn.proj.bias)
        hid = F.gelu(F.linear(blk.norm2(x), blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        x = x + F.linear(hid, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return model.norm(x)[:, 0], attn


@pytest.mark.parametrize("qk_scale", [None, 0.1])
def test_sdpa_matches_explicit_softmax(qk_scale):
    model = randomize_(small_vit(qk_scale=qk_scale), std=0.3)
    x = torch.randn(3, 3, 32, 32)
    scale = qk_scale or (48 // 3) ** -0.5
    with torch.no_grad():
        ref, ref_attn = slow_forward(model, x, scale)
        out = model(x)
        attn = model.get_last_selfattention(x)
        wrong, _ = slow_forward(model, x, scale * 1.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert attn.shape == (3, 3, 65, 65)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 3, 65))
    torch.testing.assert_close(attn, ref_attn, rtol=1e-5, atol=1e-6)
    # the comparison has teeth: attention is peaked, and a wrong scale shows up
    assert attn.max() > 0.5
    assert (wrong - ref).abs().max() > 1e-2


def test_autocast_bf16_runs_and_keeps_shapes():
    model = small_vit(masked_im_modeling=True)
    x = torch.randn(2, 3, 32, 24)
    mask = torch.zeros(2, 8, 6, dtype=torch.bool)
    mask[:, :2] = True
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, return_all_tokens=True, mask=mask)
        attn = model.get_last_selfattention(x)
    assert out.shape == (2, 49, 48) and torch.isfinite(out.float()).all()
    assert attn.shape == (2, 3, 49, 49)
    torch.testing.assert_close(attn.float().sum(-1), torch.ones(2, 3, 49), atol=2e-2, rtol=0)


# ============ ViT: positional-embedding interpolation ============

def cubic_weights(n_in, n_out, scale):
    """(n_out, n_in) matrix of PyTorch's bicubic (A=-0.75, align_corners=False, border clamp),
    sampling at src = (dst + 0.5) / scale - 0.5 when a scale_factor is given."""
    A = -0.75

    def k(t):
        t = abs(t)
        if t <= 1:
            return ((A + 2) * t - (A + 3)) * t * t + 1
        if t < 2:
            return ((A * t - 5 * A) * t + 8 * A) * t - 4 * A
        return 0.

    W = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) / scale - 0.5
        i0 = math.floor(src)
        for j in range(i0 - 1, i0 + 3):
            W[o, min(max(j, 0), n_in - 1)] += k(src - j)
    return W


def slow_interpolated_pos(pos_embed, H, W, p):
    """Reference of the official interpolation: (1, 1+N, D) -> (1, 1 + (H/p)(W/p), D), float64."""
    N, D = pos_embed.shape[1] - 1, pos_embed.shape[2]
    side = int(math.sqrt(N))
    h0, w0 = H // p, W // p
    grid = pos_embed[0, 1:].double().numpy().reshape(side, side, D)
    Wh = cubic_weights(side, h0, (h0 + 0.1) / math.sqrt(N))
    Ww = cubic_weights(side, w0, (w0 + 0.1) / math.sqrt(N))
    out = np.einsum("ai,ijd,bj->abd", Wh, grid, Ww).reshape(h0 * w0, D)
    return np.concatenate([pos_embed[0, :1].double().numpy(), out])[None]


@pytest.mark.parametrize("img_size,patch,H,W", [(32, 4, 32, 24), (32, 4, 16, 16), (224, 16, 96, 96),
                                                (32, 4, 24, 32), (32, 4, 48, 40)])
def test_interpolate_pos_encoding_matches_slow_reference(img_size, patch, H, W):
    model = small_vit(img_size=[img_size], patch_size=patch, embed_dim=24, depth=1)
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        tokens = model.prepare_tokens(x)
        pos = model.interpolate_pos_encoding(tokens, H, W)
    n = (H // patch) * (W // patch)
    assert tokens.shape == (2, 1 + n, 24) and pos.shape == (1, 1 + n, 24)
    ref = slow_interpolated_pos(model.pos_embed.detach(), H, W, patch)
    np.testing.assert_allclose(pos.double().numpy(), ref, atol=1e-6, rtol=0)
    # size= (no +0.1 scale factor) samples elsewhere: the implementation must not be doing that
    side = img_size // patch
    grid = model.pos_embed.detach()[:, 1:].reshape(1, side, side, 24).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(H // patch, W // patch), mode="bicubic")
    by_size = by_size.permute(0, 2, 3, 1).reshape(1, n, 24)
    assert (by_size - pos[:, 1:]).abs().max() > 1e-3


def test_interpolate_pos_encoding_same_size_is_identity():
    model = small_vit()
    tokens = model.prepare_tokens(torch.randn(1, 3, 32, 32))
    assert model.interpolate_pos_encoding(tokens, 32, 32) is model.pos_embed
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 24), return_all_tokens=True)
    assert out.shape == (2, 1 + 8 * 6, 48)


# ============ ViT: iBOT masking, pooling, outputs ============

def test_masked_embed_replaces_exactly_masked_patches_before_pos_embed():
    model = small_vit(masked_im_modeling=True)
    with torch.no_grad():
        model.masked_embed.normal_()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 8, 8) < 0.4
    with torch.no_grad():
        plain = model.prepare_tokens(x)
        masked = model.prepare_tokens(x, mask=mask)
    m = mask.flatten(1)  # (B, N), row-major like the patch tokens
    torch.testing.assert_close(masked[:, 0], plain[:, 0])  # CLS untouched
    torch.testing.assert_close(masked[:, 1:][~m], plain[:, 1:][~m])
    expected = (model.masked_embed + model.pos_embed[0, 1:]).detach().expand(2, -1, -1)[m]
    torch.testing.assert_close(masked[:, 1:][m], expected)
    # masking changes the forward; an all-False mask does not
    with torch.no_grad():
        assert not torch.allclose(model(x, mask=mask), model(x))
        torch.testing.assert_close(model(x, mask=torch.zeros_like(mask)), model(x))
    with pytest.raises(ValueError, match="masked_im_modeling"):
        small_vit().prepare_tokens(x, mask=mask)


def test_forward_outputs_and_intermediate_layers():
    model = randomize_(small_vit(depth=3), std=0.05)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls = model(x)
        tokens = model(x, return_all_tokens=True)
        inter = model.get_intermediate_layers(x, n=2)
    assert cls.shape == (2, 48) and tokens.shape == (2, 65, 48)
    torch.testing.assert_close(tokens[:, 0], cls)
    assert len(inter) == 2 and inter[0].shape == (2, 65, 48)
    torch.testing.assert_close(inter[-1][:, 0], cls)
    torch.testing.assert_close(model.get_intermediate_layers(x, n=1)[0], tokens)
    # constructor default for return_all_tokens, overridable per call
    m2 = small_vit(return_all_tokens=True)
    assert m2(x).shape == (2, 65, 48) and m2(x, return_all_tokens=False).shape == (2, 48)


def test_mean_pooling_puts_fc_norm_of_patch_mean_in_cls_slot():
    model = randomize_(small_vit(use_mean_pooling=True), std=0.05)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        last = model.get_intermediate_layers(x)[0]  # norm is Identity: the raw last block output
        tokens = model(x, return_all_tokens=True)
    torch.testing.assert_close(out, model.fc_norm(last[:, 1:].mean(1)))
    torch.testing.assert_close(tokens[:, 1:], last[:, 1:])


def test_extract_features_layouts():
    model = randomize_(small_vit(depth=3), std=0.05)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        inter = model.get_intermediate_layers(x, n=2)
        f0 = extract_features(model, x)
        f0n2 = extract_features(model, x, n_last_blocks=2)
        f1 = extract_features(model, x, avgpool_patchtokens=1)
        f2 = extract_features(model, x, n_last_blocks=2, avgpool_patchtokens=2)
        torch.testing.assert_close(f0, model(x))
    patch_mean = inter[-1][:, 1:].mean(1)
    torch.testing.assert_close(f0n2, torch.cat([inter[0][:, 0], inter[1][:, 0]], -1))
    torch.testing.assert_close(f1, patch_mean)
    torch.testing.assert_close(f2, torch.cat([inter[0][:, 0], inter[1][:, 0], patch_mean], -1))
    for n, a, f in [(1, 0, f0), (2, 0, f0n2), (1, 1, f1), (2, 2, f2)]:
        assert f.shape == (2, feature_dim(model, n, a))
    with pytest.raises(ValueError, match="avgpool_patchtokens 3"):
        extract_features(model, x, avgpool_patchtokens=3)
    with pytest.raises(ValueError, match="n_last_blocks 4"):
        feature_dim(model, n_last_blocks=4)


def test_layerwise_features():
    model = small_vit(depth=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = layerwise_features(model, x)
        assert len(feats) == 3 and all(f.shape == (2, 48) for f in feats)
        torch.testing.assert_close(feats[-1], model(x))
        rn = resnet18(cifar_stem=True).eval()
        stages = layerwise_features(rn, x)
        assert [tuple(s.shape) for s in stages] == [(2, 64), (2, 128), (2, 256), (2, 512)]
        torch.testing.assert_close(stages[-1], rn(x))
    stages = resnet50().eval().forward_stages(torch.randn(1, 3, 64, 64))
    assert [s.shape[1] for s in stages] == [256, 512, 1024, 2048]


# ============ stochastic depth ============

def test_drop_path_eval_identity_and_train_per_sample():
    dp = DropPath(0.3)
    x = torch.randn(4000, 3, 5)
    dp.eval()
    assert dp(x) is x
    dp.train()
    torch.manual_seed(0)
    out = dp(x)
    ratio = out / x
    kept = torch.isclose(ratio, torch.full_like(ratio, 1 / 0.7))
    dropped = out == 0
    # every sample is either dropped as a whole or kept and rescaled as a whole
    assert torch.all(kept.flatten(1).all(1) | dropped.flatten(1).all(1))
    frac = dropped.flatten(1).all(1).float().mean().item()
    assert abs(frac - 0.3) < 0.04
    assert torch.equal(DropPath(0.).train()(x), x)


def test_drop_path_is_one_pass_over_its_input():
    """The per-sample scale is computed on the B draws; x is read and written once."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if torch.is_tensor(out) and out.shape == x.shape:
                Count.n += 1
            return out

    x = torch.randn(64, 5, 8)
    with Count():
        DropPath(0.3).train()(x)
    assert Count.n == 1


def test_drop_path_is_torchvisions_stochastic_depth_draw_for_draw():
    """DropPath is torchvision.ops.stochastic_depth(mode="row"): the same masks for the same
    seed as DINO's drop_path written with one Bernoulli draw per sample (which it replaced)."""
    def dino_drop_path(x, drop_prob):
        keep_prob = 1. - drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask.div_(keep_prob)

    x = torch.randn(256, 17, 8)
    for p in (0.1, 0.5):
        torch.manual_seed(3)
        ours = DropPath(p).train()(x)
        torch.manual_seed(3)
        assert torch.equal(ours, dino_drop_path(x, p))
    assert torch.equal(DropPath(1.0).train()(x), torch.zeros_like(x))  # no 0/0 at p = 1


def test_drop_path_rates_increase_linearly():
    model = small_vit(depth=4, drop_path_rate=0.3)
    rates = [blk.drop_path.drop_prob for blk in model.blocks]
    assert rates == pytest.approx([0., 0.1, 0.2, 0.3])
    model.train()
    x = torch.randn(8, 3, 32, 32)
    assert not torch.allclose(model(x), model(x))  # stochastic in training
    model.eval()
    torch.testing.assert_close(model(x), model(x))


# ============ ResNet ============

@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_matches_torchvision(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)().eval()
    ours = {"resnet18": resnet18, "resnet50": resnet50}[name](num_classes=1000).eval()
    tv_sd, our_sd = tv.state_dict(), ours.state_dict()
    assert list(our_sd) == list(tv_sd)
    assert all(our_sd[k].shape == v.shape for k, v in tv_sd.items())
    ours.load_state_dict(tv_sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)


def test_resnet_features_and_cifar_stem():
    assert resnet18()(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    assert resnet34().embed_dim == 512 and resnet50().num_features == 2048
    assert not any(k.startswith("fc") for k in resnet50().state_dict())  # DINO RN50 weights have no fc
    model = resnet18(cifar_stem=True)
    assert model.conv1.weight.shape == (64, 3, 3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert list(model.state_dict()) == list(resnet18().state_dict())
    seen = []
    model.layer4.register_forward_hook(lambda m, i, o: seen.append(o.shape) and None)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert seen == [(2, 512, 4, 4)]  # 32 / 8, instead of 1x1 with the ImageNet stem


def test_resnet_zero_init_residual():
    for builder, block, bn in [(resnet18, BasicBlock, "bn2"), (resnet50, Bottleneck, "bn3")]:
        model = builder(zero_init_residual=True)
        blocks = [m for m in model.modules() if isinstance(m, block)]
        assert len(blocks) in (8, 16)
        assert all(torch.count_nonzero(getattr(b, bn).weight) == 0 for b in blocks)
        assert torch.all(blocks[0].bn1.weight == 1)
        plain = builder()
        assert all(torch.all(getattr(b, bn).weight == 1) for b in plain.modules() if isinstance(b, block))


# ============ build_backbone ============

def test_build_backbone():
    assert ARCHS == ["vit_nano", "vit_tiny", "vit_small", "vit_base", "resnet18", "resnet34", "resnet50"]
    nano, dim = build_backbone("vit_nano", patch_size=4, img_size=16)
    assert dim == 192 and len(nano.blocks) == 4 and nano.blocks[0].attn.num_heads == 3
    model, dim = build_backbone("deit_tiny", patch_size=8, img_size=32, drop_path_rate=0.1,
                                masked_im_modeling=True, return_all_tokens=True)
    assert is_vit(model) and dim == 192 and model.patch_size == 8 and model.pos_embed.shape == (1, 17, 192)
    assert hasattr(model, "masked_embed") and model.return_all_tokens
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert isinstance(model.head, nn.Identity)
    model, dim = build_backbone("resnet18", patch_size=4, img_size=32, drop_path_rate=0.1, cifar_stem=True,
                                masked_im_modeling=True, zero_init_residual=True)
    assert not is_vit(model) and dim == 512 and model.conv1.kernel_size == (3, 3)
    assert torch.count_nonzero(model.layer1[0].bn2.weight) == 0
    assert isinstance(model.fc, nn.Identity)
    with pytest.raises(ValueError, match="unknown --arch 'vit_huge'.*vit_small"):
        build_backbone("vit_huge")
    assert isinstance(vit_tiny(), VisionTransformer)
