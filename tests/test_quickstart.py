"""The README's quickstart command, read from README.md and run for one epoch instead of its
full length: the lines a new user waits for (progress with an eta, the --knn_freq number, the
end of the epoch, the trained and random-init k-NN numbers), log.txt and TensorBoard.
A subprocess with OMP_NUM_THREADS=1, about 20 CPU-seconds."""
import json
import re
import shlex

import pytest

from test_train import REPO, _run


def quickstart_argv():
    """The arguments after train_ssl.py in the README's quickstart block."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Quickstart"):]
    block = section[section.index("```bash"):section.index("```", section.index("```bash") + 7)]
    line = next(x for x in block.splitlines() if "train_ssl.py" in x)
    return shlex.split(line.split("train_ssl.py", 1)[1])


def with_flag(argv, flag, value):
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    argv = quickstart_argv()
    assert with_flag(argv, "--epochs", "8") == argv  # the README's full length, as measured
    for flag, value in (("--epochs", "1"), ("--warmup_epochs", "0"), ("--knn_freq", "1"),
                        ("--output_dir", str(out))):
        argv = with_flag(argv, flag, value)
    rc, stdout, stderr = _run(["train_ssl.py", *argv], timeout=600)
    assert rc == 0, stdout[-2000:] + stderr[-3000:]
    return out, stdout


def test_quickstart_prints_progress_and_both_knn_numbers(quickstart):
    out, stdout = quickstart
    lines = stdout.splitlines()
    # 1438 digits / batch 32 = 44 steps, each line with the epoch's eta
    progress = [x for x in lines if re.match(r"Epoch: \[0/1\] \[\d+/44\]  eta: \d+:\d\d:\d\d  ", x)]
    assert progress[0].startswith("Epoch: [0/1] [0/44]") and progress[-1].startswith("Epoch: [0/1] [43/44]")
    assert "Epoch 1/1 done; eta of the training 0:00:00" in lines
    epoch_knn = [x for x in lines if re.fullmatch(r"Epoch 1/1: 20-NN top-1 on digits test ([\d.]+)% \(\d+s\)", x)]
    assert len(epoch_knn) == 1
    found = {m.group(1): float(m.group(2)) for m in
             (re.fullmatch(r"20-NN top-1 on digits test \((pretrained|random init)\): ([\d.]+)%", x)
              for x in lines) if m}
    assert set(found) == {"pretrained", "random init"}
    assert lines[-1].startswith("20-NN top-1 on digits test (random init): ")  # the last line
    # the final check reuses the --knn_freq number of the last epoch: two evaluations, not three
    assert found["pretrained"] == float(re.search(r"test ([\d.]+)%", epoch_knn[0]).group(1))
    assert sum("20-NN evaluation of the" in x for x in lines) == 2
    assert 20 < found["random init"] < 70  # a random ViT is a weak k-NN feature on digits

    records = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert records[0]["epoch"] == 0 and records[0]["knn_top1"] == pytest.approx(found["pretrained"], abs=0.01)
    assert records[-1]["knn_top1_random_init"] == pytest.approx(found["random init"], abs=0.01)
    assert (out / "curves.png").is_file()


def test_knn_freq_reaches_tensorboard(quickstart):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = quickstart
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    # the tags name the split scored: digits' test split
    assert {"knn/top1_test", "knn/top1_pretrained_test", "knn/top1_random_init_test"} <= \
        set(acc.Tags()["scalars"])
    (event,) = acc.Scalars("knn/top1_test")
    assert event.step == 0 and 0 <= event.value <= 100
