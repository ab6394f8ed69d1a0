"""Time-to-accuracy: train_ssl.py in the background, and the k-NN top-1 of its checkpoints
against the training wall time, resumable across sessions of at most 10 minutes.

    python bench/tta.py start  --dir runs/tta -- --method simclr --data_path <cifar10> ...
    python bench/tta.py status --dir runs/tta
    python bench/tta.py stop   --dir runs/tta

bench/gpu_suite.py's time-to-accuracy row starts one short run (the recipe is there) in its own
process group and stops it when the row's time is up. `start` returns at once: a watcher
process (in its own session unless new_session=False) runs train_ssl.py with
--output_dir <dir>/train and evaluates its checkpoint.pth while it trains. Starting again after
a stop (or after the machine went away, if <dir> was kept) resumes the same run: train_ssl.py
restarts from <dir>/train/checkpoint.pth, and the first start's command is kept.

<dir>/config.json      the train_ssl.py flags and the evaluation settings (fixed at the first start)
<dir>/train/           train_ssl.py's output_dir: checkpoint.pth, log.txt
<dir>/train.log        its stdout and stderr; <dir>/watch.log the watcher's
<dir>/progress.jsonl   one line per evaluated checkpoint:
                       {"epoch", "train_s", "knn_top1", "knn_top5", "eval_s", "session"}
<dir>/state.json       {"pid", "past_s", "session_s", "sessions", "epoch", "status"}

train_s is the wall time of training up to the moment the epoch's line reached log.txt, summed
over sessions: every second a session ran counts, start-up and work lost at a stop included, so
it never flatters. The k-NN runs beside the training, on the same device (it slows the
training a little; its own time is eval_s, not part of train_s).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from core import cli  # noqa: E402  (standard library only: the watcher imports torch later)


# ============ the files of a run ============

def _read_json(path, default):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def _write_json(path, obj):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_progress(run_dir):
    """The evaluated checkpoints, in order: list of dicts (see the module docstring)."""
    path = Path(run_dir) / "progress.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_state(run_dir):
    return _read_json(Path(run_dir) / "state.json", {})


def epochs_logged(run_dir):
    """Epochs finished by train_ssl.py: its log.txt holds one JSON line per epoch."""
    path = Path(run_dir) / "train" / "log.txt"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"epoch"' in line)


def clean_env():
    """The environment without a parent's process-group variables: train_ssl.py must pick its
    own port, not the one the calling process (e.g. the suite) listens on."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _alive(pid):
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a finished child of this process stays a zombie until reaped
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True  # not our child: alive as far as kill(0) knows


def is_running(run_dir):
    return _alive(read_state(run_dir).get("pid"))


# ============ start / stop (called by the suite) ============

def start(run_dir, train_args, eval_every=1, knn_k=20, eval_batch=512, eval_workers=4,
          new_session=True):
    """Start (or resume) the run in the background; returns its status: "running" (started now
    or already), "done" or "failed". train_args: train_ssl.py's flags without --output_dir.
    A run directory keeps the flags of its first start: a different recipe needs a new dir.
    new_session: the watcher (and its training) in a session of its own, so that it outlives
    the caller (the CLI's `start`); False keeps it in the caller's process group, which then
    stops it by killing that group (bench/gpu_suite.py's rows)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"train_args": list(train_args), "eval_every": eval_every, "knn_k": knn_k,
              "eval_batch": eval_batch, "eval_workers": eval_workers}
    old = _read_json(run_dir / "config.json", None)
    if old is not None and old["train_args"] != config["train_args"]:
        raise ValueError(f"{run_dir} holds a time-to-accuracy run with other flags "
                         f"({' '.join(old['train_args'])}); use another directory or delete it")
    if old is None:
        _write_json(run_dir / "config.json", config)
    state = read_state(run_dir)
    if _alive(state.get("pid")):
        return "running"
    if state.get("status") in ("done", "failed"):
        return state["status"]
    with open(run_dir / "watch.log", "a") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "watch",
                                 "--dir", str(run_dir)], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=new_session,
                                env=clean_env())
    state = read_state(run_dir)  # the watcher may have written it already
    if not _alive(state.get("pid")):
        state["pid"] = proc.pid
        _write_json(run_dir / "state.json", {**state, "status": "running"})
    return "running"


def stop(run_dir, timeout=90):
    """Stop the watcher and its training (SIGTERM; the training keeps its last checkpoint).
    Returns True if something was running."""
    pid = read_state(run_dir).get("pid")
    if not _alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        try:
            own_group = os.getpgid(pid) == pid
        except ProcessLookupError:
            return True
        if own_group:  # its own session: the watcher and train_ssl.py
            os.killpg(pid, signal.SIGKILL)
        else:  # in the caller's process group: the two by their ids
            for p in (read_state(run_dir).get("train_pid"), pid):
                if _alive(p):
                    os.kill(p, signal.SIGKILL)
    return True


# ============ the watcher (runs in the background) ============

def knn_of_checkpoint(path, dataset, data_path, k, batch_size, num_workers, device):
    """(epoch, top1, top5) of the k-NN classifier on the backbone in checkpoint `path`."""
    import torch

    from core.checkpoint import checkpoint_args, load_file, load_pretrained_weights
    from core.knn import knn_eval_backbone
    from models import build_backbone, vit_shape

    ckpt = load_file(path)
    a = checkpoint_args(ckpt)
    backbone, _ = build_backbone(a["arch"], patch_size=a.get("patch_size", 16),
                                 img_size=[a["input_size"]], cifar_stem=a.get("cifar_stem", False),
                                 **vit_shape(a))
    load_pretrained_weights(backbone, path, "teacher", ckpt=ckpt)
    device = torch.device(device)
    top1, top5 = knn_eval_backbone(backbone.to(device), dataset, data_path, a["input_size"], k,
                                   batch_size, num_workers, device)
    return int(ckpt["epoch"]), top1, top5


def _flag(args, name, default=None):
    return args[args.index(name) + 1] if name in args else default


def watch(run_dir):
    """The background process: run train_ssl.py, evaluate its checkpoints, keep state.json."""
    try:
        _watch(Path(run_dir))
    except BaseException as e:
        state = read_state(run_dir)
        if state.get("status") == "running":  # not a clean stop: record why
            state.update(status="failed", pid=None, error=f"{type(e).__name__}: {e}"[:500])
            _write_json(Path(run_dir) / "state.json", state)
        raise


def _watch(run_dir):
    config = _read_json(run_dir / "config.json", None)
    if config is None:
        raise FileNotFoundError(f"{run_dir}/config.json is missing; use `tta.py start`")
    train_args = config["train_args"]
    state = read_state(run_dir)
    state["past_s"] = state.get("past_s", 0.0) + state.get("session_s", 0.0)
    state.update(pid=os.getpid(), session_s=0.0, sessions=state.get("sessions", 0) + 1,
                 status="running")
    _write_json(run_dir / "state.json", state)

    import torch

    from data import resolve_dataset

    dataset = resolve_dataset(_flag(train_args, "--dataset"), _flag(train_args, "--data_path", ""))
    device = "cpu" if "--cpu" in train_args or not torch.cuda.is_available() else "cuda"
    total_epochs = int(_flag(train_args, "--epochs"))
    session_start = time.time()
    with open(run_dir / "train.log", "a") as log:
        child = subprocess.Popen([sys.executable, "train_ssl.py", *train_args, "--output_dir",
                                  str(run_dir / "train")], cwd=REPO, stdout=log,
                                 stderr=subprocess.STDOUT, env=clean_env())
    state["train_pid"] = child.pid
    _write_json(run_dir / "state.json", state)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))

    epoch_time = {}  # epoch -> train_s when its log line appeared
    evaluated = {p["epoch"] for p in read_progress(run_dir)}
    seen = epochs_logged(run_dir)

    def save_state(**kw):
        state.update(session_s=time.time() - session_start, epoch=seen, **kw)
        _write_json(run_dir / "state.json", state)

    def evaluate():
        t = time.time()
        epoch, top1, top5 = knn_of_checkpoint(
            run_dir / "train" / "checkpoint.pth", dataset, _flag(train_args, "--data_path", ""),
            config["knn_k"], config["eval_batch"], config["eval_workers"], device)
        if epoch in evaluated:
            return
        evaluated.add(epoch)
        line = {"epoch": epoch, "train_s": round(epoch_time.get(epoch, state["past_s"] + t
                                                               - session_start), 1),
                "knn_top1": round(top1, 2), "knn_top5": round(top5, 2),
                "eval_s": round(time.time() - t, 1), "session": state["sessions"]}
        with open(run_dir / "progress.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)

    try:
        while True:
            rc = child.poll()
            n = epochs_logged(run_dir)
            if n > seen:
                when = os.path.getmtime(run_dir / "train" / "log.txt")
                for epoch in range(seen + 1, n + 1):
                    epoch_time[epoch] = state["past_s"] + when - session_start
                seen = n
                if seen % config["eval_every"] == 0 or seen == total_epochs or seen == 1:
                    evaluate()
            save_state()
            if stopping:
                save_state(status="stopped", pid=None)
                return
            if rc is not None:
                finished = rc == 0 and seen >= total_epochs
                if finished and total_epochs not in evaluated:
                    evaluate()
                save_state(status="done" if finished else "failed", pid=None, returncode=rc)
                return
            time.sleep(1.0)
    finally:  # a stop, or an error of ours: the training must not outlive its watcher
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()


def main(argv=None):
    parser = cli.ArgumentParser("minissl time-to-accuracy runner")
    parser.add_argument("command", choices=["start", "stop", "status", "watch"])
    parser.add_argument("--dir", required=True, help="The run's folder.")
    parser.add_argument("--eval_every", default=1, type=int,
                        help="Evaluate every this many epochs (and the first and last).")
    parser.add_argument("--knn_k", default=20, type=int, help="k of the k-NN classifier.")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    train_args = argv[split + 1:]  # after `--`: train_ssl.py's flags (start only)
    if args.command == "watch":
        return watch(args.dir)
    if args.command == "start":
        print(start(args.dir, train_args, args.eval_every, args.knn_k))
    elif args.command == "stop":
        print("stopped" if stop(args.dir) else "not running")
    for p in read_progress(args.dir):
        print(f"epoch {p['epoch']:4d}  {p['train_s']:8.1f} s  k-NN top-1 {p['knn_top1']:.2f}")
    print(json.dumps(read_state(args.dir)))


if __name__ == "__main__":
    cli.run(main)
