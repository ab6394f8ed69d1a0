"""CPU tests for methods/rotation.py: rotation direction and labels against np.rot90, shapes,
the rotation-prediction recipe's defaults, learning on a fixed batch, and a short train_ssl.py
run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from methods import METHODS, rotation

ROOT = Path(__file__).resolve().parents[1]


def test_rotate_batch_matches_np_rot90_and_labels():
    torch.manual_seed(0)
    images = torch.randn(3, 2, 5, 5)
    rotated, labels = rotation.rotate_batch(images)
    assert rotated.shape == (12, 2, 5, 5) and labels.dtype == torch.int64
    assert labels.tolist() == [0, 1, 2, 3] * 3  # RotNet: per image, all four in a row
    for i in range(3):
        hwc = images[i].permute(1, 2, 0).numpy()
        for k in range(4):
            expected = np.ascontiguousarray(np.rot90(hwc, k)).transpose(2, 0, 1)
            np.testing.assert_array_equal(rotated[4 * i + k].numpy(), expected)


def test_rotation_is_counter_clockwise():
    img = torch.tensor([[1., 2.], [3., 4.]]).view(1, 1, 2, 2)
    rotated, _ = rotation.rotate_batch(img)
    # 90 degrees counter-clockwise: the top-right corner moves to the top-left
    assert rotated[1, 0].tolist() == [[2., 4.], [1., 3.]]
    assert rotated[2, 0].tolist() == [[4., 3.], [2., 1.]]
    assert rotated[3, 0].tolist() == [[3., 1.], [4., 2.]]


def test_rotate_batch_rejects_non_square():
    with pytest.raises(ValueError) as e:
        rotation.rotate_batch(torch.zeros(2, 3, 8, 6))
    msg = str(e.value)
    assert "square" in msg and "(2, 3, 8, 6)" in msg and "\n" not in msg


def test_defaults_are_the_seed_recipe():
    from train_ssl import parse_args
    args = parse_args(["--method", "rotation"])
    assert METHODS["rotation"] is rotation
    assert (args.optimizer, args.lr, args.weight_decay, args.weight_decay_end) == ("adamw", 1.5e-4, 0.05, 0.05)
    assert tuple(args.adamw_betas) == (0.9, 0.95)
    assert args.rot_hidden_dim == 0 and args.crop_size == 0


def test_transform_gives_one_view():
    from PIL import Image
    from data import dataset_info
    args = type("A", (), {"crop_size": 0, "min_crop_scale": 0.08})()
    info = dataset_info("digits")
    assert rotation.input_size(args, info) == 32
    view = rotation.build_transform(args, info)(Image.new("RGB", (32, 32)))
    assert torch.is_tensor(view) and view.shape == (3, 32, 32)


def tiny_backbone():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 32))


@pytest.mark.parametrize("hidden", [0, 16])
def test_module_interface_and_learning(hidden):
    torch.manual_seed(0)
    model = rotation.RotationPrediction(tiny_backbone(), 32, hidden)
    images = torch.rand(8, 3, 8, 8)
    loss, stats = model(images, 0, 0)
    assert loss.ndim == 0 and stats["rot_acc"].ndim == 0
    assert set(stats) == {"rot_acc", "emb_std", "erank"}
    assert model.eval_backbone() is model.backbone and model.checkpoint_modules() == {"model": model}
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    first = loss.item()
    for _ in range(60):
        loss, stats = model([images], 0, 0)  # a list of one view is accepted too
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first and stats["rot_acc"].item() > 80


def test_train_ssl_rotation_logs_rotation_accuracy(tmp_path):
    """On black images every rotation looks the same (the crop pads with black too), so the
    head cannot tell them apart: it predicts the same class for all four, which is right for
    exactly one of them. rot_acc is then exactly 25 (%), and the loss at least ln 4."""
    root = tmp_path / "data"
    for split, n in (("train", 32), ("test", 8)):
        (root / split).mkdir(parents=True)
        np.save(root / split / "images.npy", np.zeros((n, 16, 16, 3), dtype=np.uint8))
        np.save(root / split / "labels.npy", np.arange(n) % 2)
    out = tmp_path / "out"
    cmd = [sys.executable, "train_ssl.py", "--method", "rotation", "--arch", "resnet18", "--dataset", "npy",
           "--data_path", str(root), "--epochs", "1", "--warmup_epochs", "0", "--batch_size_per_gpu", "16",
           "--num_workers", "0", "--knn_eval", "false", "--tensorboard", "false", "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rot_acc" in r.stdout
    stats = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert stats["train_rot_acc"] == pytest.approx(25.0)
    assert np.log(4) - 1e-4 <= stats["train_loss"] < 10
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert "head.weight" in ckpt["model"] and ckpt["model"]["head.weight"].shape == (4, 512)
