"""bench/gpu_suite.py in its tiny CPU version, as CI and a user without a GPU run it, so the
one-command GPU check cannot break between the rare GPU sessions; and train_ssl.py's
--compile on the two cases that need more than one graph (multi-crop shapes, iBOT masks)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
def _start(out, *extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "bench/gpu_suite.py", "--device", "cpu", "--out",
                             str(out), *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc, out, timeout=600):
    stdout, stderr = proc.communicate(timeout=timeout)
    proc.stdout_text, proc.stderr_text = stdout, stderr
    return proc, json.loads((out / "suite.json").read_text())


def _suite(out, *extra):
    return _finish(_start(out, *extra), out)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Every row of the CPU suite, as two runs side by side (one per core: about 30 CPU-seconds
    each): the in-process rows, and the ones that start processes (torchrun, the background
    time-to-accuracy). Generous minutes: the tiny rows have fixed sizes, so a run takes what they
    take, and a loaded CI machine skips no row for lack of time."""
    outs = [tmp_path_factory.mktemp("suite_a"), tmp_path_factory.mktemp("suite_b")]
    procs = [_start(outs[0], "--minutes", "15", "--sections", "correctness", "throughput",
                    "settings"),
             _start(outs[1], "--minutes", "15", "--sections", "distributed", "tta")]
    results = [_finish(p, o) for p, o in zip(procs, outs)]
    table = {"rows": results[0][1]["rows"] + results[1][1]["rows"]}
    return outs, [p for p, _ in results], table


def rows_of(table, section):
    return {r["name"]: r for r in table["rows"] if r["section"] == section}


def test_every_section_in_order_and_no_failure(suite):
    outs, procs, table = suite
    for proc in procs:
        assert proc.returncode == 0, proc.stdout_text[-3000:] + proc.stderr_text[-3000:]
    assert not [r for r in table["rows"] if r["status"] == "fail"]
    expected = [["environment", "correctness", "throughput", "settings"],
                ["environment", "distributed", "time-to-accuracy"]]
    for out, proc, sections in zip(outs, procs, expected):
        rows = json.loads((out / "suite.json").read_text())["rows"]
        assert list(dict.fromkeys(r["section"] for r in rows)) == sections
        # each row was printed as it was done, in the table's order
        printed = [line.split("]")[0][1:] for line in proc.stdout_text.splitlines()
                   if line.startswith("[") and ": " in line and "] " in line]
        assert list(dict.fromkeys(printed)) == sections
        md = (out / "suite.md").read_text()
        assert all(f"## {s}" in md for s in sections) and "| row | status |" in md


def test_correctness_rows(suite):
    rows = rows_of(suite[2], "correctness")
    for method, arch in (("simclr", "resnet18"), ("simclr", "vit_tiny"),
                         ("rotation", "resnet18"), ("rotation", "vit_tiny"),
                         ("dino", "vit_tiny"), ("ibot", "vit_tiny"), ("dino", "resnet18")):
        fp32 = rows[f"{method} {arch} fp32"]
        assert fp32["status"] == "pass", fp32
        assert fp32["values"]["loss_last"] < fp32["values"]["loss_first"]
        for precision in ("bf16", "fp16"):  # reported, not faked
            row = rows[f"{method} {arch} {precision}"]
            assert row["status"] == "n/a" and "cuda only" in row["note"]
    first = rows["simclr resnet18 fp32 step, cpu vs cpu"]
    assert first["status"] == "pass" and "2 threads vs 1" in first["note"]
    assert float(first["values"]["loss_rel_diff"]) <= 1e-4


def test_distributed_row_resumed(suite):
    row = rows_of(suite[2], "distributed")["torchrun --nproc_per_node=1, then resume"]
    assert row["status"] == "pass" and row["values"]["backend"] == "gloo", row


def test_throughput_rows(suite):
    rows = rows_of(suite[2], "throughput")
    eager = [r for name, r in rows.items() if name.endswith("eager")]
    assert len(eager) == 4
    for r in eager:
        v = r["values"]
        assert r["status"] == "info" and v["step_img_s"] > 0, r
        assert v["e2e_tensor_img_s"] > 0 and v["e2e_data"] == "npy", r
        assert v["GFLOP_per_img"] > 0 and v["MFU_%"] == "n/a"  # no peak known for a CPU
    compiled = rows["SimCLR ResNet-18 8px, batch 8, compiled"]
    assert compiled["status"] == "n/a" and "--cpu_compile true" in compiled["note"]


def test_settings_rows(suite):
    rows = rows_of(suite[2], "settings")
    sdpa = rows["SDPA attention kernel"]
    assert sdpa["status"] == "pass" and "flash_attention_for_cpu" in sdpa["values"]["kernel"]
    for name in ("channels_last (ResNet)", "fused AdamW", "fused SGD",
                 "DDP buffer sync / gradient_as_bucket_view"):
        assert rows[name]["status"] == "info" and rows[name]["values"]["on_ms"] > 0
    for name in ("cudnn.benchmark", "host-device syncs in the step", "pinned memory"):
        assert rows[name]["status"] == "n/a"


def test_time_to_accuracy_trained_in_the_background(suite):
    out, table = suite[0][1], suite[2]
    rows = rows_of(table, "time-to-accuracy")
    assert rows["run"]["status"] == "info" and rows["run"]["values"]["state"] == "done", rows
    epochs = [rows[f"epoch {e}"]["values"] for e in (1, 2)]
    assert 0 < epochs[0]["train_s"] < epochs[1]["train_s"]
    # 10 digit classes: chance is 10 %; any working feature extractor with labels in step
    # with the features is far above it
    assert all(e["knn_top1"] > 30 for e in epochs), epochs
    state = json.loads((out / "tta" / "state.json").read_text())
    assert state["status"] == "done" and state["pid"] is None


def test_a_second_run_keeps_what_passed(suite):
    out = suite[0][0]
    proc, table = _suite(out, "--minutes", "1", "--sections", "correctness")
    assert proc.returncode == 0, proc.stderr_text[-2000:]
    correctness = rows_of(table, "correctness").values()
    assert all(r.get("kept") for r in correctness)
    assert "(kept from an earlier run)" in proc.stdout_text
    # the rows of the sections not run this time stay in the table
    assert list(dict.fromkeys(r["section"] for r in table["rows"])) == \
        ["environment", "correctness", "throughput", "settings"]


# ============ --compile ============

def test_compile_keeps_keys_and_numbers_for_multicrop_and_masks():
    """iBOT: 2 global + 2 local crops (two shapes), masks on the global ones. The backbones are
    compiled in place (the eager backend: dynamo's capture without code generation, which a
    2-core CPU compiles in seconds); the checkpoint keys and the losses are those of eager mode,
    dynamo captured every call without a graph break, one graph per signature."""
    import train_ssl
    from bench import gpu_suite
    from torch._dynamo.utils import counters

    args, info, transform = gpu_suite.bench_args(gpu_suite.small_flags("ibot", "vit_tiny", 16),
                                                 "cpu")
    args.batch_size_per_gpu = 4
    batch = gpu_suite.fixed_batch(args, info, transform, 4)
    losses, keys = [], []
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        torch.manual_seed(0)
        model, optimizer, scaler = gpu_suite.throughput.build_training(args, 3)
        if compiled:
            train_ssl.compile_backbones(model, backend="eager")
        recorder = gpu_suite.LossRecorder(model)
        gpu_suite.run_steps(recorder, model, batch, optimizer, scaler, args, 2, 1e-4)
        losses.append(torch.stack(recorder.losses))
        keys.append(list(model.state_dict()))
    assert keys[0] == keys[1]  # no _orig_mod. prefixes: checkpoints do not change
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # student on the global crops (masked), student on the local crops, teacher
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])


# ============ the pieces the GPU machine relies on ============

def test_unpack_tree_reads_treepack_packs(tmp_path):
    """The suite unpacks a pack of a folder tree itself (the GPU machine gets only the
    checkout): [relative path, offset, length] in <pack>.json, the bytes in <pack>.bin."""
    from bench.gpu_suite import unpack_tree

    files = {"train/cat/0001.jpg": b"\xff\xd8cat", "test/dog/0002.jpg": b"dog!!", "a.txt": b""}
    entries, blob = [], b""
    for rel, data in files.items():
        entries.append([rel, len(blob), len(data)])
        blob += data
    (tmp_path / "p.bin").write_bytes(blob)
    (tmp_path / "p.json").write_text(json.dumps(entries))
    dest = unpack_tree(tmp_path / "p", tmp_path / "out")
    assert {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*")
            if p.is_file() and p.name != ".complete"} == files
    (dest / "a.txt").write_bytes(b"changed")
    unpack_tree(tmp_path / "p", dest)  # unpacked once: a second call leaves the tree alone
    assert (dest / "a.txt").read_bytes() == b"changed"


def _wait(condition, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.5)


def test_time_to_accuracy_resumes_after_a_stop(tmp_path):
    """A GPU session ends mid-run: stop, start again (a later suite run does so), and the run
    goes on from its checkpoint, its wall time counted across both sessions."""
    from bench import gpu_suite, tta

    data = gpu_suite.make_tiny_digits(tmp_path / "data", n_train=64, n_test=32)
    recipe = gpu_suite.tta_recipe("cpu", data, epochs=3)  # 64 images: one step per epoch
    run = tmp_path / "tta"
    assert tta.start(run, recipe, eval_workers=0) == "running"
    _wait(lambda: tta.epochs_logged(run) >= 1)  # stopped early in the run: 2 epochs to go
    assert tta.stop(run)
    first = tta.read_state(run)
    assert first["status"] == "stopped" and first["sessions"] == 1 and first["pid"] is None
    with pytest.raises(ValueError, match="other flags"):  # a run keeps its recipe
        tta.start(run, recipe[:-2], eval_workers=0)

    assert tta.start(run, recipe, eval_workers=0) == "running"
    _wait(lambda: tta.read_state(run).get("status") in ("done", "failed"))
    state, progress = tta.read_state(run), tta.read_progress(run)
    assert state["status"] == "done" and state["sessions"] == 2, state
    assert state["past_s"] >= first["session_s"] > 0
    epochs = [p["epoch"] for p in progress]
    assert epochs == sorted(set(epochs)) and epochs[-1] == 3
    assert progress[-1]["session"] == 2 and progress[-1]["train_s"] > first["session_s"]
    assert "Found checkpoint" in (run / "train.log").read_text()
