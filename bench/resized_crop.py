"""How to crop-and-resize a batch with per-sample boxes: speed and agreement with torchvision.

    matrices    data/gpu_transforms.resized_crop: out = Wy @ image @ Wx^T, PIL's antialiased
                weights (what the tensor backend uses)
    loop        torchvision.transforms.functional.resized_crop(antialias=True), image by image
    grid_sample torch.nn.functional.grid_sample(mode="bicubic") on affine grids: one call, but
                no antialiasing and torch's bicubic a = -0.75 instead of PIL's -0.5

MAE: mean absolute difference to the loop, in grey levels (0..255).

    python bench/resized_crop.py --device cpu
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from data.gpu_transforms import make_generator, resized_crop, sample_resized_crop_boxes  # noqa: E402


def grid_sample_crop(images, boxes, size):
    b, _, h, w = images.shape
    top, left, bh, bw = boxes.float().unbind(1)
    theta = torch.zeros((b, 2, 3), device=images.device)
    theta[:, 0, 0], theta[:, 1, 1] = bw / w, bh / h
    theta[:, 0, 2], theta[:, 1, 2] = (2 * left + bw) / w - 1, (2 * top + bh) / h - 1
    grid = F.affine_grid(theta, (b, 3, size, size), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bicubic", align_corners=False).clamp(0, 255)


def loop_crop(images, boxes, size):
    return torch.stack([TF.resized_crop(img.float(), *box, [size, size],
                                        interpolation=InterpolationMode.BICUBIC, antialias=True)
                        for img, box in zip(images, boxes.long().tolist())]).clamp(0, 255)


def timed(fn, device, repeat=3):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat, out


def main():
    parser = argparse.ArgumentParser("batched resized crop strategies")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", default=["256x32x32", "64x256x224", "64x256x96"], nargs="+",
                        help="batch x image side x output side")
    args = parser.parse_args()
    device = torch.device(args.device)
    for case in args.cases:
        b, side, size = map(int, case.split("x"))
        g = torch.Generator(device="cpu").manual_seed(0)
        small = torch.rand((b, 3, side // 4, side // 4), generator=g) * 255  # smooth images
        images = F.interpolate(small, size=(side, side), mode="bilinear").round()
        images = images.to(torch.uint8).to(device)
        hw = torch.full((b,), float(side), device=device)
        boxes = sample_resized_crop_boxes(hw, hw, (0.08, 1.0), (3 / 4, 4 / 3),
                                          make_generator(0, device))
        t_loop, ref = timed(lambda: loop_crop(images, boxes, size), device)
        line = [f"{case}: loop {b / t_loop:.0f} img/s"]
        for name, fn in (("matrices", resized_crop), ("grid_sample", grid_sample_crop)):
            t, out = timed(lambda: fn(images, boxes, size), device)
            line.append(f"{name} {b / t:.0f} img/s (MAE {(out - ref).abs().mean():.3f})")
        print(", ".join(line), flush=True)


if __name__ == "__main__":
    main()
