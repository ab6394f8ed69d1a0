"""Checkpoints: atomic saves, resume, and loading pretrained weights into a bare backbone; the
output folder made and checked writable before a run starts (make_output_dir), locked for the
run (lock_output_dir: one run per folder), and the resume guard every script shares
(check_same_run: never resume another run's checkpoint). Every file of ours is read through
load_file (torch.load with weights_only=True, never unpickling code: tests/test_errors.py scans
the source for any other torch.load).

Training checkpoints are one dict with the official key names (facebookresearch/dino):
{"student", "teacher", "optimizer", "dino_loss" | "ibot_loss", "fp16_scaler", "epoch", "args"};
single-network methods (SimCLR, rotation) store their network under "model". "args" is a
plain dict so `torch.load(weights_only=True)` reads it; official DINO/iBOT checkpoints hold an
argparse.Namespace there, and `checkpoint_args` reads either. A checkpoint written mid-epoch
(core/preempt.py) also holds "iteration" (the next step of "epoch"), "sampler" and "ranks" (every
rank's random generators); "epoch" always counts the finished epochs, as DINO's.
"""
import argparse
import errno
import os
import re
import socket
import tempfile
import time
import zipfile

import numpy as np
import torch

# numpy 2 renamed numpy.core to numpy._core (the old name warns); numpy 1.x only has .core
_NP_CORE = np._core if hasattr(np, "_core") else np.core
_SAFE_GLOBALS = [argparse.Namespace, np.dtype, _NP_CORE.multiarray.scalar,
                 type(np.dtype(np.float64)), type(np.dtype(np.float32)),
                 type(np.dtype(np.int64))]


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, flushed to disk, then renamed over
    `path`, and the folder's entry flushed too: a crash, a SIGKILL or a power cut mid-write
    leaves either the old file or the new one, never a truncated one. A killed write leaves its
    `<path>.tmp.<pid>` behind; remove_stale_tmp clears those when the next run starts. A write
    the file system refuses (disk full, quota, read-only ...) removes the temporary file, keeps
    the old `path` and raises one WriteError line naming the file, the errno and the fix."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        pause = float(os.environ.get("MINISSL_TEST_SAVE_PAUSE", 0))
        if pause:  # tests only: hold the write open so that a test can kill the process in it
            time.sleep(pause)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except (OSError, RuntimeError) as e:
        cause = _os_error(e)
        if cause is None:
            raise  # not the file system's answer: a bug, with its traceback
        raise WriteError(path, cause) from None
    finally:
        try:
            if os.path.exists(tmp):
                os.remove(tmp)
        except OSError:
            pass


class WriteError(OSError):
    """A file the file system refused to write, as one line (core/cli.py prints it)."""

    def __init__(self, path, cause):
        folder = os.path.dirname(os.path.abspath(path))
        code = errno.errorcode.get(cause.errno, str(cause.errno))
        fix = {errno.ENOSPC: f"free space on the disk of {folder} or pass another --output_dir",
               errno.EDQUOT: f"free space within your disk quota ({folder}) or pass another "
                             "--output_dir",
               errno.EROFS: f"{folder} is on a read-only file system now; pass another "
                            "--output_dir",
               errno.EACCES: f"make {folder} writable or pass another --output_dir",
               errno.EPERM: f"make {folder} writable or pass another --output_dir",
               }.get(cause.errno, f"check the disk of {folder} or pass another --output_dir")
        kept = " (the previous one is kept)" if os.path.isfile(path) else ""
        self.message = (f"could not write {path}{kept}: {code} ({cause.strerror or cause}); "
                        f"{fix}")
        super().__init__(cause.errno, self.message, path)

    def __str__(self):
        return self.message


def _os_error(exc):
    """The OSError with an errno behind `exc`: itself, or the one raised while torch's zip writer
    wrote (torch re-raises a failed write as a RuntimeError, "unexpected pos ...", whose
    context is the OSError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _fsync_dir(folder):
    """Make a rename durable (POSIX: the new directory entry lives in the folder's own data)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows, where folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network file systems refuse fsync on a folder; the rename itself is atomic
    finally:
        os.close(fd)


_TMP = re.compile(r".+\.tmp\.(\d+)$")


def remove_stale_tmp(folder):
    """Delete the temporary files of save_atomic that a killed process left in `folder`
    (`<name>.tmp.<pid>`, never this process's own). Call it on rank 0 before the first save.
    Returns the names removed."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        m = _TMP.match(name)
        if m and int(m.group(1)) != os.getpid() and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    if removed:
        print(f"Removed {len(removed)} unfinished checkpoint write(s) of a killed run: "
              f"{', '.join(removed)}")
    return removed


def make_output_dir(path):
    """Create the output folder and check that this process can write in it, before any data is
    read: otherwise a read-only folder fails only at the first checkpoint, an epoch later. A
    real write, not os.access (which root and network file systems answer wrongly)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise PermissionError(f"--output_dir {path} is not a writable folder ({e.strerror or e}); "
                              "pass a folder you can write to") from None


class OutputDirInUse(OSError):
    """Another live process holds the lock of the output folder (lock_output_dir)."""


_LOCKS = {}  # real path of a locked folder -> (pid that locked it, the lock file's descriptor)


def lock_output_dir(folder):
    """One run per output folder: an exclusive flock on `folder`/.lock, taken by rank 0 before
    anything is written there and held until the process ends, however it ends (the kernel drops
    a flock with its last descriptor, so a SIGKILLed run leaves no stale lock: its pid in the
    file is simply overwritten). A second run meets OutputDirInUse: one line naming the folder
    and the holder's pid and host. Locking again in the same process is a no-op (in-process
    runs in tests). File systems without flock (some network mounts): a warning, no lock.
    Returns the lock's descriptor, or None when the folder could not be locked."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        return None
    key = os.path.realpath(folder)
    held = _LOCKS.get(key)
    if held is not None and held[0] == os.getpid():
        return held[1]
    path = os.path.join(folder, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncated before it is ours
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 200).decode(errors="replace").strip()
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OutputDirInUse(f"--output_dir {folder} is in use by another run ("
                                 f"{holder or 'its pid not written yet'}); wait for it to end "
                                 "or stop it, or pass another --output_dir") from None
        print(f"warning: could not lock {path} ({e.strerror or e}); a second run started in "
              f"{folder} would not be refused")
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _LOCKS[key] = (os.getpid(), fd)
    return fd


def unlock_output_dir(folder):
    """Release lock_output_dir(folder) before this process ends (a run called in a process
    that goes on: tests, notebooks); the file stays. A no-op if this process does not hold it."""
    if not folder:
        return
    held = _LOCKS.pop(os.path.realpath(folder), None)
    if held is not None and held[0] == os.getpid():
        os.close(held[1])


def load_file(path, mmap=False, what="checkpoint", missing_hint=None):
    """torch.load on CPU with weights_only=True: the one way this repo reads a file (a pickle
    may hold code; torch 2.5, the lowest supported, still unpickles anything by default).
    Official DINO/iBOT training checkpoints pickle an argparse.Namespace, and numpy scalars
    (their optimizer state holds numpy floats), which weights_only=True refuses; allow exactly
    those classes. mmap=True maps the tensors instead of reading them (cheap when only "args"
    is needed). Every unreadable file is one ValueError naming it: `what` it is ("checkpoint",
    "features file") and, when it does not exist, `missing_hint` (what to pass instead)."""
    if os.path.isdir(path):
        raise FileNotFoundError(f"{what} '{path}' is a folder; pass the path of a .pth file "
                                "in it (e.g. checkpoint.pth)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} '{path}' does not exist; " + (
            missing_hint or "pass the path of a .pth file written by train_ssl.py or an "
                            "official DINO/iBOT release"))
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} '{path}' is empty (0 bytes), e.g. a copy or download that "
                         "did not finish; copy it again or pass another file")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad file for the user
        if mmap:  # files of the legacy (pre-zip) format cannot be mapped: read them
            return load_file(path, what=what, missing_hint=missing_hint)
        # torch's weights-only refusal is a page of advice; its one fact is the unpickler's error
        refusal = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n|$)", str(e), re.S)
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]  # one sentence
        reason = refusal.group(1) if refusal else first
        raise ValueError(f"could not read {what} '{path}' ({type(e).__name__}"
                         f"{': ' + reason if reason else ''}); is it a complete PyTorch .pth "
                         "file?") from None


def checkpoint_args(ckpt):
    """The training flags stored in a checkpoint, as a dict: ours store a plain dict, official
    DINO/iBOT checkpoints an argparse.Namespace (read as `ckpt["args"].arch`). {} when absent."""
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def _plain(v):
    """A flag value as compared by check_same_run: lists and tuples alike (a recipe's tuple
    default and the list argparse makes of the same numbers are one value)."""
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _show(v):
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v))
    if isinstance(v, bool):
        return str(v).lower()
    return "''" if v == "" else str(v)


# Flags that say how to treat a changed run, not what it computes: never compared.
RUN_CONTROL = {"allow_world_size_change"}


def check_same_run(path, stored, current, resumable=(), first=()):
    """The resume guard: refuse to resume `path` when the run that wrote it had other flags
    than this command. stored: the flags kept in the checkpoint (checkpoint_args; None or {}
    when it kept none); current: this command's flags as a dict. Every flag in both defines
    the run except those in `resumable` (how long or how it runs: --epochs, --num_workers ...).
    Raises a one-line ValueError naming the first flag that differs (those in `first`, then
    alphabetical) and the way out; otherwise a second run in one folder would continue, or
    report, the first one's."""
    if not stored:
        raise ValueError(f"{path} holds no record of the flags of the run that wrote it, so it "
                         f"cannot be resumed safely; pass another --output_dir or delete that folder")
    order = [k for k in first if k in current] + sorted(k for k in current if k not in first)
    for k in order:
        if k in resumable or k in RUN_CONTROL or k not in stored \
                or _plain(stored[k]) == _plain(current[k]):
            continue
        raise ValueError(f"{path} was written by a run with --{k} {_show(stored[k])}, this command "
                         f"has --{k} {_show(current[k])}; pass another --output_dir or delete that "
                         "folder")


def restart_from_checkpoint(path, run_variables=None, ckpt=None, **modules):
    """Resume: load each named entry of the checkpoint into the given object (module,
    optimizer, scaler) and copy plain values (e.g. epoch) into run_variables. ckpt: the file
    already loaded (load_resume), else it is read from `path`."""
    if ckpt is None:
        if not path or not os.path.isfile(path):
            return False
        ckpt = load_file(path)
    print(f"Found checkpoint at {path}")
    for key, obj in modules.items():
        if obj is None:
            continue
        if key not in ckpt:
            print(f"=> key '{key}' not found in checkpoint '{path}'")
            continue
        if isinstance(obj, torch.nn.Module):
            msg = obj.load_state_dict(ckpt[key], strict=True)
            print(f"=> loaded '{key}' from checkpoint '{path}' with msg {msg}")
        else:
            obj.load_state_dict(ckpt[key])
            print(f"=> loaded '{key}' from checkpoint '{path}'")
    if run_variables is not None:
        for key in run_variables:
            if key in ckpt:
                run_variables[key] = ckpt[key]
    return True


def newest_snapshot(folder):
    """The numbered snapshot (checkpoint{epoch:04}.pth, --saveckp_freq) of the highest epoch in
    `folder` that is at least a complete zip archive, or None."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.fullmatch(r"checkpoint(\d+)\.pth", name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    for _, path in sorted(found, reverse=True):
        if zipfile.is_zipfile(path):  # reads only the end of the file
            return path
    return None


def load_resume(own, resume_from=""):
    """The checkpoint a run resumes from: (path, loaded dict), or (None, None) to start afresh.

    `own` is the run's checkpoint.pth, read first. If it cannot be read, the run stops with one
    line naming the file, why, and the newest snapshot to pass as --resume_from: it never falls
    back silently. With resume_from (a snapshot the user picked), that file is loaded instead,
    unless `own` was written by a run that had this same resume_from: then the same command,
    requeued, continues its own progress rather than going back to the snapshot."""
    ckpt = error = None
    if os.path.isfile(own):
        try:
            ckpt = load_file(own)
        except ValueError as e:
            error = e
    if not resume_from:
        if error is not None:
            snap = newest_snapshot(os.path.dirname(own) or ".")
            hint = (f"resume from the newest snapshot with --resume_from {snap}, or delete {own} "
                    f"to start over" if snap else f"delete {own} to start over")
            text = str(error)
            raise ValueError(f"{text} To go on, {hint}" if text.endswith("?")
                             else f"{text}; to go on, {hint}") from None
        return (own, ckpt) if ckpt is not None else (None, None)
    same = os.path.abspath(str(checkpoint_args(ckpt).get("resume_from") or ""))
    if ckpt is not None and same == os.path.abspath(resume_from):
        return own, ckpt  # this command resumed from resume_from before and went on since
    if error is not None:
        print(f"{own} cannot be read ({error}); resuming from --resume_from {resume_from} as asked")
    elif ckpt is not None:
        print(f"Resuming from --resume_from {resume_from}, not from {own} (written before that "
              "flag was given)")
    return resume_from, load_file(resume_from)


def strip_prefixes(state_dict, prefixes=("module.", "backbone.")):
    """Remove DDP's 'module.' and MultiCropWrapper's 'backbone.' prefixes (leading only).
    Keys that start with 'head.' belong to the projection/DINO head, not to the backbone."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def extract_backbone_state(ckpt, checkpoint_key="teacher"):
    """Pick the backbone weights out of any supported file:
    - our and official DINO/iBOT training checkpoints: ckpt[checkpoint_key] ('teacher' or
      'student'), keys 'backbone.*' (head keys dropped);
    - our SimCLR/rotation checkpoints: ckpt['model'] (a single network, so no teacher);
    - official released backbone weights: a bare state dict, or {'state_dict': ...};
    - a checkpoint_key that is no entry but a key prefix of those tensors (e.g.
      'module.encoder_q' of a MoCo checkpoint): the tensors under it, the prefix removed.
    Returns (state_dict, description)."""
    if not isinstance(ckpt, dict):
        raise ValueError("checkpoint is not a dict of tensors; pass a .pth state dict")
    desc = "bare state dict"
    if checkpoint_key in ckpt and isinstance(ckpt[checkpoint_key], dict):
        sd, desc = ckpt[checkpoint_key], f"key '{checkpoint_key}'"
    elif "model" in ckpt and isinstance(ckpt["model"], dict):
        sd, desc = ckpt["model"], "key 'model'"
        print(f"Checkpoint has no '{checkpoint_key}' key: using its one network ('model'), "
              "as trained by a single-network method (SimCLR, rotation).")
    elif "state_dict" in ckpt and isinstance(ckpt["state_dict"], dict):
        sd, desc = ckpt["state_dict"], "key 'state_dict'"
    else:
        tensors = {k: v for k, v in ckpt.items() if torch.is_tensor(v)}
        if not tensors:
            names = ", ".join(f"'{k}'" for k in dict.fromkeys((checkpoint_key, "model", "state_dict")))
            entries = [k for k in ckpt if isinstance(ckpt[k], dict)]
            hint = (f"pass --checkpoint_key {entries[0]}" + (f" (its entries that hold networks: "
                    f"{', '.join(entries)})" if len(entries) > 1 else "")) if entries else \
                "pass --checkpoint_key naming the network to evaluate"
            raise ValueError(f"checkpoint has no {names} entry (keys: {sorted(ckpt)[:8]}); {hint}")
        sd = tensors
    under = f"{checkpoint_key}."
    if desc != f"key '{checkpoint_key}'":
        # the prefix as written, or after DDP's 'module.' / the wrapper's 'backbone.'
        for keys in (sd, strip_prefixes(sd)):
            if any(k.startswith(under) for k in keys):
                sd = {k[len(under):]: v for k, v in keys.items() if k.startswith(under)}
                desc += f", tensors under '{under}'"
                break
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "module.head."))}
    return strip_prefixes(sd), desc


# ViT widths and ResNet block counts of the archs models/ builds, to name the --arch that fits
VIT_WIDTHS = {192: "vit_tiny", 384: "vit_small", 768: "vit_base"}
VIT_SHALLOW = {(192, 4): "vit_nano"}  # (width, blocks) of the sizes with fewer than 12 blocks
RESNET_BLOCKS = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34",
                 (3, 4, 6, 3, True): "resnet50"}  # (blocks per stage..., bottleneck)


def weights_arch(sd):
    """The --arch of a backbone state dict (prefixes already stripped), read off its tensors: a
    ViT's width (patch_embed.proj.weight) and number of blocks, a ResNet's blocks per stage and
    block type. None when it is none of models/'s."""
    w = sd.get("patch_embed.proj.weight")
    if torch.is_tensor(w) and w.ndim == 4:
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        width = int(w.shape[0])
        return VIT_SHALLOW.get((width, depth)) or VIT_WIDTHS.get(width)
    if torch.is_tensor(sd.get("conv1.weight")):
        blocks = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")})
                       for i in range(1, 5))
        return RESNET_BLOCKS.get(blocks + (any(".conv3." in k for k in sd),))
    return None


def _fit_hint(key, theirs, ours, sd, own):
    """The flag that makes the model fit a checkpoint tensor `key` of shape `theirs` (the
    model's: `ours`)."""
    if key == "conv1.weight" and theirs[-1] != ours[-1]:
        stem = {3: ("true", "3x3: the CIFAR stem"), 7: ("false", "7x7: torchvision's ImageNet "
                                                         "stem")}.get(theirs[-1])
        if stem:
            return f"pass --cifar_stem {stem[0]} (the checkpoint's conv1 is {stem[1]})"
    fixes = []
    arch = weights_arch(sd)
    if arch and arch != weights_arch(own):
        fixes.append(f"--arch {arch}")
    w = sd.get("patch_embed.proj.weight")
    if torch.is_tensor(w) and own.get("patch_embed.proj.weight") is not None \
            and w.shape[-1] != own["patch_embed.proj.weight"].shape[-1]:
        fixes.append(f"--patch_size {w.shape[-1]}")
    if fixes:
        return f"pass {' '.join(fixes)} (the checkpoint's network)"
    return "pass the --arch and --patch_size it was trained with"


def _key_prefixes(sd, own):
    """Leading prefixes ('encoder', 'module.encoder_q') under which the tensors of `sd` carry
    the model's names, most tensors first."""
    count = {}
    for k in sd:
        parts = k.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in own:
                p = ".".join(parts[:i])
                count[p] = count.get(p, 0) + 1
                break
    return sorted(count, key=lambda p: -count[p])


def load_pretrained_weights(model, path, checkpoint_key="teacher", allow_missing=("fc.", "head."),
                            ckpt=None):
    """Load a backbone from `path` into `model`. Refuses a file whose tensors do not fit with
    one line naming the flag that fixes it (--arch, --patch_size, --cifar_stem,
    --checkpoint_key); a different number of positional embeddings is adopted from the
    checkpoint (the ViT interpolates it to any input size). Prints which keys did not load.
    Returns the load message."""
    if not path:
        print("No --pretrained_weights: using RANDOM init weights (the baseline to compare with).")
        return None
    sd, desc = extract_backbone_state(load_file(path) if ckpt is None else ckpt, checkpoint_key)
    own = model.state_dict()
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape \
            and sd["pos_embed"].shape[-1] == own["pos_embed"].shape[-1]:
        # The ViT interpolates its positional embedding to any input size, so adopt the
        # checkpoint's grid (e.g. trained at 224, evaluated on 96px STL-10).
        n = sd["pos_embed"].shape[1] - 1
        if int(n ** 0.5) ** 2 != n:
            raise ValueError(f"the pos_embed of '{path}' holds {n + 1} tokens, not a class token "
                             "plus a square grid of patches (a DeiT checkpoint with a distillation "
                             "token?); only ViTs with one class token (DINO, iBOT, timm's "
                             "vit_*_patch*) load here")
        model.pos_embed = torch.nn.Parameter(torch.zeros_like(sd["pos_embed"]))
        own = model.state_dict()
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items()
           if k in own and own[k].shape != v.shape]
    if bad:
        k, theirs, ours = next((b for b in bad if b[0] in ("conv1.weight", "patch_embed.proj.weight")),
                               bad[0])
        raise ValueError(f"checkpoint '{path}' does not fit the model ({len(bad)} shape "
                         f"mismatches, e.g. {k} {theirs} vs {ours}); "
                         f"{_fit_hint(k, theirs, ours, sd, own)}")
    matched = [k for k in sd if k in own]
    if not matched:
        prefixes = _key_prefixes(sd, own)
        if prefixes:
            example = next(k for k in sd if k.startswith(prefixes[0] + "."))
            others = f" (also under: {', '.join(prefixes[1:4])})" if len(prefixes) > 1 else ""
            raise ValueError(f"no tensor of '{path}' ({desc}) has the model's names: they sit "
                             f"under '{prefixes[0]}.' (e.g. '{example}'){others}; pass "
                             f"--checkpoint_key {prefixes[0]}")
        arch = weights_arch(sd)
        hint = f"pass --arch {arch}" if arch and arch != weights_arch(own) else \
            "wrong --arch or --checkpoint_key?"
        raise ValueError(f"no tensor of '{path}' ({desc}) matches the model's names "
                         f"(e.g. '{next(iter(sd), '')}'); {hint}")
    msg = model.load_state_dict(sd, strict=False)
    missing = [k for k in msg.missing_keys if not k.startswith(allow_missing)]
    if missing:
        arch = weights_arch(sd)
        hint = f"pass --arch {arch} (the checkpoint's network)" \
            if arch and arch != weights_arch(own) else "wrong --arch or --checkpoint_key?"
        raise ValueError(f"checkpoint '{path}' ({desc}) lacks {len(missing)} backbone "
                         f"tensors, e.g. '{missing[0]}'; {hint}")
    extra = [k for k in msg.unexpected_keys if k.startswith(("blocks.", "layer"))]
    if extra:  # a deeper network than the model: its last blocks would be dropped silently
        raise ValueError(f"checkpoint '{path}' ({desc}) has {len(extra)} tensors of blocks the "
                         f"model lacks, e.g. '{extra[0]}'; pass the --arch / --depth it was "
                         "trained with")
    print(f"Pretrained weights found at {path} ({desc}) and loaded with msg: {msg}")
    return msg
