"""Is --compile worth it on a CPU? Eager against torch.compile (inductor) for the tiny CPU
configurations of bench/gpu_suite.py, in one process, timing blocks interleaved, CPU time per
step: on a machine shared with other jobs, wall time says little, and interleaving gives both
variants the same conditions.

    OMP_NUM_THREADS=1 python bench/compile_cpu.py simclr rotation dino ibot

Per method: the wall and CPU time of the first two steps (compilation; inductor also compiles in
worker processes, whose CPU time is not counted), then the best of 3 blocks of 4 steps each.
The figures and the date are in docs/benchmarks.md.
"""
import argparse
import contextlib
import io
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_ssl  # noqa: E402
from bench import gpu_suite, throughput  # noqa: E402
from core import cli  # noqa: E402
from core import dist as distu  # noqa: E402

FLAGS = {  # 16px, batch 16; the ViTs are /4, DINO/iBOT with 2 x 16px + 2 x 8px crops
    "simclr": ["--method", "simclr", "--arch", "resnet18", "--crop_size", "16",
               "--proj_hidden_dim", "256"],
    "rotation": ["--method", "rotation", "--arch", "vit_tiny", "--patch_size", "4",
                 "--crop_size", "16"],
    "dino": gpu_suite.small_flags("dino", "vit_tiny", 16),
    "ibot": gpu_suite.small_flags("ibot", "vit_tiny", 16),
}


def cpu_time():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def compare(method, batch_size=16, steps=4, blocks=3):
    args, info, transform = gpu_suite.bench_args(FLAGS[method], "cpu")
    args.batch_size_per_gpu = batch_size
    batch = gpu_suite.fixed_batch(args, info, transform, batch_size)
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model, optimizer, scaler = throughput.build_training(args, 2 * steps * blocks + 2)
        if compiled:
            train_ssl.compile_backbones(model)
        wall, cpu = time.time(), cpu_time()
        gpu_suite.run_steps(model, model, batch, optimizer, scaler, args, 2, 1e-4)
        print(f"{method} {'compiled' if compiled else 'eager'}: first 2 steps "
              f"{time.time() - wall:.0f} s wall, {cpu_time() - cpu:.0f} s CPU", flush=True)
        runs[compiled] = (model, optimizer, scaler)
    best = {False: float("inf"), True: float("inf")}
    for _ in range(blocks):
        for compiled, (model, optimizer, scaler) in runs.items():
            cpu = cpu_time()
            gpu_suite.run_steps(model, model, batch, optimizer, scaler, args, steps, 1e-4)
            best[compiled] = min(best[compiled], (cpu_time() - cpu) / steps)
    print(f"{method}: eager {1000 * best[False]:.0f} ms/step, compiled {1000 * best[True]:.0f} "
          f"ms/step (CPU time, best of {blocks} x {steps} steps, batch {batch_size}, "
          f"{torch.get_num_threads()} thread(s))", flush=True)


def main(argv=None):
    parser = cli.ArgumentParser("eager vs torch.compile on CPU")
    parser.add_argument("methods", nargs="+", choices=sorted(FLAGS))
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        distu.init_distributed_mode(argparse.Namespace(cpu=True, dist_url="env://"))
    for method in args.methods:
        compare(method)
    distu.cleanup()


if __name__ == "__main__":
    main()
