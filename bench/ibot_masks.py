"""Where should iBOT's block masks be drawn for --data_backend tensor? Times per batch:

    host inline     the method's MaskGenerator in the training process (what the PIL path runs
                    in its workers), as methods/ibot.py's BatchMasks does without extras workers
    host workers    the same, drawn ahead by data/loaders.py's extras workers: the time the
                    training process waits for a batch of masks
    device sketch   a vectorised version of the BEiT block algorithm (below, for this
                    measurement only): all masks advance one attempt per tensor op; a mask's
                    loop length is data-dependent, so it runs a fixed number of rounds (a
                    round adds one block or finishes the mask); `ops` counts tensor ops, each
                    one kernel launch on a GPU

    python bench/ibot_masks.py --batch_size 128 --grid 14 --device cpu
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from data.loaders import _BatchExtras, _BatchKeys  # noqa: E402
from methods.ibot import BatchMasks, MaskGenerator  # noqa: E402


def device_block_masks(n, size, ratio, rounds, device, gen, aspect=(0.3, 1 / 0.3)):
    """n BEiT block masks (size x size) of target ratio, all advanced together.
    -> (bool (n, size, size), number of tensor ops, masks still unfinished after `rounds`)."""
    ops = 0
    high = torch.full((n,), ratio * size * size, device=device)
    min_area = (size // 3) ** 2
    lo, hi = math.log(aspect[0]), math.log(aspect[1])
    idx = torch.arange(size, device=device, dtype=torch.float32)
    mask = torch.zeros((n, size, size), dtype=torch.bool, device=device)
    count = torch.zeros(n, device=device)
    active = high > 0
    for _ in range(rounds):
        max_new = high - count
        searching, added = active.clone(), torch.zeros(n, device=device)
        for _attempt in range(10):
            u = torch.rand((n, 4), generator=gen, device=device)
            area = min_area + u[:, 0] * (max_new - min_area)
            ar = torch.exp(lo + u[:, 1] * (hi - lo))
            h, w = torch.round(torch.sqrt(area * ar)), torch.round(torch.sqrt(area / ar))
            top, left = torch.floor(u[:, 2] * (size - h + 1)), torch.floor(u[:, 3] * (size - w + 1))
            rows = (idx >= top[:, None]) & (idx < (top + h)[:, None])
            cols = (idx >= left[:, None]) & (idx < (left + w)[:, None])
            block = rows[:, :, None] & cols[:, None, :]
            new = h * w - (block & mask).sum((1, 2))
            accept = searching & (w < size) & (h < size) & (new > 0) & (new <= max_new)
            mask |= block & accept[:, None, None]
            added = torch.where(accept, new, added)
            searching &= ~accept
            ops += 30
        count += added
        active &= (added > 0) & (count < high)
        ops += 6
    return mask, ops, int(active.sum())


def timed(fn, repeat):
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - start) / repeat, out


def main():
    parser = argparse.ArgumentParser("iBOT mask generation cost")
    parser.add_argument("--batch_size", default=128, type=int)
    parser.add_argument("--grid", default=14, type=int, help="patches per side (224 / 16)")
    parser.add_argument("--global_crops_number", default=2, type=int)
    parser.add_argument("--workers", default=2, type=int)
    parser.add_argument("--rounds", default=12, type=int)
    parser.add_argument("--repeat", default=5, type=int)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    b, g, ng = args.batch_size, args.grid, args.global_crops_number
    masks = BatchMasks(MaskGenerator(), ng, (g, g))

    inline, m = timed(lambda: masks(b, seed=0), args.repeat)
    print(f"host inline: {1000 * inline:.1f} ms per batch ({ng} x {b} masks {g}x{g}), "
          f"ratio {m.float().mean():.3f}")

    keys = _BatchKeys()
    keys.keys = [(0, i, b) for i in range(args.repeat * 4)]
    loader = torch.utils.data.DataLoader(_BatchExtras(masks, 0, 0), sampler=keys, batch_size=None,
                                         num_workers=args.workers)
    it = iter(loader)
    next(it)
    time.sleep(inline * 4)  # the training step the masks overlap with
    waited, _ = timed(lambda: next(it), args.repeat)
    print(f"host workers ({args.workers}): {1000 * waited:.1f} ms waited per batch")

    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)

    def sketch():
        out = device_block_masks(ng * b, g, 0.3, args.rounds, device, gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    t, (m, ops, unfinished) = timed(sketch, args.repeat)
    print(f"device sketch on {device}: {1000 * t:.1f} ms per batch, {ops} tensor ops, "
          f"{unfinished} of {ng * b} masks unfinished after {args.rounds} rounds, "
          f"ratio {m.float().mean():.3f}")


if __name__ == "__main__":
    main()
