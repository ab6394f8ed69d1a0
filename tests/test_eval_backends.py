"""--data_backend tensor and pil in the evaluation scripts: the same eval images, hence the same
features and k-NN numbers, in dataset order on 1 and on 2 ranks; the augmented training loaders
of eval_linear.py and finetune.py run with either backend."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import eval_knn
import eval_linear
import finetune
from core import eval_data
from core.features import extract_dataset_features
from core.knn import knn_classifier
from data import dataset_info, eval_transform

from _ddp import run_ranks

TINY_VIT = ["--arch", "vit_tiny", "--patch_size", "16", "--dataset", "digits", "--num_workers", "0"]


@pytest.fixture(scope="module")
def npy_root(tmp_path_factory):
    """4 colours (plus noise), 16 x 16: 16 train and 4 test images per class; a training epoch
    on it takes a fraction of a second, where digits' 1438 images take seconds."""
    root = tmp_path_factory.mktemp("npy")
    rng = np.random.default_rng(0)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [200, 200, 40]])
    for split, per_class in (("train", 16), ("test", 4)):
        labels = np.repeat(np.arange(4), per_class)
        images = colours[labels][:, None, None, :] + rng.normal(0, 25, (len(labels), 16, 16, 3))
        (root / split).mkdir()
        np.save(root / split / "images.npy", images.clip(0, 255).astype(np.uint8))
        np.save(root / split / "labels.npy", labels)
    return root


def tiny_npy(root):
    return ["--arch", "vit_tiny", "--patch_size", "8", "--dataset", "npy", "--data_path", str(root),
            "--num_workers", "0", "--batch_size_per_gpu", "16", "--tensorboard", "false"]


def local(args, rank=0, world_size=1):
    args.rank, args.world_size, args.gpu, args.distributed = rank, world_size, 0, world_size > 1
    args.device = torch.device("cpu")
    return args


def pixels(model, x):
    """The eval images themselves as features: (B, 3 * 32 * 32)."""
    return x.flatten(1)


def split_pixels(backend, split, rank=0, world_size=1, **kw):
    args = local(eval_knn.get_args_parser().parse_args(
        TINY_VIT + ["--data_backend", backend, "--batch_size_per_gpu", "8"]), rank, world_size)
    info = dataset_info("digits")
    data = eval_data.eval_split(args, split, eval_transform(32, info.mean, info.std), **kw)
    feats = extract_dataset_features(nn.Identity(), data, 8, 0, args.device, pixels,
                                     normalize=False, precision="fp32")
    return data, feats


def test_tensor_eval_images_and_knn_equal_pil_on_digits():
    """Resize(32) + CenterCrop(32) of a 32px digit in batches is PIL's (an identity), so the
    k-NN on those pixels gives the same numbers."""
    out = {}
    for backend in ("pil", "tensor"):
        (train, train_f), (test, test_f) = (split_pixels(backend, s) for s in ("train", "test"))
        assert isinstance(train, eval_data.LoadedSplit) == (backend == "tensor")
        assert train_f.shape == (1438, 3072) and test_f.shape == (359, 3072)
        out[backend] = (train_f, test_f), knn_classifier(
            nn.functional.normalize(train_f, dim=1), torch.as_tensor(train.targets),
            nn.functional.normalize(test_f, dim=1), torch.as_tensor(test.targets), 10, 0.07, 10)
    for a, b in zip(out["pil"][0], out["tensor"][0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert out["pil"][1] == out["tensor"][1] and out["pil"][1][0] > 90


def _two_rank_pixels(rank, world_size):
    return split_pixels("tensor", "val", rank, world_size, val_split=37)[1]


def test_sharded_tensor_extraction_is_in_dataset_order_without_duplicates():
    """37 images on 2 ranks in batches of 8: DistributedSampler pads the shards to 19 + 19 with
    image 0 again; the gathered features are still the 37 images in order, on every rank."""
    data, expected = split_pixels("pil", "val", val_split=37)
    assert len(data) == 37
    for feats in run_ranks(_two_rank_pixels):
        torch.testing.assert_close(feats, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend,describe", [("tensor", "resident uint8"), ("pil", "PIL transforms")])
def test_linear_probe_augmented_epochs_per_backend(backend, describe, npy_root, tmp_path, capsys):
    flags = tiny_npy(npy_root) + ["--n_last_blocks", "1", "--epochs", "2", "--lr", "2.0",
                                  "--output_dir", str(tmp_path)]
    res = eval_linear.run_linear(local(eval_linear.get_args_parser().parse_args(
        flags + ["--data_backend", backend])))
    assert f"Augmented training images: {describe}" in capsys.readouterr().out
    assert res["best_acc"] > 50  # 4 colours: chance is 25 %
    # the saved probe on the other backend's validation images: the very same accuracy, and
    # the resume guard lets the backend change (it does not define the run)
    other = "pil" if backend == "tensor" else "tensor"
    args = local(eval_linear.get_args_parser().parse_args(
        flags + ["--data_backend", other, "--evaluate"]))
    last = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])
    assert eval_linear.run_linear(args)["best_acc"] == pytest.approx(last["test_acc1"])


@pytest.mark.parametrize("backend,describe", [("tensor", "resident uint8"), ("pil", "PIL transforms")])
def test_finetune_one_epoch_per_backend(backend, describe, npy_root, tmp_path, capsys):
    args = local(finetune.get_args_parser().parse_args(
        tiny_npy(npy_root) + ["--data_backend", backend, "--epochs", "1", "--warmup_epochs", "0",
                              "--val_split", "8", "--save_predictions", "4",
                              "--output_dir", str(tmp_path)]))
    res = finetune.run_finetune(args)
    assert f"Training images: {describe}" in capsys.readouterr().out
    assert 0 <= res["test_acc"] <= 100 and (tmp_path / "predictions.png").is_file()
