"""data/gpu_transforms.py and data/loaders.py: the batched augmentations against torchvision /
PIL, their random parameters, and the tensor loaders' sample order (all on the CPU)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler, default_collate
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from data import (DATASETS, MultiCropTransform, SingleViewTransform, TwoViewTransform,
                  build_dataset, eval_transform)
from data.transforms import RandomGaussianBlur
from data.gpu_transforms import (BATCHED_OPS, HUE, BatchedView, _ColorJitter, _GaussianBlur,
                                 batch_seed, batched_transform, make_generator, resized_crop,
                                 sample_resized_crop_boxes)
from data.loaders import (PILLoader, ResidentLoader, StreamingLoader, build_train_loader,
                          epoch_indices)

INFO = DATASETS["digits"]


def _smooth_images(n, h, w, seed=0):
    """Random but smooth uint8 images (resampling errors show on edges, not on noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 3, h // 4 + 1, w // 4 + 1), generator=g) * 255
    return torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear").round().to(torch.uint8)


@pytest.fixture(scope="module")
def digits():
    ds = build_dataset("digits", None, "train")
    arr = np.stack([np.asarray(ds[i][0]) for i in range(96)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), [Image.fromarray(a) for a in arr]


def _ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov D: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return np.max(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                         - np.searchsorted(b, grid, side="right") / len(b)))


# ============ geometry ============

@pytest.mark.parametrize("mode", [InterpolationMode.BICUBIC, InterpolationMode.BILINEAR])
@pytest.mark.parametrize("hw,box,size", [((32, 32), (3, 5, 20, 17), 32),      # upscale
                                         ((120, 90), (10, 4, 100, 80), 24),    # downscale: antialias
                                         ((40, 56), (0, 0, 40, 56), 40)])
def test_resized_crop_matches_torchvision(mode, hw, box, size):
    images = _smooth_images(3, *hw)
    boxes = torch.tensor([box] * 3, dtype=torch.float64)
    ours = resized_crop(images, boxes, size, mode)
    ref = F.resized_crop(images.float(), *box, [size, size], interpolation=mode, antialias=True)
    assert (ours - ref.clamp(0, 255)).abs().mean() < 0.01
    pil = torch.stack([F.pil_to_tensor(F.resized_crop(F.to_pil_image(im), *box, [size, size],
                                                      interpolation=mode)) for im in images])
    assert (ours - pil.float()).abs().mean() < 0.6  # PIL rounds to uint8 (fixed-point weights)
    flipped = resized_crop(images, boxes, size, mode, flip=torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(flipped, ours.flip(-1))


def test_crop_boxes_follow_torchvision_distribution():
    h, w, n = 60, 45, 3000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    torch.manual_seed(0)
    ref = np.array([T.RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), list(ratio))
                    for _ in range(n)], dtype=np.float64)
    ours = sample_resized_crop_boxes(torch.full((n,), float(h)), torch.full((n,), float(w)), scale,
                                     ratio, make_generator(1, "cpu")).numpy()
    assert ours.min() >= 0 and np.all(ours[:, 0] + ours[:, 2] <= h) and np.all(ours[:, 1] + ours[:, 3] <= w)
    assert np.all(ours == np.round(ours))
    critical = 1.95 * math.sqrt(2 / n)  # alpha = 0.001
    for stat in (lambda b: b[:, 2] * b[:, 3] / (h * w), lambda b: np.log(b[:, 3] / b[:, 2]),
                 lambda b: b[:, 0], lambda b: b[:, 1]):
        assert _ks_statistic(stat(ours), stat(ref)) < critical


def test_crop_fallback_is_torchvision_central_crop():
    # a 6 x 64 strip: no box of area >= 0.5 fits with ratio in [3/4, 4/3] -> the fallback
    ref = T.RandomResizedCrop.get_params(torch.empty(3, 6, 64), [0.5, 1.0], [3 / 4, 4 / 3])
    ours = sample_resized_crop_boxes(torch.full((5,), 6.0), torch.full((5,), 64.0), (0.5, 1.0),
                                     (3 / 4, 4 / 3), make_generator(0, "cpu"))
    assert ours.tolist() == [list(map(float, ref))] * 5


def test_padded_batch_crops_inside_each_image():
    """A zero-padded batch with per-image sizes gives each image the views it gets alone."""
    view = BatchedView(TwoViewTransform(16, INFO.mean, INFO.std).transform)
    small, large = _smooth_images(1, 20, 28, seed=1), _smooth_images(1, 40, 36, seed=2)
    padded = torch.zeros((2, 3, 40, 36), dtype=torch.uint8)
    padded[0, :, :20, :28], padded[1] = small[0], large[0]
    sizes = torch.tensor([[20, 28], [40, 36]])
    params = view.sample(2, sizes[:, 0].double(), sizes[:, 1].double(), make_generator(3, "cpu"))
    out = view.apply(padded, params, sizes)[0]
    box = params["box"]
    assert torch.all(box[0, 0] + box[0, 2] <= 20) and torch.all(box[0, 1] + box[0, 3] <= 28)
    for b, img in enumerate((small, large)):
        alone = view.apply(img, {k: v[b:b + 1] for k, v in params.items()})[0]
        torch.testing.assert_close(out[b:b + 1], alone, atol=1e-4, rtol=0)


def test_eval_crops_match_pil(digits):
    images, pil = digits
    for tf in (eval_transform(24, INFO.mean, INFO.std),                 # Resize(24) + CenterCrop
               eval_transform(32, INFO.mean, INFO.std, crop_pct=0.8)):  # Resize(40) + CenterCrop
        ours = batched_transform(tf)(images, seed=0)
        ref = torch.stack([tf(im) for im in pil])
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        assert (ours - ref).abs().mean() < 0.01


def test_cifar_style_crop_is_a_zero_padded_shift():
    images = _smooth_images(64, 32, 32).clamp_(1, 255)  # zeros can only come from the padding
    out = batched_transform(T.Compose([T.RandomCrop(32, padding=4), T.ToTensor()]))(images, seed=0)
    padded = torch.nn.functional.pad(images.float() / 255, (4, 4, 4, 4))
    offsets = set()
    for b in range(64):
        found = [(dy, dx) for dy in range(9) for dx in range(9)
                 if torch.allclose(out[b], padded[b, :, dy:dy + 32, dx:dx + 32], atol=1e-5)]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 30  # offsets drawn per sample over the 9 x 9 positions


# ============ colour, blur, solarize ============

def test_color_jitter_follows_each_samples_order():
    """Every sample's ops in its own order = torchvision's functional ops in that order."""
    images = _smooth_images(12, 8, 8).float() / 255
    jitter = _ColorJitter(T.ColorJitter(0.4, 0.4, 0.4, 0.1), p=1.0)
    params = jitter.sample(12, make_generator(5, "cpu"), "cpu")
    ours = jitter.apply(images.clone(), params)
    fns = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    for b in range(12):
        ref = images[b]
        for op in params["order"][b].tolist():
            ref = fns[op](ref, params["factors"][b, op].item())
        torch.testing.assert_close(ours[b], ref, atol=2e-4, rtol=0)
    assert len({tuple(o) for o in params["order"].tolist()}) > 5  # orders differ per sample


def test_gaussian_blur_matches_torchvision():
    images = _smooth_images(2, 20, 20).float() / 255
    blur = _GaussianBlur(1.0, (1.3, 1.3), (5, 5), "reflect")
    ours = blur.apply(images, blur.sample(2, make_generator(0, "cpu"), "cpu"))
    torch.testing.assert_close(ours, F.gaussian_blur(images, [5, 5], [1.3, 1.3]), atol=1e-5, rtol=0)


def test_rates_and_ranges_of_random_parameters():
    n = 20000
    simclr = BatchedView(TwoViewTransform(64, INFO.mean, INFO.std).transform)  # with blur
    dino = MultiCropTransform(64, 32, mean=INFO.mean, std=INFO.std)
    hw = torch.full((n,), 64.0)
    p = simclr.sample(n, hw, hw, make_generator(0, "cpu"))
    q = BatchedView(dino.global2).sample(n, hw, hw, make_generator(1, "cpu"))
    r = BatchedView(dino.global1).sample(n, hw, hw, make_generator(2, "cpu"))

    def rate_ok(flags, prob):
        return abs(flags.float().mean().item() - prob) < 4.5 * math.sqrt(prob * (1 - prob) / n) + 1e-9

    assert rate_ok(p["flip"], 0.5) and rate_ok(p["jitter"], 0.8) and rate_ok(p["gray"], 0.2)
    assert rate_ok(p["blur"], 0.5) and rate_ok(q["blur"], 0.1) and rate_ok(q["solarize"], 0.2)
    assert rate_ok(r["blur"], 1.0) and rate_ok(q["jitter"], 0.8)
    for params, sat in ((p, 0.4), (q, 0.2)):
        f, on = params["factors"], params["jitter"]
        for op, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (1 - sat, 1 + sat), (-0.1, 0.1)]):
            assert f[on, op].min() >= lo and f[on, op].max() <= hi
            assert f[on, op].max() - f[on, op].min() > 0.9 * (hi - lo)  # the whole range is used
            assert torch.all(f[~on, op] == (0.0 if op == HUE else 1.0))  # off: identity
        assert torch.all(params["order"].sort(1).values == torch.arange(4))  # permutations
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0


def test_solarize_and_grayscale():
    tf = T.Compose([T.CenterCrop(8), T.RandomGrayscale(p=1.0), T.ToTensor()])
    images = _smooth_images(4, 8, 8)
    out = batched_transform(tf)(images, seed=0)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    ref = torch.stack([tf(F.to_pil_image(im)) for im in images])
    assert (out - ref).abs().max() < 1.5 / 255
    sol = batched_transform(T.Compose([T.CenterCrop(8), T.RandomSolarize(128, p=1.0), T.ToTensor()]))
    x = sol(images, seed=0)
    ref = images.float() / 255
    torch.testing.assert_close(x, torch.where(ref >= 128 / 255, 1 - ref, ref))


# ============ views of the method recipes ============

def _recipes():
    from methods.ibot import MaskGenerator, MultiCropMaskTransform
    multicrop = MultiCropTransform(32, 16, local_number=3, mean=INFO.mean, std=INFO.std)
    return {"two_view": TwoViewTransform(32, INFO.mean, INFO.std, scale=(0.2, 1.0)),
            "two_view_blur": TwoViewTransform(64, INFO.mean, INFO.std),
            "multicrop": multicrop,
            "single_cifar": SingleViewTransform(32, INFO.mean, INFO.std),
            "single_rrc": SingleViewTransform(32, INFO.mean, INFO.std, cifar_style=False),
            "eval": eval_transform(32, INFO.mean, INFO.std),
            "ibot": MultiCropMaskTransform(multicrop, MaskGenerator(), 2, 4)}


@pytest.mark.parametrize("name", list(_recipes()))
def test_views_like_the_pil_path(name, digits):
    images, pil = digits
    tf = _recipes()[name]
    ours = batched_transform(tf)(images, seed=0)
    ref = default_collate([tf(im) for im in pil])
    if name == "ibot":
        (ours, masks), (ref, ref_masks) = ours, ref
        assert [(m.shape, m.dtype) for m in masks] == [(m.shape, m.dtype) for m in ref_masks]
        assert abs(torch.stack(masks).float().mean() - torch.stack(ref_masks).float().mean()) < 0.03
    if torch.is_tensor(ref):
        ours, ref = [ours], [ref]
    assert [(v.shape, v.dtype) for v in ours] == [(v.shape, v.dtype) for v in ref]
    for a, b in zip(ours, ref):  # same normalisation: the same statistics up to sampling noise
        assert abs(a.mean() - b.mean()) < 0.12 and abs(a.std() - b.std()) < 0.08


def test_seeds_views_and_per_sample_parameters(digits):
    images = digits[0][:1].expand(32, -1, -1, -1)  # one image 32 times
    tf = batched_transform(_recipes()["multicrop"])
    a = tf(images, seed=batch_seed(0, 1, 5, 0))
    b = tf(images, seed=batch_seed(0, 1, 5, 0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for other in (batch_seed(0, 1, 6, 0), batch_seed(0, 1, 5, 1), batch_seed(1, 1, 5, 0)):
        assert not torch.equal(tf(images, seed=other)[0], a[0])
    for view in a:  # the same image, 32 different views
        assert len({v.numpy().tobytes() for v in view}) == 32
    state = torch.random.get_rng_state()
    ibot = batched_transform(_recipes()["ibot"])
    m1, m2 = ibot(images, seed=3)[1], ibot(images, seed=3)[1]
    assert all(torch.equal(x, y) for x, y in zip(m1, m2)) and not torch.equal(m1[0], m1[1])
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNGs untouched


def test_unsupported_ops_are_refused():
    with pytest.raises(ValueError, match="RandomRotation"):
        batched_transform(T.Compose([T.RandomRotation(10), T.ToTensor()]))
    with pytest.raises(ValueError, match="ToTensor"):
        batched_transform(T.Compose([T.CenterCrop(8)]))


def _ops_of(obj, depth=0):
    """The classes of every op in the Composes a transform object holds (RandomApply and the
    op it wraps both count)."""
    if isinstance(obj, T.Compose):
        return set().union(*(_ops_of(t, depth) for t in obj.transforms))
    if isinstance(obj, T.RandomApply):
        return {T.RandomApply}.union(*(_ops_of(t, depth) for t in obj.transforms))
    if type(obj).__module__.startswith("torchvision") or isinstance(obj, RandomGaussianBlur):
        return {type(obj)}
    if depth < 3 and hasattr(obj, "__dict__"):  # a recipe object: its attributes
        return set().union(set(), *(_ops_of(v, depth + 1) for v in vars(obj).values()))
    return set()


def test_batched_ops_table_covers_every_method_recipe():
    """Every op of the four methods' recipes, at a size without blur and one with, and of the
    evaluation recipes, has its row in BATCHED_OPS, and each recipe builds its batched twin."""
    from methods import METHODS
    from train_ssl import get_args_parser
    seen = set()
    for name, method in METHODS.items():
        for size in (32, 64):
            flags = (["--global_crops_size", str(size), "--local_crops_size", str(size // 2)]
                     if name in ("dino", "ibot") else
                     ["--crop_size", str(size)])
            args = get_args_parser(name).parse_args(flags)
            args.patch_size = 4
            tf = method.build_transform(args, INFO)
            ops = _ops_of(tf)
            assert ops and ops <= set(BATCHED_OPS), (name, size, ops - set(BATCHED_OPS))
            batched_transform(tf)
            seen |= ops
    for tf in (eval_transform(128, INFO.mean, INFO.std),
               SingleViewTransform(32, INFO.mean, INFO.std),
               SingleViewTransform(96, INFO.mean, INFO.std)):
        ops = _ops_of(tf)
        assert ops <= set(BATCHED_OPS)
        batched_transform(tf)
        seen |= ops
    assert {T.RandomResizedCrop, T.RandomCrop, T.Resize, T.CenterCrop, T.RandomHorizontalFlip,
            T.ColorJitter, T.RandomGrayscale, T.GaussianBlur, RandomGaussianBlur, T.RandomSolarize,
            T.RandomApply, T.ToTensor, T.Normalize} <= seen  # the walk found the recipes' ops


def test_unknown_op_fails_in_one_line_naming_it(monkeypatch):
    recipe = [T.RandomResizedCrop(8), T.RandomApply([T.RandomRotation(10)], p=0.5), T.ToTensor()]
    with pytest.raises(ValueError) as e:
        batched_transform(T.Compose(recipe))
    msg = str(e.value)
    assert "RandomRotation has no batched version" in msg and "--data_backend pil" in msg
    assert "BATCHED_OPS" in msg and "\n" not in msg

    class SharperJitter(T.ColorJitter):  # a subclass may do something else: not run as its parent
        pass
    jitter = SharperJitter(0.4, 0.4, 0.4, 0.1)
    with pytest.raises(ValueError, match="SharperJitter has no batched version"):
        batched_transform(T.Compose([T.CenterCrop(8), jitter, T.ToTensor()]))
    # one row of the table is all a new op needs
    monkeypatch.setitem(BATCHED_OPS, SharperJitter, BATCHED_OPS[T.ColorJitter])
    out = batched_transform(T.Compose([T.CenterCrop(8), jitter, T.ToTensor()]))(
        _smooth_images(4, 8, 8), seed=0)
    assert out.shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="Unknown has no batched version.*--data_backend pil"):
        batched_transform(type("Unknown", (), {})())
    with pytest.raises(ValueError, match="RandomApply of CenterCrop"):  # no random geometry
        batched_transform(T.Compose([T.RandomApply([T.CenterCrop(8)]), T.ToTensor()]))


# ============ loaders ============

def test_resident_loader_visits_distributed_sampler_order():
    n, batch, seed = 103, 10, 7
    labels = torch.arange(n)  # label = index, so the batches show which images were used
    images = torch.zeros((n, 3, 2, 2), dtype=torch.uint8)
    for rank in range(2):
        loader = ResidentLoader(images, labels, lambda x, seed: x, batch, "cpu", seed=seed,
                                rank=rank, world_size=2)
        sampler = DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=True, seed=seed)
        assert len(loader) == len(sampler) // batch == 5
        for epoch in (0, 3):
            loader.set_epoch(epoch)
            sampler.set_epoch(epoch)
            want = list(sampler)[:len(loader) * batch]  # DataLoader(drop_last=True)
            got = torch.cat([y for _, y in loader]).tolist()
            assert got == want
            loader.set_epoch(epoch, start_iter=3)  # resume mid-epoch: the same tail
            assert torch.cat([y for _, y in loader]).tolist() == want[30:]
    assert epoch_indices(n, 0, seed, 0, 2) != epoch_indices(n, 1, seed, 0, 2)


def test_build_train_loader_backends_agree_on_order():
    tf = TwoViewTransform(32, INFO.mean, INFO.std)
    loaders = [build_train_loader(b, "digits", None, tf, 64, device="cpu", num_workers=0, seed=3,
                                  rank=1, world_size=2) for b in ("tensor", "pil")]
    assert isinstance(loaders[0], ResidentLoader) and isinstance(loaders[1], PILLoader)
    assert len(loaders[0]) == len(loaders[1]) == 1438 // 2 // 64
    labels = []
    for loader in loaders:
        loader.set_epoch(2, start_iter=len(loader) - 1)  # the last batch only
        (views, y), = list(loader)
        assert [v.shape for v in views] == [(64, 3, 32, 32)] * 2
        labels.append(y)
    assert torch.equal(labels[0], labels[1])


def test_streaming_loader_on_cpu(tmp_path):
    """A JPEG ImageFolder of mixed sizes over the memory budget streams through workers."""
    rng = np.random.default_rng(0)
    for i in range(12):
        h, w = (40, 30) if i % 2 else (24, 36)
        folder = tmp_path / "train" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    tf = TwoViewTransform(16, INFO.mean, INFO.std)
    loader = build_train_loader("tensor", "imagefolder", str(tmp_path), tf, 4, device="cpu",
                                num_workers=0, memory_gb=1e-6)
    assert isinstance(loader, StreamingLoader) and len(loader) == 3
    loader.set_epoch(0, start_iter=1)
    batches = list(loader)
    assert len(batches) == 2 and [v.shape for v in batches[0][0]] == [(4, 3, 16, 16)] * 2
    resident = build_train_loader("tensor", "imagefolder", str(tmp_path), tf, 4, device="cpu",
                                  num_workers=0)
    # resident, each image at its own size: zero-padded to the largest height and width
    assert isinstance(resident, ResidentLoader) and resident.images.shape == (12, 3, 40, 36)
    assert resident.sizes.tolist() == [[24, 36] if i % 2 == 0 else [40, 30] for i in
                                       sorted(range(12), key=lambda i: (i % 3, str(i)))]


def test_ibot_masks_drawn_in_workers_equal_inline_ones():
    tf = _recipes()["ibot"]
    images, labels = torch.zeros((40, 3, 32, 32), dtype=torch.uint8), torch.zeros(40)
    runs = []
    for workers in (0, 1):
        loader = ResidentLoader(images, labels, batched_transform(tf), 8, "cpu", seed=1,
                                extras_workers=workers)
        loader.set_epoch(2, start_iter=3)
        runs.append([views[1] for views, _ in loader])
    assert len(runs[0]) == 2 and [m.shape for m in runs[1][0]] == [(8, 8, 8)] * 2
    for inline, prefetched in zip(*runs):
        assert all(torch.equal(a, b) for a, b in zip(inline, prefetched))


def test_blur_wider_than_the_image_mirrors_like_reflect():
    x = _smooth_images(2, 5, 5).float() / 255
    kernel = torch.rand((2, 13))  # 6 taps per side on 5 pixels: padded by index
    from data.gpu_transforms import _blur_axis
    padded = x[:, :, [2, 3, 4, 3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2]]  # rows -6..10, period 8
    want = torch.stack([sum(kernel[b, t] * padded[b, :, t:t + 5] for t in range(13))
                        for b in range(2)])
    torch.testing.assert_close(_blur_axis(x, kernel, "reflect", 2), want, atol=1e-5, rtol=0)
