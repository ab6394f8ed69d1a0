"""data/: dataset splits and layouts on tiny fake trees, and the augmentation recipes."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from data import (DATASETS, MultiCropTransform, SingleViewTransform, TwoViewTransform, build_dataset,
                  dataset_info, eval_transform, resolve_dataset)
from data.datasets import _BUILDERS, _holdout
from data.transforms import RandomGaussianBlur


def _save_image(path, value, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value, value)).save(path)


def _labels(ds):
    return [ds[i][1] for i in range(len(ds))]


# ============ digits ============

def test_digits_split_sizes_stratified_and_deterministic():
    from sklearn.datasets import load_digits

    all_counts = np.bincount(load_digits().target)
    train = build_dataset("digits", None, "train")
    test = build_dataset("digits", None, "test")
    assert len(train) + len(test) == 1797
    test_counts = np.bincount(test.targets, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 1)  # stratified 80/20
    np.testing.assert_array_equal(np.bincount(train.targets, minlength=10) + test_counts, all_counts)
    assert train.num_classes == test.num_classes == 10
    img, label = train[0]
    assert img.mode == "RGB" and img.size == (32, 32) and label == train.targets[0]
    assert isinstance(label, int)
    # grayscale replicated to RGB
    arr = np.asarray(img)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    # "val" without val_split is the official test split
    assert build_dataset("digits", None, "val").targets == test.targets
    # same split on every call (fixed internal seed), items included
    again = build_dataset("digits", None, "test")
    assert again.targets == test.targets
    assert np.array_equal(np.asarray(again[5][0]), np.asarray(test[5][0]))
    # train and test hold different images: no test image is also a train image
    train_set = {np.asarray(train[i][0]).tobytes() for i in range(len(train))}
    overlap = sum(np.asarray(test[i][0]).tobytes() in train_set for i in range(len(test)))
    assert overlap < 5  # a handful of exact duplicates exist in the raw digits


def test_digits_statistics_match_registry():
    ds = build_dataset("digits", None, "train")
    x = np.stack([np.asarray(ds[i][0]) for i in range(len(ds))]).astype(np.float64) / 255
    info = dataset_info("digits")
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), info.mean, atol=1e-3)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), info.std, atol=1e-3)


def test_val_split_carve_out_disjoint_and_deterministic():
    full = build_dataset("digits", None, "train")
    train = build_dataset("digits", None, "train", val_split=200, seed=3)
    val = build_dataset("digits", None, "val", val_split=200, seed=3)
    assert len(val) == 200 and len(train) + len(val) == len(full)
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted(train.indices + val.indices) == list(range(len(full)))
    assert val.targets == [full.targets[i] for i in val.indices]
    assert val[0][1] == full[val.indices[0]][1]
    assert np.all(np.bincount(val.targets, minlength=10) >= 19)  # stratified: ~20 per class
    assert build_dataset("digits", None, "val", val_split=200, seed=3).indices == val.indices
    assert build_dataset("digits", None, "val", val_split=200, seed=4).indices != val.indices
    # fraction form; test split untouched
    assert len(build_dataset("digits", None, "val", val_split=0.1)) == round(0.1 * len(full))
    assert len(build_dataset("digits", None, "test", val_split=0.1)) == 1797 - len(full)
    with pytest.raises(ValueError, match="val_split"):
        build_dataset("digits", None, "val", val_split=1.5)
    with pytest.raises(ValueError, match="val_split"):
        build_dataset("digits", None, "val", val_split=len(full))


def test_holdout_proportional_and_keeps_unlabeled_in_train():
    targets = np.array([0] * 60 + [1] * 30 + [2] * 10 + [-1] * 50)
    train, val = _holdout(targets, 0.1, seed=0)
    assert np.bincount(targets[val]).tolist() == [6, 3, 1]
    assert np.all(targets[train[-50:]] == -1) and len(train) + len(val) == len(targets)


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="cifar10"):
        dataset_info("mnist")
    with pytest.raises(ValueError, match="train, val, test"):
        build_dataset("digits", None, "unlabeled")


def test_datasets_are_picklable_with_transform():
    ds = build_dataset("digits", None, "val", TwoViewTransform(32, (0.5,) * 3, (0.5,) * 3), val_split=50)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.targets == ds.targets and len(clone[0][0]) == 2


# ============ imagefolder ============

def _make_folder_tree(root, split, classes, per_class):
    for c, name in enumerate(classes):
        for i in range(per_class):
            _save_image(root / split / name / f"{i}.png", 20 * c + i)


def test_imagefolder_splits_and_classes(tmp_path):
    classes = ["bird", "cat", "ant"]
    _make_folder_tree(tmp_path, "train", classes, 4)
    _make_folder_tree(tmp_path, "test", classes, 2)
    train = build_dataset("imagefolder", tmp_path, "train")
    assert len(train) == 12 and train.num_classes == 3
    assert train.classes == ["ant", "bird", "cat"]  # sorted folder names
    img, label = train[0]
    assert img.mode == "RGB" and label == 0 and np.asarray(img)[0, 0, 0] == 40  # ant = c 2, i 0
    assert train.targets == _labels(train)
    assert dataset_info("imagefolder", tmp_path).num_classes == 3
    # val and test both fall back to test/ ...
    for split in ("val", "test"):
        ds = build_dataset("imagefolder", tmp_path, split)
        assert len(ds) == 6 and ds.class_to_idx == train.class_to_idx
    # ... and once val/ exists too, models are selected on val/ and scored on test/
    _make_folder_tree(tmp_path, "val", classes, 1)
    assert len(build_dataset("imagefolder", tmp_path, "val")) == 3
    assert len(build_dataset("imagefolder", tmp_path, "test")) == 6
    assert len(build_dataset("imagefolder", tmp_path, "test", eval_split="val")) == 3
    assert len(pickle.loads(pickle.dumps(train))) == 12


def test_imagefolder_missing_gives_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_path"):
        build_dataset("imagefolder", tmp_path / "nope", "train")
    _make_folder_tree(tmp_path, "train", ["a", "b"], 1)
    with pytest.raises(FileNotFoundError, match="no val/ or test/ folder.*--data_path"):
        build_dataset("imagefolder", tmp_path, "val")
    _make_folder_tree(tmp_path, "val", ["a", "c"], 1)
    with pytest.raises(ValueError, match="class folders"):
        build_dataset("imagefolder", tmp_path, "val")


# ============ tiny-imagenet ============

def _make_tiny_imagenet(root):
    """3 wnids x 2 train images; 5 val images listed in val_annotations.txt."""
    base = root / "tiny-imagenet-200"
    wnids = ["n03", "n01", "n02"]
    for w in wnids:
        for i in range(2):
            _save_image(base / "train" / w / "images" / f"{w}_{i}.JPEG", 50)
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    val = {"val_0.JPEG": "n02", "val_1.JPEG": "n01", "val_2.JPEG": "n03", "val_3.JPEG": "n02", "val_4.JPEG": "n01"}
    for f in val:
        _save_image(base / "val" / "images" / f, 100)
    (base / "val" / "val_annotations.txt").write_text(
        "".join(f"{f}\t{w}\t0\t0\t8\t8\n" for f, w in val.items()))
    (base / "wnids.txt").write_text("\n".join(wnids))
    return base, val


def test_tiny_imagenet_val_reorganised_idempotently(tmp_path):
    base, val = _make_tiny_imagenet(tmp_path)
    train = build_dataset("tiny-imagenet", tmp_path, "train")
    assert len(train) == 6 and train.classes == ["n01", "n02", "n03"] and train.num_classes == 3

    # interrupted earlier run: one file already moved, images/ still there
    (base / "val" / "n02").mkdir()
    (base / "val" / "images" / "val_0.JPEG").rename(base / "val" / "n02" / "val_0.JPEG")

    first = build_dataset("tiny-imagenet", base, "val")
    assert not (base / "val" / "images").exists()
    assert first.class_to_idx == train.class_to_idx
    got = {s[0].split("/")[-1]: first.classes[s[1]] for s in first.samples}
    assert got == val
    assert first.targets == _labels(first)

    second = build_dataset("tiny-imagenet", base, "test")  # run again: nothing to move
    assert second.samples == first.samples


def test_tiny_imagenet_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_path"):
        build_dataset("tiny-imagenet", tmp_path, "train")


# ============ npy ============

@pytest.mark.parametrize("layout", ["nhwc_folders", "nchw_flat", "gray_flat"])
def test_npy_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    if layout == "gray_flat":
        hwc = np.repeat(hwc[..., :1], 3, axis=3)
    labels = np.array([0, 1, 2, 0, 1, 3])
    for split, n in [("train", 6), ("test", 3)]:
        if layout == "nhwc_folders":
            (tmp_path / split).mkdir()
            images_path, labels_path = tmp_path / split / "images.npy", tmp_path / split / "labels.npy"
            stored = hwc[:n]
        else:
            images_path, labels_path = tmp_path / f"{split}_images.npy", tmp_path / f"{split}_labels.npy"
            stored = hwc[:n].transpose(0, 3, 1, 2) if layout == "nchw_flat" else hwc[:n, :, :, :1]
        np.save(images_path, stored)
        np.save(labels_path, labels[:n])

    train = build_dataset("npy", tmp_path, "train")
    assert len(train) == 6 and train.num_classes == 4 and list(train.targets) == labels.tolist()
    for i in range(6):
        img, label = train[i]
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), hwc[i]) and label == labels[i]
    test = build_dataset("npy", tmp_path, "val")
    assert len(test) == 3 and test.num_classes == 4  # classes counted on train
    assert np.array_equal(np.asarray(test[2][0]), hwc[2])
    info = dataset_info("npy", tmp_path)
    assert info.num_classes == 4 and info.image_size == 8
    # the memory map is not pickled: the clone reopens the file
    clone = pickle.loads(pickle.dumps(train))
    assert clone._array is None and np.array_equal(np.asarray(clone[1][0]), hwc[1])


def test_npy_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_path"):
        build_dataset("npy", tmp_path, "train")
    np.save(tmp_path / "train_images.npy", np.zeros((2, 8, 8, 3), np.float32))
    np.save(tmp_path / "train_labels.npy", np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="uint8"):
        build_dataset("npy", tmp_path, "train")


# ============ torchvision datasets ============

@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_torchvision_missing_without_download(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="not found under .*--data_path") as e:
        build_dataset(name, tmp_path, "train", download=False)
    assert "\n" not in str(e.value)


# ============ transforms ============

def _ops(t):
    """All leaf transforms inside Compose / RandomApply, recursively."""
    inner = getattr(t, "transforms", None)
    if inner is None:
        return [t]
    return [op for sub in inner for op in _ops(sub)]


def _has_blur(t):
    return any(isinstance(op, (T.GaussianBlur, RandomGaussianBlur)) for op in _ops(t))


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_two_view_transform():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    views = TwoViewTransform(24, MEAN, STD)(img)
    assert len(views) == 2 and all(v.shape == (3, 24, 24) and v.dtype == torch.float32 for v in views)
    assert not torch.equal(views[0], views[1])
    assert not _has_blur(TwoViewTransform(32, MEAN, STD).transform)
    big = TwoViewTransform(224, MEAN, STD).transform
    blurs = [op for op in _ops(big) if isinstance(op, T.GaussianBlur)]
    assert len(blurs) == 1 and blurs[0].kernel_size == (23, 23)
    assert _has_blur(TwoViewTransform(32, MEAN, STD, blur=True).transform)


def test_multi_crop_transform():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8))
    t = MultiCropTransform(64, 32, local_number=3, global_number=3, mean=MEAN, std=STD)
    crops = t(img)
    assert [c.shape for c in crops] == [(3, 64, 64)] * 3 + [(3, 32, 32)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    blur_p = [[op.p for op in _ops(c) if isinstance(op, RandomGaussianBlur)] for c in (t.global1, t.global2, t.local)]
    assert blur_p == [[1.0], [0.1], [0.5]]
    sol_p = [[op.p for op in _ops(c) if isinstance(op, T.RandomSolarize)] for c in (t.global1, t.global2, t.local)]
    assert sol_p == [[], [0.2], []]
    # at 32px the blur is off everywhere, solarize stays on the second global crop
    small = MultiCropTransform(32, 16, local_number=2)
    assert not any(_has_blur(c) for c in (small.global1, small.global2, small.local))
    assert any(isinstance(op, T.RandomSolarize) for op in _ops(small.global2))
    assert len(small(img)) == 4


def test_torchvision_solarize_equals_dino_rule_draw_for_draw():
    """The multi-crop recipe's torchvision RandomSolarize does what DINO's Solarization did (and
    this repository's own class before it): one uniform draw from torch's generator per image,
    PIL's ImageOps.solarize at threshold 128 when it is below p, the image untouched otherwise;
    so a seeded run solarizes the same images as before, the same way."""
    from PIL import ImageOps
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8))
    op = MultiCropTransform(32, 16, local_number=0, mean=MEAN, std=STD).global2.transforms
    op = next(o for o in op if isinstance(o, T.RandomSolarize))
    assert (op.threshold, op.p) == (128, 0.2)
    hits = 0
    for seed in range(30):
        torch.manual_seed(seed)
        hit = torch.rand(()).item() < 0.2  # the former rule's draw
        after = torch.rand(()).item()
        torch.manual_seed(seed)
        out = op(img)
        assert torch.rand(()).item() == after  # exactly one number drawn, as before
        want = ImageOps.solarize(img, threshold=128) if hit else img
        assert np.array_equal(np.asarray(out), np.asarray(want))
        hits += hit
    assert 0 < hits < 30  # both branches were checked


def test_solarize_and_blur_ops():
    row = np.array([[0, 100, 127, 128, 200, 255]], dtype=np.uint8)
    img = Image.fromarray(np.stack([row] * 3, axis=-1))
    out = np.asarray(T.RandomSolarize(128, p=1.0)(img))[..., 0]
    assert out.tolist() == [[0, 100, 127, 127, 55, 0]]
    assert T.RandomSolarize(128, p=0.0)(img) is img
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    blurred = np.asarray(RandomGaussianBlur(p=1.0)(noisy), dtype=np.float64)
    assert blurred.std() < np.asarray(noisy, dtype=np.float64).std()


def test_single_view_transform():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    cifar = SingleViewTransform(32, MEAN, STD)
    crops = [op for op in _ops(cifar.transform) if isinstance(op, T.RandomCrop)]
    assert len(crops) == 1 and crops[0].padding == 4
    assert cifar(img).shape == (3, 32, 32)
    big = SingleViewTransform(96, MEAN, STD)
    assert any(isinstance(op, T.RandomResizedCrop) for op in _ops(big.transform))
    assert big(img).shape == (3, 96, 96)
    # cifar style on a larger image still gives `size`
    assert SingleViewTransform(32, MEAN, STD, cifar_style=True)(img.resize((64, 48))).shape == (3, 32, 32)


def test_eval_transform_normalizes_and_crops():
    img = Image.new("RGB", (300, 260), (64, 128, 255))
    expected = (torch.tensor([64, 128, 255]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    for size, crop_pct in [(224, None), (32, None), (64, 0.5)]:
        out = eval_transform(size, MEAN, STD, crop_pct)(img)
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(out, expected[:, None, None].expand_as(out), atol=1e-5, rtol=0)
    resize = [op for op in _ops(eval_transform(224, MEAN, STD)) if isinstance(op, T.Resize)]
    assert resize[0].size == 256 and resize[0].interpolation == T.InterpolationMode.BICUBIC
    resize = [op for op in _ops(eval_transform(32, MEAN, STD)) if isinstance(op, T.Resize)]
    assert resize[0].size == 32  # small images are not cropped
    # center crop picks the middle: a left/right split image stays split at the centre
    arr = np.zeros((256, 256, 3), np.uint8)
    arr[:, 128:] = 255
    out = eval_transform(224, (0, 0, 0), (1, 1, 1))(Image.fromarray(arr))
    assert out[0, 0, :111].max() < 0.01 and out[0, 0, 113:].min() > 0.99


def test_registry_agrees_with_the_builders():
    """Every name --dataset accepts can be built, and what is built matches its entry."""
    assert set(DATASETS) == set(_BUILDERS)
    for name, info in DATASETS.items():
        assert len(info.mean) == len(info.std) == 3, name
        assert all(0 < v < 1 for v in info.mean + info.std), name  # Normalize takes [0, 1] stats
    train = build_dataset("digits", None, "train")
    assert train.num_classes == DATASETS["digits"].num_classes
    assert train[0][0].size == (DATASETS["digits"].image_size,) * 2


# ============ --dataset inferred from --data_path ============

def test_resolve_dataset_infers_from_the_folder(tmp_path):
    assert resolve_dataset(None, "") == "digits"
    assert resolve_dataset("cifar10", tmp_path) == "cifar10"  # given: used as it is
    for folder, name in (("cifar-10-batches-py", "cifar10"), ("cifar-100-python", "cifar100"),
                         ("stl10_binary", "stl10")):
        (tmp_path / name / folder).mkdir(parents=True)
        assert resolve_dataset(None, tmp_path / name) == name  # the parent, as torchvision
        assert resolve_dataset(None, tmp_path / name / folder) == name  # or the folder itself
    _make_tiny_imagenet(tmp_path / "tin")
    assert resolve_dataset(None, tmp_path / "tin") == "tiny-imagenet"
    assert resolve_dataset(None, tmp_path / "tin" / "tiny-imagenet-200") == "tiny-imagenet"
    npy = tmp_path / "npy"
    (npy / "train").mkdir(parents=True)
    np.save(npy / "train" / "images.npy", np.zeros((2, 8, 8, 3), np.uint8))
    np.save(npy / "train" / "labels.npy", np.zeros(2, np.int64))
    assert resolve_dataset(None, npy) == "npy"
    _make_folder_tree(tmp_path / "folders", "train", ["a", "b"], 1)
    assert resolve_dataset(None, tmp_path / "folders") == "imagefolder"


def test_resolve_dataset_never_ignores_a_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot tell which dataset .*empty.*pass --dataset"):
        resolve_dataset(None, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        resolve_dataset(None, tmp_path / "missing")
    for folder in ("cifar-10-batches-py", "stl10_binary"):
        (tmp_path / "both" / folder).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"several datasets \(cifar10, stl10\)"):
        resolve_dataset(None, tmp_path / "both")
    with pytest.raises(ValueError, match="--dataset digits .* drop --data_path"):
        resolve_dataset("digits", tmp_path)
    with pytest.raises(ValueError, match="npy needs its location"):
        resolve_dataset("npy", "")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        resolve_dataset("mnist", tmp_path)
