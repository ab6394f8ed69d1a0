"""Preemption: mid-epoch checkpoints, SIGTERM / SIGUSR1 / Ctrl-C, SLURM requeue, an exact resume.

Shared clusters preempt jobs and lose nodes. A run killed at any moment and started again with
the same command continues from its last checkpoint and ends with the weights an uninterrupted
run gives: bit-identical on CPU with a fixed seed and num_workers 0 (tests/test_preempt.py).

    add_args(parser)                 --checkpoint_every_iters, --checkpoint_every_minutes,
                                     --allow_world_size_change
    run = ResumableRun(args, loader, save, resume=ckpt, step_log=steps, fix="lower --lr")
    for epoch in run.epochs():       # from the checkpoint's epoch; signals caught meanwhile
        steps = run.epoch(epoch)     # (in train_one_epoch)
        for it, batch in steps:      # it: the global iteration; the resumed epoch's batches
            ...                      # the step, no host sync
            steps.update(loss, lr=lr)    # logged; nan/inf counted, read where the ranks agree
        stats = steps.averages()     # None: a signal stopped the ranks mid-epoch (saved)
        ...                          # evaluate
        run.save(epoch + 1)          # the epoch's checkpoint, through save(position)
    if run.stopped:
        code = run.finish()          # said, SLURM requeue after SIGUSR1; 130 after Ctrl-C
    Preemption                       what ResumableRun decides with: SIGTERM, SIGUSR1 and a
                                     first Ctrl-C only set a flag (the step in flight ends; a
                                     second Ctrl-C stops at once, 130); agree() compares the
                                     flags of every rank
    check_world_size(...)            a resume by another number of processes: refused, or with
                                     --allow_world_size_change true, said (new global batch, lr)
    check_position(ckpt, ...)        a mid-epoch checkpoint needs the same processes and batch
    check_resumable(path, ckpt, args)    both (eval_linear.py, finetune.py)
    gather_rank_states(logger)       every rank's random generators and running sums, on rank 0
    restore_rank_state(state, logger)
    keep_rng()                       a block that leaves the random generators as it found them
    ResumableSampler                 DistributedSampler starting `start_iter` batches in

What an exact resume needs, and where it is kept: the weights, the optimizer, the scaler and the
methods' loss buffers (DINO's centre) are state dicts; the schedules are arrays indexed by the
global iteration, so (epoch, iteration) is their step; the data order is DistributedSampler's
(seed, epoch) permutation, skipped to the iteration (the loader's set_epoch(epoch, start_iter));
stochastic depth, and the PIL path's augmentations, draw from the global generators (torch CPU
and CUDA, numpy, python), saved per rank. The tensor data path seeds each batch's views from
(seed, epoch, iteration, rank), so it is exact with any num_workers. The PIL path is exact with
num_workers 0; with DataLoader workers each worker has its own generator, seeded when the
workers start, so after a resume it draws other augmentations than the uninterrupted run (the
weights then differ as with another seed).

How the ranks agree to stop without a collective per step: a signal only sets a Python flag,
and the ranks compare their flags where the loop already reads the host: the non-finite-loss
check every print_freq steps (and at checkpoint iterations), which becomes one all-reduce of
three numbers instead of one. A per-step all-reduce would cost a host-device sync every step
(NCCL's result must be read on the host to decide). So with several ranks a stop takes effect
at most print_freq steps after the signal (10 by default, seconds of training), well inside
SLURM's warning time; one process stops at the end of the step in flight.

Ctrl-C (SIGINT) is a stop like SIGTERM: the step ends, the checkpoint is written, and the process
exits with code 130, as an interrupted command does (so `train && eval` does not go on to
evaluate a half-trained backbone). A second Ctrl-C stops at once without saving (exit 130; the
last checkpoint stays, a half-written one is removed by the next start). A terminal sends Ctrl-C
to every process of the job, and torchrun forwards the SIGINT it gets to its workers too, so a
worker sees one press as two signals milliseconds apart: signals within SAME_PRESS_S of the
first count as that press. Forked DataLoader workers inherit the handler and ignore Ctrl-C: the
main process stops them (otherwise they would die at once, and the step after it with them).

A loss that turns nan or inf ends the run the same way in every script: the step adds the loss's
non-finiteness to a device counter (no sync), the count rides on the agreement's all-reduce, and
every rank raises FloatingPointError("loss is not finite (nan/inf) at epoch E, iteration I;
stopping without saving. <the script's advice>") before anything is saved; core/cli.run prints it
as one `error:` line and exits with code 1 (as DINO's sys.exit(1)).
"""
import contextlib
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from core import dist as distu
from core.logger import MetricLogger, bool_flag

SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
if hasattr(signal, "SIGUSR1"):  # not on Windows
    SIGNALS["SIGUSR1"] = signal.SIGUSR1
SAME_PRESS_S = 1.0  # a SIGINT this soon after the first is the same Ctrl-C (see above)
INTERRUPTED = 130   # the exit code of a command stopped by Ctrl-C (128 + SIGINT)


def add_args(parser):
    """--checkpoint_every_iters and --checkpoint_every_minutes (train_ssl.py, eval_linear.py,
    finetune.py)."""
    parser.add_argument("--checkpoint_every_iters", default=0, type=int,
                        help="Also write checkpoint.pth every this many training iterations, "
                             "mid-epoch, so a preempted run loses at most that much (0: only at "
                             "the end of each epoch). Whichever of this and "
                             "--checkpoint_every_minutes comes first.")
    parser.add_argument("--checkpoint_every_minutes", default=0.0, type=float,
                        help="Also write checkpoint.pth mid-epoch every this many minutes (e.g. "
                             "20 on a cluster that preempts; 0: off). Checked every "
                             "--print_freq iterations.")
    parser.add_argument("--allow_world_size_change", default=False, type=bool_flag,
                        help="Resume a checkpoint written by another number of processes, with "
                             "the global batch (and the lr scaled to it) of this one, printed; "
                             "false: such a resume stops with one line.")


def check_args(args):
    if args.checkpoint_every_iters < 0 or args.checkpoint_every_minutes < 0:
        raise ValueError("--checkpoint_every_iters and --checkpoint_every_minutes must be >= 0 "
                         "(0 turns them off)")


# ============ signals and the agreement to stop ... ============

class Preemption:
    """Catches SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) for the life of the training loop and
    decides, with the other ranks, when to write a mid-epoch checkpoint and when to stop.
    The handlers are installed at once (install=False: by install()); close() puts the
    previous ones back."""

    def __init__(self, every_iters=0, every_minutes=0.0, device="cpu", install=True):
        self.every_iters, self.every_minutes = every_iters, every_minutes
        self.device = torch.device(device)
        self.world_size = distu.get_world_size()
        self.signal = None  # the name of the signal this rank received (the latest)
        self.received = set()  # the names of every signal this rank received
        self.exit_code = 0  # INTERRUPTED once finish() stopped after a Ctrl-C
        self._pid = os.getpid()  # a forked DataLoader worker inherits the handler: it ignores
        self._loud = distu.is_main_process()
        self._first_sigint = None  # time.monotonic() of the first Ctrl-C
        self.stop = False   # the ranks agreed to stop (after the checkpoint)
        self.where = None   # the global iteration after which they stopped
        self.agreed_signal = None  # SIGUSR1 if any rank got it, else SIGINT, else SIGTERM
        self.last_save = time.monotonic()
        self._previous = {}
        if install:
            self.install()

    def install(self):
        for signum in SIGNALS.values():
            try:
                self._previous[signum] = signal.signal(signum, self._handler)
            except ValueError:  # not the main thread (e.g. a test calling train_one_epoch)
                pass

    def _handler(self, signum, frame):  # noqa: ARG002 - a Python signal handler's signature
        # only a flag: the step in flight finishes; the lines go straight to the file descriptor,
        # as print() here could re-enter a print() the signal interrupted
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process decides, and stops it
        name = signal.Signals(signum).name
        if name == "SIGINT":
            now = time.monotonic()
            if self._first_sigint is None:
                self._first_sigint = now
                self._say("Ctrl-C: finishing this step and saving; press Ctrl-C again to stop "
                          "at once")
            elif now - self._first_sigint > SAME_PRESS_S:
                self._say("Ctrl-C again: stopping at once without saving; the last checkpoint "
                          "is kept")
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:  # noqa: BLE001 - e.g. a flush this signal interrupted
                        pass
                os._exit(INTERRUPTED)
        self.signal = name
        self.received.add(name)

    def _say(self, line):
        if self._loud:
            try:
                os.write(2, (line + "\n").encode())
            except OSError:
                pass

    def close(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _minutes_due(self):
        return bool(self.every_minutes) and \
            time.monotonic() - self.last_save >= 60 * self.every_minutes

    def _iters_due(self, it):
        return bool(self.every_iters) and (it + 1) % self.every_iters == 0

    def sync_due(self, it):
        """True after global iteration `it` if agree() must be called there: every rank computes
        the same answer without communicating (a checkpoint iteration), and a single process
        also stops or saves by the clock at the end of any step."""
        return self._iters_due(it) or (self.world_size == 1 and
                                       (self.signal is not None or self._minutes_due()))

    def agree(self, nonfinite=None, it=None):
        """Every rank at the same iteration: one all-reduce of (non-finite losses so far, ranks
        that got SIGTERM, ranks that got SIGUSR1, ranks whose checkpoint clock ran out, ranks
        that got Ctrl-C), read on the host. Returns flags.nonfinite (count), flags.stop and
        flags.save (stop implies save); after a stop, self.agreed_signal is SIGUSR1 if any rank
        got it (a requeue), else SIGINT if any rank got Ctrl-C, else SIGTERM: the same on every
        rank, and so is the exit code."""
        local = torch.tensor([0.0, float("SIGTERM" in self.received),
                              float("SIGUSR1" in self.received), float(self._minutes_due()),
                              float("SIGINT" in self.received)],
                             device=nonfinite.device if nonfinite is not None else self.device)
        if nonfinite is not None:
            local[0] += nonfinite.float()
        if self.world_size > 1:
            dist.all_reduce(local)
        n, term, usr1, due, sigint = local.tolist()
        if term + usr1 + sigint > 0 and not self.stop:
            self.stop, self.where = True, it
            self.agreed_signal = "SIGUSR1" if usr1 > 0 else "SIGINT" if sigint > 0 else "SIGTERM"
        save = self.stop or due > 0 or (it is not None and self._iters_due(it))
        return SimpleNamespace(nonfinite=int(n), stop=self.stop, save=save)

    def saved(self):
        self.last_save = time.monotonic()

    def finish(self):
        """Once the ranks stopped and rank 0 wrote the checkpoint: say so and, after SIGUSR1
        under SLURM (the warning `#SBATCH --signal=USR1@120` sends before the time limit),
        requeue the job so the same command continues. Returns the exit code the caller ends
        with (also self.exit_code): 130 after Ctrl-C, as an interrupted command; else 0."""
        global LAST_EXIT_CODE
        name = "Ctrl-C" if self.agreed_signal == "SIGINT" else self.agreed_signal
        name += "" if self.agreed_signal in self.received else " on another rank"
        at = "at the end of an epoch" if self.where is None else f"after iteration {self.where}"
        print(f"Stopped by {name} {at}; checkpoint saved. Start the same command again to "
              "continue.", flush=True)
        self.exit_code = LAST_EXIT_CODE = INTERRUPTED if self.agreed_signal == "SIGINT" else 0
        if distu.get_world_size() > 1:
            dist.barrier()  # every rank is done before the job is requeued (which kills it)
        if not distu.is_main_process() or self.agreed_signal != "SIGUSR1":
            return self.exit_code
        job = os.environ.get("SLURM_JOB_ID")
        scontrol = shutil.which("scontrol")
        if job and scontrol:
            result = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
            print(f"scontrol requeue {job}: " + ("done" if result.returncode == 0 else
                  f"failed ({result.stderr.strip() or result.returncode})"), flush=True)
        elif job:
            print("SLURM job but no scontrol on PATH: not requeued", flush=True)
        return self.exit_code


LAST_EXIT_CODE = 0  # the exit code of the last Preemption.finish() (scripts whose loop returns None)


# ============ the resumable loop of every training script ... ============

class ResumableRun:
    """The epochs and steps of a training loop that a signal may stop and a checkpoint resume:
    train_ssl.py, eval_linear.py and finetune.py run their loops through it (see the top of
    this file). It owns the resume position, the data order of a resumed epoch, the agreement
    of the ranks every print_freq steps (and at checkpoint iterations, and the epoch's last
    step), the non-finite-loss check that rides on it, the mid-epoch checkpoints, and stopping.

    args: epochs, print_freq, device, seed, world_size, batch_size_per_gpu and preempt's flags.
    batches: the training batches, with len() (steps per epoch) and set_epoch(epoch,
        start_iter) (data/loaders.py, eval_linear's FeatureBatches); without set_epoch (a list,
        in the benchmarks) the same batches every epoch, a resumed one's first skipped.
    save(position, **extra): writes the script's checkpoint with position (the keys an exact
        resume reads: "epoch", "iteration", "sampler", "ranks"); every rank calls it. None:
        no mid-epoch checkpoints (the benchmarks).
    resume: the checkpoint resumed from (its "epoch", "iteration", "ranks"), or None.
    step_log: core.logger.StepLog, where each printed line's values also go.
    batch_size: images per step and process, for the progress lines' img/s (None: not shown).
    fix: the advice the non-finite-loss error line ends with (the script's flags)."""

    def __init__(self, args, batches, save=None, resume=None, step_log=None, batch_size=None,
                 fix="Lower --lr."):
        self.args, self.batches, self._save = args, batches, save
        self.step_log, self.batch_size, self.fix = step_log, batch_size, fix
        resume = resume or {}
        self.start_epoch, self.start_iter = resume.get("epoch", 0), resume.get("iteration", 0)
        # every rank's generators and running sums, restored once the epoch's data iterator
        # exists (None from a checkpoint of another world size: the run goes on, not bit-exact)
        ranks = resume.get("ranks")
        self._resume = (self.start_iter,
                        ranks if len(ranks or ()) == distu.get_world_size() else None)
        # the signal handlers are installed when the epochs start (epochs())
        self.preemption = Preemption(args.checkpoint_every_iters, args.checkpoint_every_minutes,
                                     args.device, install=False)

    @property
    def stopped(self):
        """The ranks agreed to stop on a signal (the last checkpoint written is where it
        resumes)."""
        return self.preemption.stop

    def epochs(self):
        """The epochs left, from the resumed one; SIGTERM / SIGUSR1 / Ctrl-C caught meanwhile.
        The loop's body trains the epoch (self.epoch), breaks when that stopped mid-epoch,
        evaluates and saves the epoch (self.save); after it the ranks agree whether a signal
        came in the epoch's last step or since, and if so the loop ends there."""
        self.preemption.install()
        try:
            for epoch in range(self.start_epoch, self.args.epochs):
                yield epoch
                if self.preemption.stop or self.preemption.agree().stop:
                    return
        finally:
            self.preemption.close()

    def epoch(self, epoch):
        """The steps of `epoch` (EpochSteps), from the checkpoint's iteration if it is the
        resumed one."""
        start_iter, rank_states = self._resume if epoch == self.start_epoch else (0, None)
        self._resume = (0, None)  # (a resume happens once)
        return EpochSteps(self, epoch, start_iter, rank_states)

    def position(self, epoch, iteration, logger=None):
        """What a checkpoint needs to resume at `iteration` of `epoch` (0: its start): the data
        order ("sampler": the permutation's seed and epoch, dealt over world_size ranks in
        batches of batch_size) and every rank's generators and running sums ("ranks"). A
        collective: every rank calls it."""
        a = self.args
        return {"epoch": epoch, "iteration": iteration,
                "sampler": {"seed": a.seed, "epoch": epoch, "world_size": a.world_size,
                            "batch_size": a.batch_size_per_gpu},
                "ranks": gather_rank_states(logger)}

    def save(self, epoch, iteration=0, logger=None, **extra):
        """The checkpoint at `iteration` of `epoch` through the script's save(position,
        **extra); every rank calls it. Restarts the --checkpoint_every_minutes clock."""
        self._save(self.position(epoch, iteration, logger), **extra)
        self.preemption.saved()

    def finish(self):
        """After a loop the ranks stopped (self.stopped): says so, requeues under SLURM after
        SIGUSR1, and returns the exit code (130 after Ctrl-C, else 0)."""
        self.preemption.close()
        return self.preemption.finish()


class EpochSteps:
    """One epoch of a ResumableRun: iterating yields (global iteration, batch) from where the
    epoch starts (a resumed one: the checkpoint's iteration, with its generators and running
    sums); update(loss, **values) after each step logs the values (core.logger.MetricLogger:
    kept on the device, printed every print_freq steps) and counts a non-finite loss on the
    device; averages() after the loop. Between steps, every print_freq steps, at the epoch's
    last step and where a checkpoint is due, the ranks agree (Preemption.agree): a non-finite
    loss on any rank raises FloatingPointError; a due checkpoint is saved (not after the last
    step: the script saves the epoch); a signal ends the iteration after that save."""

    def __init__(self, run, epoch, start_iter=0, rank_states=None):
        self.run, self.epoch = run, epoch
        self.start_iter, self.rank_states = start_iter, rank_states
        if hasattr(run.batches, "set_epoch"):
            run.batches.set_epoch(epoch, start_iter)  # start_iter > 0: a resumed epoch
        self.niter = len(run.batches)  # iterations of the whole epoch, wherever it starts
        args = run.args
        self.logger = MetricLogger(
            header=f"Epoch: [{epoch}/{args.epochs}]", print_freq=args.print_freq,
            batch_size=run.batch_size,
            on_print=run.step_log.for_epoch(epoch, self.niter) if run.step_log else None)
        self.nonfinite = torch.zeros((), device=args.device)
        self.stopped = False  # by a signal, mid-epoch (checkpoint written)

    def __iter__(self):
        pre, n = self.run.preemption, self.niter
        with keep_rng():  # a DataLoader draws from torch's generator as its iterator starts
            batches = iter(self.run.batches)
        if not hasattr(self.run.batches, "set_epoch"):  # (which would have skipped them)
            batches = itertools.islice(batches, self.start_iter, None)
        if self.rank_states is not None:  # resumed: the generators and sums of the checkpoint
            restore_rank_state(self.rank_states, self.logger)
        for i, batch in enumerate(self.logger.log_every(batches, n, self.start_iter),
                                  start=self.start_iter):
            it = n * self.epoch + i  # global training iteration
            yield it, batch
            if i % self.logger.print_freq == 0 or i == n - 1 or pre.sync_due(it):
                # one all-reduce: non-finite losses, a signal on any rank, a checkpoint due
                flags = pre.agree(self.nonfinite, it)
                if flags.nonfinite:
                    self.run.preemption.close()  # (the loop ends here: handlers put back)
                    raise FloatingPointError(
                        f"loss is not finite (nan/inf) at epoch {self.epoch}, iteration {i}; "
                        f"stopping without saving. {self.run.fix}")
                if flags.save and i < n - 1 and self.run._save is not None:
                    self.run.save(self.epoch, i + 1, self.logger)
                    if flags.stop:
                        self.stopped = True
                        return

    def update(self, loss, **values):
        """After a step: its loss (a 0-d tensor, also checked for nan/inf where the ranks agree)
        and other values (tensors or floats) for the progress lines and the epoch's averages."""
        loss = loss.detach()
        self.nonfinite += ~torch.isfinite(loss)
        self.logger.update(loss=loss, **values)

    def averages(self):
        """The epoch's averages of every value, over all ranks (a collective); None when a
        signal stopped the epoch (its checkpoint is written)."""
        return None if self.stopped else self.logger.global_averages()


# ============ random generators and running sums of every rank ... ============

def rng_state():
    """The global random generators of this process, in types torch.load(weights_only=True)
    reads: torch CPU (and CUDA of the current device), numpy's legacy MT19937, python's."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def keep_rng():
    """Run a block without consuming the global random generators. Creating a DataLoader's
    iterator draws its workers' base seed from torch's generator; wrapped in keep_rng, it does
    so the same way whether the epoch starts afresh or from a checkpoint, so the generators the
    training steps see are those the checkpoint saved."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def gather_rank_states(logger=None):
    """[{"rng": rng_state(), "meters": logger.state_dict()}] of every rank, in rank order (a
    collective: every rank calls it; they are all gathered so any rank could write them)."""
    state = {"rng": rng_state(), "meters": logger.state_dict() if logger is not None else None}
    if distu.get_world_size() == 1:
        return [state]
    states = [None] * distu.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rank_state(states, logger=None):
    """This rank's entry of gather_rank_states: its generators, and its running sums into
    `logger` (so the epoch's logged averages are those of an uninterrupted epoch)."""
    state = states[distu.get_rank()]
    set_rng_state(state["rng"])
    if logger is not None and state.get("meters") is not None:
        logger.load_state_dict(state["meters"])


def check_position(ckpt, world_size, batch_size, what="--batch_size_per_gpu"):
    """A checkpoint written mid-epoch resumes exactly only with the same processes and batch
    (the epoch's data order is dealt per rank); raises a ValueError naming the way out."""
    sampler = ckpt.get("sampler") or {}
    if not ckpt.get("iteration"):
        return
    old = (sampler.get("world_size"), sampler.get("batch_size"))
    if old != (world_size, batch_size):
        raise ValueError(f"the checkpoint was written mid-epoch (epoch {ckpt['epoch']}, iteration "
                         f"{ckpt['iteration']}) by {old[0]} processes x {what} {old[1]}; this run "
                         f"has {world_size} x {batch_size}: resume with the same number of "
                         "processes and batch size, or from a snapshot written at the end of an "
                         "epoch (--resume_from)")


def check_world_size(path, ckpt, world_size, batch_size, allow, lr=None):
    """A resume by another number of processes than the run that wrote `path` trains on with
    another global batch (batch_size x processes) and, when `lr` (a function of the global
    batch) scales the learning rate with it, another lr. Refused with one line naming the way
    out, unless `allow` (--allow_world_size_change true): then one line says the new global
    batch and lr. A checkpoint written mid-epoch is refused either way (check_position).
    Returns the world size that wrote `path` (None when it did not say)."""
    stored = ckpt.get("args") or {}
    stored = getattr(stored, "world_size", None) if not isinstance(stored, dict) \
        else stored.get("world_size")
    stored = stored or (ckpt.get("sampler") or {}).get("world_size")
    if not stored or world_size is None or int(stored) == world_size:
        return stored
    stored = int(stored)
    check_position(ckpt, world_size, batch_size)
    old, new = stored * batch_size, world_size * batch_size
    change = (f"global batch {old} -> {new} ({batch_size} x {stored} -> {batch_size} x "
              f"{world_size}), " + (f"lr {lr(old):.3e} -> {lr(new):.3e}" if lr is not None
                                    else "lr unchanged (it does not scale with the batch)"))
    if not allow:
        raise ValueError(f"{path} was written by {stored} processes, this run has {world_size}: "
                         f"that changes the run ({change}); start it with {stored} processes, or "
                         "pass --allow_world_size_change true to go on with this global batch")
    print(f"Resuming {path}, written by {stored} processes, with {world_size} "
          f"(--allow_world_size_change true): {change}", flush=True)
    return stored


def check_resumable(path, ckpt, args, lr=None):
    """The resume guard of eval_linear.py and finetune.py: check_world_size (another number of
    processes: refused, or with --allow_world_size_change true said), then check_position (a
    mid-epoch checkpoint needs the same processes and batch). Returns the number of processes
    that wrote `path` (None when it did not say)."""
    written_by = check_world_size(path, ckpt, args.world_size, args.batch_size_per_gpu,
                                  args.allow_world_size_change, lr)
    check_position(ckpt, args.world_size, args.batch_size_per_gpu)
    return written_by


# ============ the data order of a resumed epoch ... ============

class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start `start_iter` batches in: the same permutation of
    (seed, epoch), its first start_iter * batch_size indices skipped. len() stays the whole
    epoch's, so the DataLoader's len() is the epoch's number of iterations."""

    def __init__(self, dataset, batch_size, **kwargs):
        super().__init__(dataset, **kwargs)
        self.batch_size, self.start_iter = batch_size, 0

    def set_epoch(self, epoch, start_iter=0):
        super().set_epoch(epoch)
        self.start_iter = start_iter

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start_iter * self.batch_size, None)
