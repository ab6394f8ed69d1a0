"""Run a function on 2 CPU processes joined by a gloo process group, for the tests that check
that W ranks x B/W compute what 1 process x B does."""
import os
import tempfile

import torch
import torch.multiprocessing as mp


def _rank_main(rank, world_size, init_file, out_dir, worker, args, backend):
    import torch.distributed as dist
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP thread pool
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        result = worker(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pth"))


def run_ranks(worker, *args, world_size=2, backend="gloo"):
    """worker(rank, world_size, *args) -> any torch.save-able result, run in `world_size`
    processes inside an initialised group (`backend`: init_process_group's backend string, e.g.
    "cpu:gloo,cuda:gloo" for a group shaped like the CUDA one). Returns the results, indexed by
    rank.

    The processes are forked, not spawned: spawn re-imports torch and the test module in every
    child (about 10 s on a busy 2-core machine); fork starts in well under a second."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_main, nprocs=world_size, start_method="fork",
                           args=(world_size, os.path.join(tmp, "init"), tmp, worker, args, backend))
        return [torch.load(os.path.join(tmp, f"rank{r}.pth"), weights_only=False)
                for r in range(world_size)]


def rank_slice(x, rank, world_size):
    """This rank's share of a global batch, as DistributedSampler deals it: every
    world_size-th sample starting at `rank` (its indices[rank::world_size])."""
    return x[rank::world_size]
