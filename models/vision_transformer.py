"""Vision Transformer as in DINO, with the iBOT extras (mean pooling, masked image modelling).

Written from scratch after facebookresearch/dino `vision_transformer.py` and bytedance/ibot
`models/vision_transformer.py`. Parameter names, init and the positional-embedding
interpolation are the official ones, so released DINO/iBOT backbone weights (for example
dino_deitsmall16_pretrain.pth) load with `strict=True` and give the same outputs.

Differences from the official code, none of which changes the result:
- attention runs through `F.scaled_dot_product_attention` (fused kernels on GPU); the explicit
  softmax is only computed when the attention map itself is asked for;
- masking replaces tokens with `torch.where` rather than boolean-index assignment, which keeps
  the forward free of host-device syncs;
- mean pooling writes the CLS slot with `torch.cat` instead of an in-place assignment.
"""
import math
from functools import partial

import torch
import torch.nn as nn
from torchvision.ops import stochastic_depth
import torch.nn.functional as F


class DropPath(nn.Module):
    """Stochastic depth: zero the residual branch of whole samples with probability `drop_prob`.

    Kept samples are scaled by 1 / (1 - drop_prob) so the expectation is unchanged. This is
    torchvision.ops.stochastic_depth in "row" mode: one Bernoulli draw per sample, scaled on its
    own B values, then one pass over x (tests/test_models.py checks it draw for draw against
    DINO's drop_path written with the same draw). Kept as a module with DINO's name and
    `drop_prob`, which the official ViT's repr and our tests read.
    """

    def __init__(self, drop_prob=0.):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return stochastic_depth(x, self.drop_prob, "row", self.training)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, drop=0.):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()  # exact (erf) GELU, as the official code
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop  # a probability handed to SDPA, not a module: no state_dict entry either way
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, return_attention=False):
        """x: (B, N, C) -> (B, N, C), or the softmax attention (B, heads, N, N) if return_attention."""
        B, N, C = x.shape
        # (B, N, 3C) -> (3, B, heads, N, C/heads), the official memory layout of the fused qkv weight
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if return_attention:
            # slow path, only for visualisation: the (B, heads, N, N) map is materialised
            return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0., scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0., attn_drop=0.,
                 drop_path=0., norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x, return_attention=False):
        if return_attention:
            return self.attn(self.norm1(x), return_attention=True)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D channels. Returns the (B, D, H/p, W/p) map, not yet flattened."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x)


def resize_pos_embed(pos_embed, patch_size, w, h):
    """The positional embedding (1, 1+N, D) of a sqrt(N) x sqrt(N) grid resized for an image of
    height w, width h: (1, 1 + (w/p)(h/p), D), the class token's row kept.

    Official semantics (facebookresearch/dino `interpolate_pos_encoding`; "w" is the height):
    bicubic resize of the grid with scale_factor (w0 + 0.1) / sqrt(N). The +0.1 makes the output
    size floor() land on w0 despite float error (https://github.com/facebookresearch/dino/issues/8);
    the sampling positions then follow that scale factor, so `size=(w0, h0)` would give other
    values. The ViT's forward and export_official.py both call this one function, so an exported
    224px table equals what the ViT computes at 224px.
    """
    N = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch_size, h // patch_size
    side = int(math.sqrt(N))
    if side * side != N:
        raise ValueError(f"pos_embed holds {N + 1} tokens, not a class token plus a square grid "
                         "of patches (e.g. a DeiT checkpoint with a distillation token); only "
                         "DINO/iBOT-style ViTs (one class token) are supported")
    # interpolate in float32 whatever the autocast dtype
    patch_pos = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, scale_factor=((w0 + 0.1) / math.sqrt(N), (h0 + 0.1) / math.sqrt(N)),
                              mode="bicubic")
    assert patch_pos.shape[-2:] == (w0, h0), (patch_pos.shape, w0, h0)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, w0 * h0, dim).to(pos_embed.dtype)
    return torch.cat((pos_embed[:, :1], patch_pos), dim=1)


class VisionTransformer(nn.Module):
    """ViT backbone. `forward` returns the normed CLS token (B, D), or all tokens (B, 1+N, D)."""

    def __init__(self, img_size=[224], patch_size=16, in_chans=3, num_classes=0, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop_rate=0., attn_drop_rate=0.,
                 drop_path_rate=0., norm_layer=nn.LayerNorm, return_all_tokens=False,
                 masked_im_modeling=False, use_mean_pooling=False, **kwargs):
        super().__init__()
        # the official signature takes a list (img_size[0] is used); accept a plain int too
        img_size = img_size[0] if isinstance(img_size, (list, tuple)) else img_size
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.return_all_tokens = return_all_tokens

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # one embedding for CLS + the patches of an img_size x img_size image; other sizes are interpolated
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)

        # stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                  drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)])
        # iBOT mean pooling: the final norm moves to the pooled patch tokens (fc_norm)
        self.norm = nn.Identity() if use_mean_pooling else norm_layer(embed_dim)
        self.fc_norm = norm_layer(embed_dim) if use_mean_pooling else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=.02)
        nn.init.trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)

        # iBOT: created after the init pass, so it stays at zero (as the official code)
        self.masked_im_modeling = masked_im_modeling
        if masked_im_modeling:
            self.masked_embed = nn.Parameter(torch.zeros(1, embed_dim))

    def _init_weights(self, m):
        # the patch conv keeps PyTorch's default init, as the official code
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, x, w, h):
        """Positional embedding (1, 1+N', D) for tokens x (B, 1+N', D) of an image of height w,
        width h: the stored one when it already has N' patch positions and the image is square,
        else resize_pos_embed of it (the official semantics, names kept)."""
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, self.patch_size, w, h)

    def prepare_tokens(self, x, mask=None):
        """Images (B, C, H, W) -> tokens (B, 1+N, D) with N = (H/p)(W/p), CLS first, positions added.

        mask: optional bool (B, H/p, W/p); True patches are replaced by `masked_embed` before the
        positional embedding is added, so a masked token still knows where it is (iBOT).
        """
        B, _, w, h = x.shape
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major over the patch grid
        if mask is not None:
            if not hasattr(self, "masked_embed"):
                raise ValueError("a mask was given but the model was built with masked_im_modeling=False")
            x = torch.where(mask.flatten(1).unsqueeze(-1), self.masked_embed.to(x.dtype), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        return self.pos_drop(x)

    def forward(self, x, return_all_tokens=None, mask=None):
        """x: (B, C, H, W) -> head(normed CLS) (B, D), or all normed tokens (B, 1+N, D).

        With use_mean_pooling, fc_norm(mean of the patch tokens) takes the CLS slot (iBOT).
        """
        x = self.prepare_tokens(x, mask=mask)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if self.fc_norm is not None:
            x = torch.cat((self.fc_norm(x[:, 1:].mean(dim=1)).unsqueeze(1), x[:, 1:]), dim=1)
        if self.return_all_tokens if return_all_tokens is None else return_all_tokens:
            return x
        return self.head(x[:, 0])

    def get_last_selfattention(self, x):
        """Softmax attention of the last block, (B, heads, 1+N, 1+N)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_layers(self, x, n=1):
        """List of norm(x_i), each (B, 1+N, D), for the last n blocks (the same final norm for all)."""
        x = self.prepare_tokens(x)
        output = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                output.append(self.norm(x))
        return output


# The named sizes: (embed_dim, depth, num_heads). Any of the three can be overridden through
# the builders' keyword arguments (train_ssl.py's --embed_dim --depth --num_heads), e.g. the
# width 512, depth 8, 8 heads of the RotNet ViT recipe: vit_small(embed_dim=512, depth=8, num_heads=8).
VIT_SIZES = {"vit_nano": (192, 4, 3), "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),
             "vit_base": (768, 12, 12)}


def vit_size(name, embed_dim=None, depth=None, num_heads=None):
    """{embed_dim, depth, num_heads} of size `name` with the given ones (not None) replacing
    its own; a ValueError naming the flags when they cannot make a ViT."""
    shape = dict(zip(("embed_dim", "depth", "num_heads"), VIT_SIZES[name]))
    given = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
    shape.update({k: int(v) for k, v in given.items() if v is not None})
    if min(shape.values()) < 1:
        raise ValueError(f"--embed_dim {shape['embed_dim']}, --depth {shape['depth']} and "
                         f"--num_heads {shape['num_heads']} must all be >= 1")
    if shape["embed_dim"] % shape["num_heads"]:
        raise ValueError(f"--embed_dim {shape['embed_dim']} is not divisible by --num_heads "
                         f"{shape['num_heads']}: each head gets embed_dim / num_heads channels; "
                         "use a width that is a multiple of the heads (e.g. 64 per head)")
    return shape


def _vit(name, patch_size, kwargs):
    """The ViT of size `name` (vit_size: embed_dim / depth / num_heads of kwargs that are not
    None replace its own); mlp ratio 4, qkv bias and LayerNorm eps 1e-6 as every DINO size."""
    shape = vit_size(name, **{k: kwargs.pop(k, None) for k in ("embed_dim", "depth", "num_heads")})
    return VisionTransformer(patch_size=patch_size, mlp_ratio=4, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **shape, **kwargs)


def vit_nano(patch_size=16, **kwargs):
    """Not an official size: ViT-Tiny's width with 4 blocks instead of 12, a third of its cost per
    image, so a CPU learns something in a minute or two (the README's quickstart). At random init
    its k-NN features are as weak as ViT-Tiny's (46 vs 50 % 20-NN on 16px digits)."""
    return _vit("vit_nano", patch_size, kwargs)


def vit_tiny(patch_size=16, **kwargs):
    return _vit("vit_tiny", patch_size, kwargs)


def vit_small(patch_size=16, **kwargs):
    return _vit("vit_small", patch_size, kwargs)


def vit_base(patch_size=16, **kwargs):
    return _vit("vit_base", patch_size, kwargs)
