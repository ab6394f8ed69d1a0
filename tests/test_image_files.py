"""Image files read alike by both data backends (issue 18): images of different sizes (each
cropped at its own size, in training and in evaluation), every image mode PIL and torchvision
read (one 8-bit RGB conversion), bad files (named, or skipped with --skip_bad_images), and the
folder and flag mistakes that end in one line."""
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

import eval_knn
import train_ssl
from core import eval_data
from core.features import extract_dataset_features
from data import (BadImageError, TwoViewTransform, build_dataset, dataset_info, eval_transform,
                  resolve_dataset)
from data.datasets import decode_image
from test_errors import exits_with_one_line
from data.gpu_transforms import BatchedView, make_generator
from data.loaders import (ResidentLoader, StreamingLoader, _jpeg_components, build_train_loader,
                          decode_bytes)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

# (height, width): a small file sorts first, then other sizes and aspect ratios (portrait,
# landscape, 1:5 strips), some below and some above the crop size
SIZES = [(14, 18), (40, 36), (24, 24), (17, 45), (50, 22), (30, 30), (12, 60), (33, 27)]


def _smooth(h, w, seed):
    """A smooth random uint8 (h, w, 3) image (resampling differences show on edges, not noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 3, h // 4 + 2, w // 4 + 2), generator=g) * 255
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """An ImageFolder of 16 PNGs of 8 sizes in 2 classes, and its train files in dataset order."""
    root = tmp_path_factory.mktemp("mixed")
    for i in range(16):
        h, w = SIZES[i % len(SIZES)]
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_smooth(h, w, i)).save(folder / f"{i:02d}.png")
    return root


def _views(loader):
    loader.set_epoch(0)
    return torch.cat([views for views, _ in loader])


# ============ sizes ============

@pytest.mark.parametrize("memory_gb", [4.0, 0.0], ids=["resident", "streamed"])
def test_eval_crops_of_mixed_sizes_are_pils(mixed, memory_gb):
    """Resize + CenterCrop of every image at its own size, as PIL does it image by image (the
    eval path): resident (padded to the largest image, sizes kept) or streamed."""
    for tf in (eval_transform(16, MEAN, STD),                    # downscales most images
               eval_transform(32, MEAN, STD, crop_pct=0.8)):     # Resize(40): upscales others
        loader = build_train_loader("tensor", "imagefolder", str(mixed), tf, 5, device="cpu",
                                    num_workers=0, memory_gb=memory_gb, shuffle=False,
                                    drop_last=False)
        assert isinstance(loader, ResidentLoader if memory_gb else StreamingLoader)
        pil = build_dataset("imagefolder", str(mixed), "train", tf)
        want = torch.stack([pil[i][0] for i in range(len(pil))])
        got = _views(loader)
        assert got.shape == want.shape
        assert (got - want).abs().mean() < 0.01 and (got - want).abs().max() < 0.1


def test_resident_mixed_sizes_are_kept_and_said(mixed):
    tf = eval_transform(16, MEAN, STD)
    loader = build_train_loader("tensor", "imagefolder", str(mixed), tf, 4, device="cpu",
                                num_workers=0)
    assert loader.images.shape == (16, 3, 50, 60)
    files = build_dataset("imagefolder", str(mixed), "train").samples
    for i in range(16):
        h, w = loader.sizes[i].tolist()
        want = np.asarray(Image.open(files[i][0]))
        assert (h, w) == want.shape[:2]
        assert np.array_equal(loader.images[i, :, :h, :w].permute(1, 2, 0).numpy(), want)
        assert not loader.images[i, :, h:].any() and not loader.images[i, :, :, w:].any()
    assert ("images of 8 sizes (smallest 14x18, largest 40x36): each kept at its own size, "
            "zero-padded to 50x60") in loader.describe
    streamed = build_train_loader("tensor", "imagefolder", str(mixed), tf, 4, device="cpu",
                                  num_workers=0, memory_gb=1e-4)
    assert "streamed: the 16 images padded to their largest size 50x60 would take 0.137 MiB, " \
           "over --data_memory_gb 0.0001" in streamed.describe


def test_random_crops_of_mixed_sizes_are_pils_with_the_same_parameters(mixed):
    """RandomResizedCrop + flip drawn in batches on the resident copy: each box lies inside its
    image's own size, and cropping the original file with PIL at that box gives the same view."""
    bicubic = InterpolationMode.BICUBIC
    recipe = T.Compose([T.RandomResizedCrop(16, scale=(0.08, 1.0), interpolation=bicubic),
                        T.RandomHorizontalFlip(), T.ToTensor()])
    loader = build_train_loader("tensor", "imagefolder", str(mixed), recipe, 4, device="cpu",
                                num_workers=0)
    view = BatchedView(recipe)
    heights, widths = loader.sizes[:, 0].double(), loader.sizes[:, 1].double()
    params = view.sample(16, heights, widths, make_generator(0, "cpu"))
    got = view.apply(loader.images, params, loader.sizes)[0]
    files = build_dataset("imagefolder", str(mixed), "train").samples
    for i in range(16):
        top, left, h, w = (int(v) for v in params["box"][i])
        assert top + h <= heights[i] and left + w <= widths[i]
        want = F.resized_crop(decode_image(files[i][0]), top, left, h, w, [16, 16], bicubic)
        if params["flip"][i]:
            want = F.hflip(want)
        assert (got[i] - F.to_tensor(want)).abs().mean() < 0.005, i


def test_one_size_is_stored_as_is(tmp_path):
    for i in range(6):
        folder = tmp_path / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_smooth(20, 28, i)).save(folder / f"{i}.png")
    loader = build_train_loader("tensor", "imagefolder", str(tmp_path), eval_transform(16, MEAN, STD),
                                2, device="cpu", num_workers=0)
    assert loader.images.shape == (6, 3, 20, 28) and loader.sizes is None
    assert "every image 20x28 as decoded" in loader.describe


def _pixels(backend, root, split="train", **flags):
    """The eval images of `split` through core.eval_data.eval_split, as the k-NN reads them."""
    args = eval_knn.get_args_parser().parse_args(
        ["--dataset", "imagefolder", "--data_path", str(root), "--num_workers", "0",
         "--batch_size_per_gpu", "5", "--data_backend", backend])
    args.rank, args.world_size, args.device = 0, 1, torch.device("cpu")
    for k, v in flags.items():
        setattr(args, k, v)
    data = eval_data.eval_split(args, split, eval_transform(24, MEAN, STD))
    return data, extract_dataset_features(torch.nn.Identity(), data, 5, 0, args.device,
                                          lambda model, x: x.flatten(1), normalize=False,
                                          precision="fp32")


def test_eval_split_features_of_mixed_sizes_agree(mixed):
    (_, pil), (data, tensor) = _pixels("pil", mixed), _pixels("tensor", mixed)
    assert isinstance(data, eval_data.LoadedSplit)
    assert (pil - tensor).abs().mean() < 0.01 and (pil - tensor).abs().max() < 0.1


# ============ modes ============

def _png16(array):
    """A 16-bit PNG (Pillow writes none in colour): grey (h, w), RGB (h, w, 3), RGBA (h, w, 4)."""
    h, w = array.shape[:2]
    colour = {2: 0, 3: 2, 4: 6}[array.ndim if array.ndim == 2 else array.shape[2]]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _mode_files(folder):
    """{file name: the 8-bit RGB it must decode to (None: lossy, compared with PIL's decoding)}."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    alpha = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    deep = rng.integers(0, 65536, (6, 7), dtype=np.uint16)
    deep_rgb = rng.integers(0, 65536, (6, 7, 4), dtype=np.uint16)
    palette = Image.fromarray(rgb).quantize(6)
    looked_up = np.asarray(palette.convert("RGB"))
    assert len(np.unique(looked_up.reshape(-1, 3), axis=0)) > 3  # a real palette
    folder.mkdir(parents=True)
    expect = {}

    def save(name, img, want, **kw):
        img.save(folder / name, **kw)
        expect[name] = want

    def replicate(g):
        return np.repeat(g[..., None], 3, axis=2)
    save("L.png", Image.fromarray(grey), replicate(grey))
    save("1.png", Image.fromarray(grey > 127), replicate((grey > 127).astype(np.uint8) * 255))
    save("P.png", palette, looked_up)
    save("P_transparent.png", palette, looked_up, transparency=2)  # alpha dropped
    save("P_transparent.gif", palette, looked_up, transparency=2)  # not an ImageFolder extension
    save("LA.png", Image.fromarray(np.stack([grey, alpha], 2), "LA"), replicate(grey))
    save("RGBA.png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), rgb)
    save("RGBA.webp", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), rgb, lossless=True)
    save("RGB.bmp", Image.fromarray(rgb), rgb)
    save("I16.png", Image.fromarray(deep), replicate((deep >> 8).astype(np.uint8)))
    save("I16.tif", Image.fromarray(deep), replicate((deep >> 8).astype(np.uint8)))
    (folder / "RGB16.png").write_bytes(_png16(deep_rgb[..., :3]))
    expect["RGB16.png"] = (deep_rgb[..., :3] >> 8).astype(np.uint8)
    (folder / "RGBA16.png").write_bytes(_png16(deep_rgb))
    expect["RGBA16.png"] = (deep_rgb[..., :3] >> 8).astype(np.uint8)
    save("L.jpg", Image.fromarray(grey), None)
    save("RGB.jpg", Image.fromarray(rgb), None)
    save("CMYK.jpg", Image.fromarray(np.dstack([rgb, alpha]), "CMYK"), None)
    return expect


def test_every_mode_decodes_to_the_same_8bit_rgb_on_both_backends(tmp_path):
    expect = _mode_files(tmp_path / "train" / "modes")
    pil = build_dataset("imagefolder", str(tmp_path), "train")
    tensor = build_train_loader("tensor", "imagefolder", str(tmp_path), eval_transform(8, MEAN, STD),
                                4, device="cpu", num_workers=0)
    names = [Path(path).name for path, _ in pil.samples]
    assert sorted(names + ["P_transparent.gif"]) == sorted(expect)
    assert tensor.sizes is None and tensor.images.shape == (len(names), 3, 6, 7)
    gif = tmp_path / "train" / "modes" / "P_transparent.gif"
    for i, path in enumerate([path for path, _ in pil.samples] + [gif]):
        name = Path(path).name
        want = expect[name]
        if want is None:  # JPEG: PIL's own decoding (CMYK converted as PIL converts it)
            with Image.open(path) as img:
                want = np.asarray(img.convert("RGB"))
        got = [np.asarray(decode_image(path))]  # the pil backend's decoding
        if i < len(names):
            got += [np.asarray(pil[i][0]), tensor.images[i].permute(1, 2, 0).numpy()]
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        got.append(decode_bytes(data, path).permute(1, 2, 0).numpy())  # also the GPU fallback's
        tolerance = 1 if name.endswith(".jpg") else 0  # libjpeg-turbo builds may round apart
        for image in got:
            assert image.dtype == np.uint8 and image.shape == want.shape, name
            assert np.abs(image.astype(int) - want).max() <= tolerance, name
        # which files the GPU path sends to nvJPEG: JPEGs of 1 or 3 components, no CMYK
        assert _jpeg_components(data) == {"L.jpg": 1, "RGB.jpg": 3, "CMYK.jpg": 4}.get(name, 0)
    buf = io.BytesIO()  # progressive, after an EXIF segment
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, "JPEG", progressive=True,
                                                         exif=Image.Exif().tobytes())
    assert _jpeg_components(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)) == 3


# ============ bad files ============

def _folder_with_bad_files(root, bad):
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                root / "train" / c / f"{i}.png")
    good = (root / "train" / "a" / "0.png").read_bytes()
    for name in bad:  # garbage (no header PIL knows), or a PNG cut in half (header reads)
        (root / "train" / name).write_bytes(b"\x89PNG not really" if "garbage" in name
                                            else good[:len(good) // 2])
    return root


@pytest.mark.parametrize("memory_gb", [4.0, 0.0], ids=["resident", "streamed"])
@pytest.mark.parametrize("bad", ["a/3_garbage.png", "a/3_truncated.png"])
def test_tensor_backend_names_the_bad_file(tmp_path, memory_gb, bad):
    root = _folder_with_bad_files(tmp_path, [bad])
    with pytest.raises(BadImageError) as e:
        loader = build_train_loader("tensor", "imagefolder", str(root), eval_transform(8, MEAN, STD),
                                    2, device="cpu", num_workers=0, memory_gb=memory_gb,
                                    shuffle=False)
        _views(loader)
    message = str(e.value)
    assert f"cannot decode image {root / 'train' / bad}" in message, message
    assert "BytesIO" not in message and "--skip_bad_images true" in message


@pytest.mark.parametrize("memory_gb", [4.0, 0.0], ids=["resident", "streamed"])
def test_skip_bad_images_on_both_backends(tmp_path, memory_gb, capfd):
    """The same flag on both backends: each bad file is named, counted, and replaced by the
    next decodable one (its label too), so both give the same images and labels."""
    root = _folder_with_bad_files(tmp_path, ["a/3_garbage.png", "b/3_truncated.png"])
    tf = eval_transform(8, MEAN, STD)
    out = {}
    for backend in ("pil", "tensor"):
        loader = build_train_loader(backend, "imagefolder", str(root), tf, 2, device="cpu",
                                    num_workers=0, memory_gb=memory_gb, shuffle=False,
                                    drop_last=False, skip_bad_images=True)
        loader.set_epoch(0)
        views, labels = zip(*loader)
        out[backend] = torch.cat(views), torch.cat(labels)
        err = capfd.readouterr().err
        for name in ("a/3_garbage.png", "b/3_truncated.png"):
            assert f"warning: skipped {root / 'train' / name}" in err, (backend, err)
    assert out["tensor"][1].tolist() == out["pil"][1].tolist() == [0, 0, 0, 1, 1, 1, 1, 0]
    torch.testing.assert_close(out["tensor"][0], out["pil"][0], atol=0.02, rtol=0)


def test_streamed_device_decoding_on_cpu_gives_the_workers_views(tmp_path, monkeypatch, capfd):
    """decode_on="device", the branch CUDA takes (workers read bytes, the main process decodes
    each batch in one decode_jpeg call on the device), run on the CPU: the same views and labels
    as the worker-decoded branch with the same seeds, a resumed epoch included; grey JPEGs go
    to the batch decoder, PNGs, CMYK and bad files to the workers' decoding."""
    for i, (h, w) in enumerate([(20, 30), (50, 24), (31, 31), (18, 44), (24, 24), (45, 45)]):
        folder = tmp_path / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_smooth(h, w, i)).save(folder / f"{i}.jpg", quality=90)
    c0, c1 = tmp_path / "train" / "c0", tmp_path / "train" / "c1"
    Image.fromarray(_smooth(22, 26, 7)[..., 0]).save(c0 / "grey.jpg")
    Image.fromarray(np.dstack([_smooth(26, 22, 8), _smooth(26, 22, 9)[..., :1]]), "CMYK").save(
        c1 / "cmyk.jpg")
    Image.fromarray(_smooth(28, 20, 10)).save(c1 / "png.png")
    (c0 / "3_garbage.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    calls = []
    decode_jpeg = torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg",
                        lambda data, **kw: calls.append(len(data) if isinstance(data, list) else 1)
                        or decode_jpeg(data, **kw))
    tf = TwoViewTransform(16, MEAN, STD, scale=(0.2, 1.0), blur=True)  # random views, kernel 1
    runs = {}
    for decode_on in ("workers", "device"):
        loader = build_train_loader("tensor", "imagefolder", str(tmp_path), tf, 3, device="cpu",
                                    num_workers=0, memory_gb=0, max_side=40, seed=5,
                                    decode_on=decode_on, skip_bad_images=True)
        assert isinstance(loader, StreamingLoader) and loader.decode_on == decode_on
        batches = []
        for epoch, start in ((1, 0), (1, 1)):
            loader.set_epoch(epoch, start_iter=start)
            batches.append([(torch.stack(views), labels) for views, labels in loader])
        runs[decode_on] = batches, loader.describe
        assert (calls != []) == (decode_on == "device")
    (workers, described_w), (device, described_d) = runs["workers"], runs["device"]
    assert "decoded in the workers" in described_w
    assert "decoded in batches in the main process (decode_jpeg on the CPU)" in described_d
    assert max(calls) > 1  # a batch of JPEGs in one call
    assert [len(b) for b in device] == [len(b) for b in workers] == [3, 2]  # 10 files, 3 a batch
    for got, want in zip(device, workers):
        for (v_got, y_got), (v_want, y_want) in zip(got, want):
            assert torch.equal(y_got, y_want) and torch.equal(v_got, v_want)
    for (v_tail, _), (v_full, _) in zip(device[1], device[0][1:]):  # resumed at batch 1
        assert torch.equal(v_tail, v_full)
    assert "3_garbage.jpg" in capfd.readouterr().err
    with pytest.raises(ValueError, match="decode_on 'gpu' is unknown; use one of device, workers"):
        build_train_loader("tensor", "imagefolder", str(tmp_path), tf, 3, device="cpu",
                           num_workers=0, memory_gb=0, decode_on="gpu")


def test_train_ssl_knn_check_reads_with_skip_bad_images(tmp_path):
    """core.eval_data.eval_split passes train_ssl.py's --skip_bad_images on (its k-NN check)."""
    root = _folder_with_bad_files(tmp_path, ["a/3_garbage.png"])
    (root / "val").mkdir()
    for c in ("a", "b"):
        (root / "val" / c).symlink_to(root / "train" / c)
    for backend in ("pil", "tensor"):
        data, feats = _pixels(backend, root, "val", skip_bad_images=True)
        assert feats.shape == (7, 3 * 24 * 24) and data.targets == [0, 0, 0, 0, 1, 1, 1]


# ============ folders and flags ============

def test_hidden_entries_are_skipped(tmp_path):
    """.ipynb_checkpoints/, .DS_Store and macOS ._* files are neither classes nor images."""
    root = _folder_with_bad_files(tmp_path, [])
    train = root / "train"
    (train / ".ipynb_checkpoints").mkdir()
    (train / ".ipynb_checkpoints" / "x.png").write_bytes((train / "a" / "0.png").read_bytes())
    (train / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (train / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (train / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (train / "b" / ".thumbs").mkdir()
    (train / "b" / ".thumbs" / "0.png").write_bytes((train / "a" / "0.png").read_bytes())
    ds = build_dataset("imagefolder", str(root), "train")
    assert ds.classes == ["a", "b"] and len(ds) == 6 and ds.num_classes == 2
    assert all("/." not in path for path, _ in ds.samples)
    assert dataset_info("imagefolder", str(root)).num_classes == 2
    assert resolve_dataset(None, str(root)) == "imagefolder"
    tensor = build_train_loader("tensor", "imagefolder", str(root), eval_transform(8, MEAN, STD),
                                2, device="cpu", num_workers=0)
    assert tensor.num_images == 6


def test_data_path_that_is_a_file(tmp_path, capsys):
    file = tmp_path / "photos.zip"
    file.write_bytes(b"PK")
    for name in ("imagefolder", "npy", "cifar10"):
        exits_with_one_line(lambda: resolve_dataset(name, str(file)), capsys,
                            f"--data_path {file} is a file, not a folder")
    exits_with_one_line(lambda: build_dataset("imagefolder", str(file), "train"), capsys,
                        f"{file} is a file, not a folder")
    exits_with_one_line(lambda: train_ssl.parse_args(
        ["--method", "simclr", "--dataset", "imagefolder", "--data_path", str(file)]), capsys,
        "is a file, not a folder")


@pytest.mark.parametrize("name,folder,files", [
    ("cifar10", "cifar-10-batches-py", ["data_batch_1", "batches.meta"]),
    ("cifar100", "cifar-100-python", ["train", "meta"]),
    ("stl10", "stl10_binary", ["train_X.bin"])])
def test_damaged_torchvision_folder_is_named(tmp_path, capsys, name, folder, files):
    (tmp_path / folder).mkdir()
    for f in files:
        (tmp_path / folder / f).write_bytes(b"half a download")
    first = files[0]
    for root in (tmp_path, tmp_path / folder):
        exits_with_one_line(lambda: build_dataset(name, str(root), "train"), capsys,
                            f"under {tmp_path / folder} is damaged or incomplete",
                            f"{first} is truncated or altered", "--download true")
    (tmp_path / folder / first).unlink()
    exits_with_one_line(lambda: build_dataset(name, str(tmp_path), "train"), capsys,
                        f"{first} is missing")


def test_negative_data_memory_is_refused(capsys):
    for parse in (lambda: train_ssl.parse_args(["--method", "simclr", "--data_memory_gb", "-1"]),
                  lambda: eval_knn.get_args_parser().parse_args(["--data_memory_gb", "-0.5"])):
        with pytest.raises(SystemExit) as e:
            parse()
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "--data_memory_gb" in err and "must be >= 0" in err, err
    assert train_ssl.parse_args(["--method", "simclr", "--data_memory_gb", "0"]).data_memory_gb == 0
    exits_with_one_line(lambda: build_train_loader(
        "tensor", "digits", None, eval_transform(8, MEAN, STD), 8, device="cpu", memory_gb=-2),
        capsys, "--data_memory_gb -2 must be >= 0")
