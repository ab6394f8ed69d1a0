"""Batched augmentations: uint8 images (B, 3, H, W) in, a method's views out, computed on the
images' device (CUDA when training on a GPU, the CPU otherwise) with independent random
parameters for every sample. They are the batched twins of the PIL recipes in
data/transforms.py, built from the very same objects, so one recipe serves both backends:

    pil = method.build_transform(args, info)      # TwoViewTransform, MultiCropTransform, ...
    batched = batched_transform(pil)              # its batched() or its row of BATCHED_RECIPES
    views = batched(images, seed=batch_seed(args.seed, epoch, it, rank))
    # views: what DataLoader(build_dataset(..., transform=pil)) collates for the same images:
    #   TwoViewTransform     [v1, v2], each float (B, 3, S, S), normalised
    #   MultiCropTransform   [g1, g2, ..., l1, ..., ln]
    #   SingleViewTransform / eval_transform   one float (B, 3, S, S)
    #   a method's own transform: what its batched() twin returns (methods/__init__.py)

Each view recipe is a torchvision Compose; BATCHED_OPS maps every op class it may hold to its
batched op (one table: a new augmentation is added there, an op missing from it is refused in
one line naming it, with --data_backend pil as the way out).

`images` may be a padded batch of images of different sizes: `sizes` (B, 2) gives each one's
(height, width), stored in its top-left corner; crops are drawn inside it.

How each op is done
- Geometry (RandomResizedCrop, Resize, RandomCrop with zero padding, CenterCrop, horizontal
  flip) is one pair of per-sample resampling matrices, out = Wy @ image @ Wx^T. Their rows are
  PIL's antialiased resampling weights (bicubic a = -0.5 or bilinear, widened by the scale
  factor when downscaling, renormalised at the crop border; torch's interpolate(antialias=True)
  uses the same), so a crop matches torchvision's resized_crop and PIL's resize. The flip
  reverses Wx's rows; RandomCrop's padding is rows of zeros. Crop boxes follow torchvision's
  RandomResizedCrop.get_params exactly: 10 tries of (area, log-ratio), the first that fits,
  else the central fallback crop, with integer boxes rounded as Python's round() does.
- Colour jitter (torchvision.ColorJitter inside RandomApply): torchvision applies brightness,
  contrast, saturation and hue in a random order drawn per image; here every sample draws its
  own permutation too. Brightness / contrast / saturation are blends x * f + (1 - f) * ref
  (ref = 0, mean grey level, grey image) clamped to [0, 1] after each, as torchvision's tensor
  ops do. Hue goes through HSV once per batch: the blends ranked before a sample's hue slot run
  first, then the hue shift (0 for samples without jitter), then the blends after it, so every
  sample sees its own order at the cost of 6 blends and 1 hue pass.
- Grayscale: ITU-R 601 luma (0.299, 0.587, 0.114), PIL's "L", copied to 3 channels.
- Gaussian blur: separable, a per-sample kernel per axis as one grouped convolution (groups =
  samples x channels), padding by index (any width). torchvision's GaussianBlur keeps
  its kernel size (data/transforms.py: 10 % of the view) and reflect padding; the PIL
  ImageFilter blur of the multi-crop recipe (RandomGaussianBlur) has no kernel size, so its
  kernel spans +-3 sigma_max (13 taps for radius 2) with edge replication, as PIL's box blurs.
  Samples that are not blurred get the identity kernel.
- Solarize (PIL threshold 128 of 255): x >= 128/255 -> 1 - x. Then Normalize(mean, std).
Everything stays in float32 on the device: no per-op uint8 rounding as in PIL (a crop differs
from PIL's by ~0.3 grey levels on average), and no host-device sync (no .item(), no boolean indexing), so on CUDA the
augmentation queues behind the previous training step.
"""
import math

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from core.amp import full_fp32

from .transforms import (MultiCropTransform, RandomGaussianBlur, SingleViewTransform,
                         TwoViewTransform)

__all__ = ["batch_seed", "make_generator", "batched_transform", "resized_crop",
           "sample_resized_crop_boxes", "BatchedView", "BatchedTwoView", "BatchedMultiCrop",
           "BatchedSingleView", "BATCHED_OPS", "BATCHED_RECIPES"]

# ============ randomness ============


def batch_seed(seed, epoch, it, rank):
    """The seed of one batch's augmentation, a hash of (seed, epoch, iteration, rank): the same
    batch gets the same views in every run, a run resumed at iteration `it` reproduces the views
    of an uninterrupted one without saving generator state, and neighbouring batches / ranks get
    unrelated streams (numpy's SeedSequence mixes the tuple)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(it), int(rank)])
    return int(state.generate_state(1, np.uint64)[0] >> np.uint64(1))  # 63 bits


def make_generator(seed, device):
    """torch.Generator on `device` seeded with `seed` (None: seeded from the global generator)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed)
    return gen


def _uniform(n, low, high, gen, device, dtype=torch.float32):
    return torch.rand(n, generator=gen, device=device, dtype=dtype) * (high - low) + low


def _bernoulli(n, p, gen, device):
    return torch.rand(n, generator=gen, device=device) < p


# ============ geometry: crop, resize, flip as resampling matrices ============

def _cubic(x, a=-0.5):
    """PIL's bicubic filter (a = -0.5; support 2)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, far) * (x < 2)


def _triangle(x):
    """Bilinear filter (support 1)."""
    return (1 - x.abs()).clamp_min(0)


_FILTERS = {InterpolationMode.BICUBIC: (_cubic, 2.0), InterpolationMode.BILINEAR: (_triangle, 1.0)}


def _interpolation(mode):
    if isinstance(mode, int):  # PIL constant, accepted by old torchvision versions
        mode = T.InterpolationMode(T.transforms._pil_interpolation_to_str[mode])
    if mode not in _FILTERS:
        raise ValueError(f"interpolation {mode} has no batched version; use "
                         f"InterpolationMode.BICUBIC or BILINEAR")
    return _FILTERS[mode]


def _resample_weights(out_len, in_len, start, length, resized, offset, filt, max_scale, flip=None):
    """(N, out_len, in_len) float32 matrices of one axis.

    Per sample: the interval [start, start + length) of the input axis is resampled to
    `resized` samples with PIL's antialiased weights (the filter widened by the scale factor
    length / resized when downscaling, renormalised over the interval); output i is resampled
    sample i + offset, or 0 outside [0, resized) (zero padding). flip reverses the output.
    start, length, resized, offset: (N,) tensors; flip: (N,) bool or None. filt: (filter,
    support); max_scale: an upper bound of length / resized, which sizes the band of taps
    evaluated (PIL's xmin..xmax) before they are scattered into the dense matrix."""
    device = start.device
    filt, support = filt
    start, length = start.double(), length.double()
    resized, offset = resized.double(), offset.double()
    r = torch.arange(out_len, device=device, dtype=torch.float64)[None] + offset[:, None]
    scale = length / resized
    widen = scale.clamp_min(1.0)
    center = start[:, None] + (r + 0.5) * scale[:, None]                       # (N, out)
    taps = min(2 * math.ceil(support * max(max_scale, 1.0)) + 2, in_len)
    first = torch.floor(center - support * widen[:, None] + 0.5)               # PIL's xmin
    if taps == in_len:
        first = torch.zeros_like(first)
    j = first[..., None] + torch.arange(taps, device=device, dtype=torch.float64)  # (N, out, T)
    w = filt(((j + 0.5 - center[..., None]) / widen[:, None, None]).float())
    inside = (j >= start[:, None, None]) & (j < (start + length)[:, None, None])
    w = w * inside
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    valid = (r >= 0) & (r < resized[:, None])
    w = w * valid[..., None]
    idx = j.long().clamp_(0, in_len - 1)  # taps outside the image carry weight 0
    dense = torch.zeros((w.shape[0], out_len, in_len), device=device, dtype=w.dtype)
    dense.scatter_add_(2, idx, w)
    if flip is not None:
        dense = torch.where(flip[:, None, None], dense.flip(1), dense)
    return dense


def _apply_axes(images, wy, wx):
    """images (B, C, H, W) float, wy (K, B, Sy, H), wx (K, B, Sx, W) -> (K * B, C, Sy, Sx).

    Columns first, all K views of an image in one product, so the image is never copied K
    times; then the rows of each view."""
    b, c, h, w = images.shape
    k, _, sy, _ = wy.shape
    sx = wx.shape[2]
    t = torch.bmm(images.reshape(b, c * h, w), wx.permute(1, 3, 0, 2).reshape(b, w, k * sx))
    t = t.reshape(b, c, h, k, sx).permute(3, 0, 1, 2, 4).reshape(k * b, c, h, sx)
    return wy.reshape(k * b, 1, sy, h).matmul(t)


@full_fp32()  # the resampling products stay exact under --tf32
def resized_crop(images, boxes, size, interpolation=InterpolationMode.BICUBIC, flip=None):
    """Crop boxes (B, 4) = (top, left, height, width) of images (B, C, H, W) (uint8 0..255 or
    float 0..1), resize each to `size` (int or (h, w)), optionally flip ((B,) bool).
    -> float (B, C, h, w) in the input's range (0..255 for uint8). The batched
    torchvision.transforms.functional.resized_crop(antialias=True)."""
    sy, sx = (size, size) if isinstance(size, int) else size
    filt = _interpolation(interpolation)
    boxes = boxes.to(images.device)
    top, left, h, w = boxes.unbind(1)
    zero = torch.zeros_like(top)
    x = images.float()
    wy = _resample_weights(sy, x.shape[2], top, h, torch.full_like(h, sy), zero, filt,
                           x.shape[2] / sy)
    wx = _resample_weights(sx, x.shape[3], left, w, torch.full_like(w, sx), zero, filt,
                           x.shape[3] / sx, flip)
    out = _apply_axes(x, wy[None], wx[None])
    return out.clamp(0, 255) if images.dtype == torch.uint8 else out.clamp(0, 1)


def sample_resized_crop_boxes(heights, widths, scale, ratio, gen=None):
    """torchvision's RandomResizedCrop.get_params for N images at once.

    heights, widths: (N,) image sizes. -> (N, 4) float64 (top, left, height, width), integers.
    As torchvision: up to 10 tries of area ~ U(scale) * H * W and log aspect ~ U(log ratio);
    the first box that fits is placed uniformly; if none fits, the whole image cropped to the
    nearest ratio in range, centred."""
    device = heights.device
    n = heights.shape[0]
    hh, ww = heights.double(), widths.double()
    area = (hh * ww)[:, None]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * _uniform((n, 10), scale[0], scale[1], gen, device).double()
    aspect = torch.exp(_uniform((n, 10), log_lo, log_hi, gen, device)).double()
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= ww[:, None]) & (h > 0) & (h <= hh[:, None])
    first = fits.int().argmax(1, keepdim=True)  # argmax returns the first maximum
    any_fit = fits.any(1)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    u = torch.rand((n, 2), generator=gen, device=device, dtype=torch.float64)

    in_ratio = ww / hh
    too_tall, too_wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fb_w = torch.where(too_wide, torch.round(hh * max(ratio)), ww)
    fb_h = torch.where(too_tall, torch.round(ww / min(ratio)), hh)
    h = torch.where(any_fit, h, fb_h)
    w = torch.where(any_fit, w, fb_w)
    top = torch.where(any_fit, torch.floor(u[:, 0] * (hh - h + 1)), torch.floor((hh - h) / 2))
    left = torch.where(any_fit, torch.floor(u[:, 1] * (ww - w + 1)), torch.floor((ww - w) / 2))
    return torch.stack([top, left, h, w], 1)


def _pair(size):
    if isinstance(size, int):
        return size, size
    size = tuple(size)
    return (size[0], size[0]) if len(size) == 1 else size


class _Geometry:
    """Resize? -> one of RandomResizedCrop / RandomCrop / CenterCrop -> horizontal flip?"""

    def __init__(self, resize, crop, flip_p):
        self.resize, self.crop, self.flip_p = resize, crop, flip_p
        if isinstance(crop, T.RandomResizedCrop):
            if resize is not None:
                raise ValueError("Resize before RandomResizedCrop has no batched version; "
                                 "drop the Resize")
            self.filt = _interpolation(crop.interpolation)
            self.out = _pair(crop.size)
        else:
            self.filt = _interpolation(resize.interpolation) if resize is not None else _FILTERS[InterpolationMode.BILINEAR]
            if resize is not None and getattr(resize, "max_size", None):
                raise ValueError("Resize(max_size=...) has no batched version; drop max_size")
            if crop is None:
                if resize is None or isinstance(resize.size, int) or len(resize.size) != 2:
                    raise ValueError("the batched views need a fixed output size: add a crop "
                                     "after Resize, or give Resize an (h, w) size")
                self.out = tuple(resize.size)
            else:
                self.out = _pair(crop.size)
            if isinstance(crop, T.RandomCrop):
                if crop.pad_if_needed or crop.padding_mode != "constant" or crop.fill != 0:
                    raise ValueError("RandomCrop has a batched version only with zero padding "
                                     "(padding_mode='constant', fill=0, pad_if_needed=False)")
                pad = crop.padding or 0
                pad = _pair(pad) if not isinstance(pad, int) else (pad, pad)
                if len(pad) != 2:
                    raise ValueError(f"RandomCrop padding {crop.padding} is asymmetric; give "
                                     "one int or (vertical, horizontal)")
                self.pad = pad[::-1] if not isinstance(crop.padding, int) else pad  # (y, x)

    def _resized(self, heights, widths):
        """Sizes after the Resize (per sample), float64."""
        hh, ww = heights.double(), widths.double()
        if self.resize is None:
            return hh, ww
        size = self.resize.size
        if isinstance(size, int) or len(size) == 1:
            s = float(size if isinstance(size, int) else size[0])
            # torchvision: the shorter side becomes s, the longer int(s * long / short)
            return (torch.where(hh <= ww, torch.full_like(hh, s), torch.floor(s * hh / ww)),
                    torch.where(ww <= hh, torch.full_like(ww, s), torch.floor(s * ww / hh)))
        return torch.full_like(hh, float(size[0])), torch.full_like(ww, float(size[1]))

    def _max_scale(self, h_in, w_in):
        """An upper bound of input / resized length on both axes, for images up to h_in x w_in."""
        if self.resize is None:
            return 1.0
        size = self.resize.size
        if isinstance(size, int) or len(size) == 1:  # the shorter side becomes s
            return max(h_in, w_in) / (size if isinstance(size, int) else size[0])
        return max(h_in / size[0], w_in / size[1])

    def sample(self, heights, widths, gen):
        n, device = heights.shape[0], heights.device
        params = {}
        if isinstance(self.crop, T.RandomResizedCrop):
            params["box"] = sample_resized_crop_boxes(heights, widths, self.crop.scale,
                                                      self.crop.ratio, gen)
        else:
            rh, rw = self._resized(heights, widths)
            oy, ox = self.out
            if isinstance(self.crop, T.RandomCrop):  # offsets into the zero-padded image
                (py, px), u = self.pad, torch.rand((n, 2), generator=gen, device=device,
                                                   dtype=torch.float64)
                off_y = torch.floor(u[:, 0] * (rh + 2 * py - oy + 1)) - py
                off_x = torch.floor(u[:, 1] * (rw + 2 * px - ox + 1)) - px
            elif isinstance(self.crop, T.CenterCrop):  # torchvision: round, or pad when smaller
                off_y = torch.where(rh >= oy, torch.round((rh - oy) / 2), -torch.floor((oy - rh) / 2))
                off_x = torch.where(rw >= ox, torch.round((rw - ox) / 2), -torch.floor((ox - rw) / 2))
            else:
                off_y, off_x = torch.zeros_like(rh), torch.zeros_like(rw)
            params.update(resized=torch.stack([rh, rw], 1), offset=torch.stack([off_y, off_x], 1))
        params["flip"] = _bernoulli(n, self.flip_p, gen, device)
        return params

    def apply(self, images, params, heights, widths, views):
        """images (B, C, H, W) float 0..255 -> (views * B, C, oy, ox) float 0..1."""
        (oy, ox), (_, _, h_in, w_in) = self.out, images.shape
        flip = params["flip"]
        if "box" in params:
            top, left, h, w = params["box"].unbind(1)
            zero = torch.zeros_like(top)
            wy = _resample_weights(oy, h_in, top, h, torch.full_like(h, oy), zero, self.filt,
                                   h_in / oy)
            wx = _resample_weights(ox, w_in, left, w, torch.full_like(w, ox), zero, self.filt,
                                   w_in / ox, flip)
        else:
            zero = torch.zeros_like(heights, dtype=torch.float64)
            max_scale = self._max_scale(h_in, w_in)
            wy = _resample_weights(oy, h_in, zero, heights, params["resized"][:, 0],
                                   params["offset"][:, 0], self.filt, max_scale)
            wx = _resample_weights(ox, w_in, zero, widths, params["resized"][:, 1],
                                   params["offset"][:, 1], self.filt, max_scale, flip)
        b = images.shape[0]
        out = _apply_axes(images, wy.reshape(views, b, oy, h_in), wx.reshape(views, b, ox, w_in))
        return (out * (1 / 255)).clamp_(0, 1)


# ============ colour ============

def _gray(x):
    """(N, 3, H, W) -> (N, 1, H, W), ITU-R 601-2 luma as PIL's convert("L")."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _adjust_hue(x, shift):
    """Rotate the hue of (N, 3, H, W) in [0, 1] by shift (N,) turns, through HSV."""
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    sat = delta / maxc.clamp_min(1e-8)
    d = delta.clamp_min(1e-8)
    r, g, b = x.unbind(1)
    hue = torch.where(maxc == r, (g - b) / d,
                      torch.where(maxc == g, 2 + (b - r) / d, 4 + (r - g) / d))
    hue = torch.remainder(hue / 6 + shift[:, None, None], 1.0)
    # HSV -> RGB, channel c = v - v s clamp(min(k, 4 - k), 0, 1), k = (n_c + 6 h) mod 6
    n_c = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype)  # 5, 3, 1 for R, G, B
    k = torch.remainder(n_c[None, :, None, None] + 6 * hue[:, None], 6)
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return maxc[:, None] * (1 - sat[:, None] * ramp)


BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


class _ColorJitter:
    def __init__(self, jitter, p):
        self.p = p
        self.ranges = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]

    def sample(self, n, gen, device):
        apply = _bernoulli(n, self.p, gen, device)
        factors = []
        for op, rng in enumerate(self.ranges):
            identity = 0.0 if op == HUE else 1.0
            f = torch.full((n,), identity, device=device) if rng is None else \
                _uniform(n, rng[0], rng[1], gen, device)
            factors.append(torch.where(apply, f, identity))
        order = torch.rand((n, 4), generator=gen, device=device).argsort(1)  # slot -> op
        return {"jitter": apply, "factors": torch.stack(factors, 1), "order": order}

    def _blend_slot(self, x, factors, order, slot, hue_slot, before):
        op = order[:, slot]
        chosen = (op != HUE) & ((slot < hue_slot) if before else (slot > hue_slot))
        f = torch.where(chosen, factors.gather(1, op[:, None])[:, 0], 1.0)[:, None, None, None]
        gray = _gray(x)
        op = op[:, None, None, None]
        ref = torch.where(op == SATURATION, gray,
                          torch.where(op == CONTRAST, gray.mean((2, 3), keepdim=True), 0.0))
        return torch.lerp(ref, x, f).clamp_(0, 1)  # f * x + (1 - f) * ref

    def apply(self, x, params):
        factors, order = params["factors"], params["order"]
        hue_slot = (order == HUE).int().argmax(1)
        for slot in range(3):  # slots that can come before hue
            x = self._blend_slot(x, factors, order, slot, hue_slot, before=True)
        if self.ranges[HUE] is not None:
            x = _adjust_hue(x, factors[:, HUE])
        for slot in range(1, 4):  # slots that can come after it
            x = self._blend_slot(x, factors, order, slot, hue_slot, before=False)
        return x


class _Grayscale:
    def __init__(self, p):
        self.p = p

    def sample(self, n, gen, device):
        return {"gray": _bernoulli(n, self.p, gen, device)}

    def apply(self, x, params):
        return torch.where(params["gray"][:, None, None, None], _gray(x).expand_as(x), x)


def _padded_index(n_pix, half, padding, device):
    """Source pixel of each position of an axis padded by `half` on both sides: mirrored
    without repeating the edge (reflect, at any distance) or the edge repeated (replicate)."""
    src = torch.arange(-half, n_pix + half, device=device)
    if padding == "reflect" and n_pix > 1:
        period = 2 * (n_pix - 1)
        src = torch.remainder(src, period)
        return torch.where(src >= n_pix, period - src, src)
    return src.clamp(0, n_pix - 1)


def _blur_axis(x, kernel, padding, dim):
    """Convolve (N, C, H, W) along dim 2 or 3 with per-sample 1-D kernels (N, taps): one
    grouped convolution, a group per (sample, channel)."""
    n, c = x.shape[:2]
    taps = kernel.shape[1]
    half = taps // 2
    if half < x.shape[dim]:  # F.pad's reflect needs a pad below the size
        x = torch.nn.functional.pad(x, (0, 0, half, half) if dim == 2 else (half, half, 0, 0),
                                    mode=padding)
    else:
        x = x.index_select(dim, _padded_index(x.shape[dim], half, padding, x.device))
    shape = (n * c, 1, taps, 1) if dim == 2 else (n * c, 1, 1, taps)
    weight = kernel.repeat_interleave(c, 0).reshape(shape)
    out = torch.nn.functional.conv2d(x.reshape(1, n * c, *x.shape[2:]), weight, groups=n * c)
    return out.reshape(n, c, *out.shape[2:])


class _GaussianBlur:
    """torchvision GaussianBlur (kernel size given, reflect) or the PIL RandomGaussianBlur
    (sigma = radius, kernel +-3 sigma_max, replicated edge)."""

    def __init__(self, p, sigma, kernel_size, padding):
        self.p, self.sigma, self.padding = p, sigma, padding
        self.kernel_size = kernel_size  # (kx, ky), odd

    def sample(self, n, gen, device):
        return {"blur": _bernoulli(n, self.p, gen, device),
                "sigma": _uniform(n, self.sigma[0], self.sigma[1], gen, device)}

    def _kernel(self, taps, params):
        t = torch.arange(taps, device=params["sigma"].device, dtype=torch.float32) - taps // 2
        k = torch.exp(-0.5 * (t[None] / params["sigma"][:, None]) ** 2)
        k = k / k.sum(1, keepdim=True)
        return torch.where(params["blur"][:, None], k, (t == 0).float()[None])  # unblurred: identity

    def apply(self, x, params):
        x = _blur_axis(x, self._kernel(self.kernel_size[1], params), self.padding, 2)
        return _blur_axis(x, self._kernel(self.kernel_size[0], params), self.padding, 3)


class _Solarize:
    def __init__(self, p, threshold):
        self.p, self.threshold = p, threshold / 255

    def sample(self, n, gen, device):
        return {"solarize": _bernoulli(n, self.p, gen, device)}

    def apply(self, x, params):
        hit = params["solarize"][:, None, None, None] & (x >= self.threshold)
        return torch.where(hit, 1 - x, x)


class _Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._cache = {}

    def sample(self, n, gen, device):
        return {}

    def apply(self, x, params):
        key = (x.device, x.dtype)
        if key not in self._cache:  # one host->device copy per device, not one per batch
            self._cache[key] = (torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1).to(x.device),
                                torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1).to(x.device))
        mean, std = self._cache[key]
        return (x - mean) / std


# ============ one view recipe: the table of batched ops ============

class _Recipe:
    """What BatchedView reads out of one Compose: the geometry (at most one Resize and one crop,
    before any pixel op, and a horizontal flip anywhere), the pixel ops in order, ToTensor."""

    def __init__(self):
        self.resize = self.crop = self.flip_p = None
        self.ops, self.to_tensor = [], False


def _certain(op, p):
    """Ops that have no random-application version refuse a RandomApply around them."""
    if p != 1.0:
        raise ValueError(f"RandomApply of {type(op).__name__} has no batched version; apply it "
                         "always, or use --data_backend pil")


def _geometry(slot):
    def read(op, p, recipe):
        _certain(op, p)
        late = recipe.ops or recipe.crop is not None
        if late or (slot == "resize" and recipe.resize is not None):
            raise ValueError(f"{type(op).__name__} at this place has no batched version; the "
                             "geometry must be [Resize] [one crop] at the start")
        setattr(recipe, slot, op)
    return read


def _flip(op, p, recipe):
    # folded into the geometry: it commutes with the pixel ops
    if recipe.flip_p is not None:
        raise ValueError("a second RandomHorizontalFlip has no batched version; keep one")
    recipe.flip_p = p * op.p


def _to_tensor(op, p, recipe):
    _certain(op, p)
    recipe.to_tensor = True


def _normalize(op, p, recipe):
    _certain(op, p)
    if not recipe.to_tensor:
        raise ValueError("Normalize before ToTensor; put ToTensor first")
    recipe.ops.append(_Normalize(op.mean, op.std))


def _random_apply(op, p, recipe):
    if len(op.transforms) != 1:
        raise ValueError(f"RandomApply of {len(op.transforms)} transforms has no batched "
                         "version; wrap each transform in its own RandomApply")
    _read_op(op.transforms[0], p * op.p, recipe)


def _pixel(build):
    """A pixel op: build(op, p) -> its batched op, p the probability of a RandomApply around it."""
    def read(op, p, recipe):
        recipe.ops.append(build(op, p))
    return read


def _pil_blur(op, p):
    taps = 2 * math.ceil(3 * op.radius_max) + 1  # PIL's blur has no size: +-3 sigma_max
    return _GaussianBlur(p * op.p, (op.radius_min, op.radius_max), (taps, taps), "replicate")


def _grayscale(op, p):
    if op.num_output_channels != 3:
        raise ValueError("Grayscale(num_output_channels=1) has no batched version; the views "
                         "have 3 channels (num_output_channels=3)")
    return _Grayscale(p)


# Every op a recipe of data/transforms.py may contain -> how a batched view runs it:
# read(op, p, recipe) adds it to the _Recipe (p: the probability of a RandomApply around it).
# One recipe, two executors: torchvision/PIL run the op image by image (--data_backend pil),
# this table runs its batched twin. A new augmentation is added here; an op missing from the
# table is refused with one line naming it. Keyed by the exact class: a subclass may do
# something else, so it needs its own row.
BATCHED_OPS = {
    T.Resize: _geometry("resize"),
    T.RandomResizedCrop: _geometry("crop"),
    T.RandomCrop: _geometry("crop"),
    T.CenterCrop: _geometry("crop"),
    T.RandomHorizontalFlip: _flip,
    T.ColorJitter: _pixel(lambda op, p: _ColorJitter(op, p)),
    T.RandomGrayscale: _pixel(lambda op, p: _Grayscale(p * op.p)),
    T.Grayscale: _pixel(_grayscale),
    T.GaussianBlur: _pixel(lambda op, p: _GaussianBlur(p, op.sigma, tuple(op.kernel_size),
                                                       "reflect")),
    RandomGaussianBlur: _pixel(_pil_blur),
    T.RandomSolarize: _pixel(lambda op, p: _Solarize(p * op.p, op.threshold)),
    T.ToTensor: _to_tensor,
    T.Normalize: _normalize,
    T.RandomApply: _random_apply,
}


def _read_op(op, p, recipe):
    read = BATCHED_OPS.get(type(op))
    if read is None:
        raise ValueError(f"{type(op).__name__} has no batched version; use --data_backend pil, "
                         "or add it to the table data/gpu_transforms.BATCHED_OPS")
    read(op, p, recipe)


class BatchedView:
    """One view recipe, a torchvision Compose of data/transforms.py's ops, run on a batch; every
    op is read through BATCHED_OPS.

        view = BatchedView(compose)
        params = view.sample(n, heights, widths, gen)     # per-sample random parameters
        out = view.apply(images, params, views=k)          # (k * B, 3, h, w), n = k * B
        out = view(images, gen, sizes=None, views=k)       # both; (k, B, 3, h, w)
    """

    def __init__(self, compose):
        recipe = _Recipe()
        for op in (compose.transforms if isinstance(compose, T.Compose) else [compose]):
            _read_op(op, 1.0, recipe)
        if not recipe.to_tensor:
            raise ValueError(f"{compose} does not end in tensors; add ToTensor()")
        self.ops = recipe.ops
        self.geometry = _Geometry(recipe.resize, recipe.crop, recipe.flip_p or 0.0)
        self.size = self.geometry.out

    def sample(self, n, heights, widths, gen=None):
        device = heights.device
        params = self.geometry.sample(heights, widths, gen)
        for op in self.ops:
            params.update(op.sample(n, gen, device))
        return params

    @full_fp32()  # the resampling products and the blur stay exact under --tf32
    def apply(self, images, params, sizes=None, views=1):
        b = images.shape[0]
        heights, widths = _sizes(images, sizes, views)
        x = images if images.is_floating_point() else images.float()
        x = self.geometry.apply(x, params, heights, widths, views)
        for op in self.ops:
            x = op.apply(x, params)
        return x.reshape(views, b, *x.shape[1:])

    def __call__(self, images, gen=None, sizes=None, views=1):
        heights, widths = _sizes(images, sizes, views)
        params = self.sample(heights.shape[0], heights, widths, gen)
        return self.apply(images, params, sizes, views)

    def __repr__(self):
        return f"BatchedView(size={self.size}, ops={[type(o).__name__ for o in self.ops]})"


def _sizes(images, sizes, views):
    """(views * B,) heights and widths: `sizes` (B, 2) or the full image."""
    b, _, h, w = images.shape
    if sizes is None:  # filled on the device: no host->device copy
        full = torch.full((views * b,), 1.0, dtype=torch.float64, device=images.device)
        return full * h, full * w
    sizes = sizes.to(images.device).double().repeat(views, 1)
    return sizes[:, 0], sizes[:, 1]


# ============ the method recipes ============

class BatchedTwoView:
    """TwoViewTransform (SimCLR) on a batch -> [view1, view2], each (B, 3, S, S)."""

    def __init__(self, pil):
        self.view = BatchedView(pil.transform)

    def __call__(self, images, seed=None, sizes=None):
        gen = make_generator(seed, images.device)
        return list(self.view(images, gen, sizes, views=2).unbind(0))


class BatchedMultiCrop:
    """MultiCropTransform (DINO / iBOT) -> [g1, g2 x (global_number - 1), locals]."""

    def __init__(self, pil):
        self.global1, self.global2 = BatchedView(pil.global1), BatchedView(pil.global2)
        self.local = BatchedView(pil.local)
        self.global_number, self.local_number = pil.global_number, pil.local_number

    def __call__(self, images, seed=None, sizes=None):
        gen = make_generator(seed, images.device)
        x = images.float()  # converted once for the three recipes
        crops = [self.global1(x, gen, sizes)[0]]
        if self.global_number > 1:
            crops += list(self.global2(x, gen, sizes, views=self.global_number - 1).unbind(0))
        if self.local_number > 0:
            crops += list(self.local(x, gen, sizes, views=self.local_number).unbind(0))
        return crops


class BatchedSingleView:
    """SingleViewTransform or eval_transform's Compose -> one (B, 3, S, S) tensor."""

    def __init__(self, pil):
        self.view = BatchedView(pil.transform if isinstance(pil, SingleViewTransform) else pil)

    def __call__(self, images, seed=None, sizes=None):
        return self.view(images, make_generator(seed, images.device), sizes)[0]


# The recipes of data/transforms.py -> their batched twins, by exact class. A method whose
# transform is its own class gives it a batched() method instead (methods/__init__.py).
BATCHED_RECIPES = {
    TwoViewTransform: BatchedTwoView,
    MultiCropTransform: BatchedMultiCrop,
    SingleViewTransform: BatchedSingleView,
    T.Compose: BatchedSingleView,
}


def batched_transform(pil_transform):
    """The batched equivalent of a method's PIL transform, built from its own parameters: the
    transform's batched() when it has one (the method contract's hook for transforms of its own,
    e.g. iBOT's views with masks), else the row of BATCHED_RECIPES for its class (TwoViewTransform,
    MultiCropTransform, SingleViewTransform, eval_transform's Compose). The result is called as
    f(images uint8 (B, 3, H, W), seed=None, sizes=None) and returns what the DataLoader collates
    from the PIL transform; it may offer batch_extras (see data/loaders.py)."""
    batched = getattr(pil_transform, "batched", None)
    if callable(batched):
        return batched()
    build = BATCHED_RECIPES.get(type(pil_transform))
    if build is None:
        raise ValueError(f"{type(pil_transform).__name__} has no batched version; use "
                         "--data_backend pil, or give it a batched() method or a row of "
                         "data/gpu_transforms.BATCHED_RECIPES")
    return build(pil_transform)
