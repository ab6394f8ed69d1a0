"""The sbatch scripts of slurm/ (issue 21: one for each pre-training and each evaluation stage):
each is valid bash, its python command line (run with a stand-in for slurm/common.sh that
records it) parses with the script's own parser, alone and with each example of its header,
and a missing DATA / WEIGHTS ends in one line naming the variable. No SLURM needed."""
import re
import shlex
import subprocess
from pathlib import Path

import pytest

import eval_compare
import eval_knn
import eval_linear
import finetune
import train_ssl
import visualize_attention

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "slurm").glob("*.sh") if p.name != "common.sh")
PARSERS = {"eval_knn.py": eval_knn.get_args_parser, "eval_linear.py": eval_linear.get_args_parser,
           "finetune.py": finetune.get_args_parser, "eval_compare.py": eval_compare.get_args_parser,
           "visualize_attention.py": visualize_attention.get_args_parser}


def test_a_script_for_each_stage():
    stages = {f"{m}_pretrain.sh" for m in ("simclr", "dino", "ibot", "rotation")} | {
        "eval_knn.sh", "eval_linear.sh", "finetune.sh", "eval_compare.sh", "visualize_attention.sh"}
    assert stages <= set(SCRIPTS)


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    """A submit folder whose slurm/common.sh writes its arguments (NUL-separated) to $ARGV_FILE."""
    root = tmp_path_factory.mktemp("submit")
    (root / "slurm").mkdir()
    (root / "slurm" / "common.sh").write_text('printf "%s\\0" "$@" > "$ARGV_FILE"\n')
    (root / "data" / "train").mkdir(parents=True)
    return root


def run_script(name, stub, extra=(), **env):
    """(exit code, stderr, the python argv common.sh was given) of `bash slurm/<name> extra`."""
    argv_file = stub / f"{name}.argv"
    argv_file.unlink(missing_ok=True)
    base = {"PATH": "/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(stub), "ARGV_FILE": str(argv_file),
            "DATA": str(stub / "data"), "WEIGHTS": str(stub / "weights.pth")}
    base.update(env)
    base = {k: v for k, v in base.items() if v is not None}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / name), *extra], cwd=ROOT, env=base,
                          capture_output=True, text=True, timeout=30)
    argv = argv_file.read_text().split("\0")[:-1] if argv_file.exists() else None
    return proc.returncode, proc.stderr, argv


def header_examples(name):
    """The flags after `slurm/<name>` in each example command of the script's header comment
    (continuation lines joined, trailing comments dropped)."""
    lines, joined = [], ""
    for line in (ROOT / "slurm" / name).read_text().splitlines():
        if not line.startswith("#") or line.startswith("#!") or line.startswith("#SBATCH"):
            continue
        text = line[1:].strip()
        joined = f"{joined} {text}" if joined else text
        if joined.endswith("\\"):
            joined = joined[:-1]
            continue
        if f"slurm/{name}" in joined:
            lines.append(shlex.split(joined.split(f"slurm/{name}", 1)[1], comments=True))
        joined = ""
    return lines


def parse(argv):
    script, flags = argv[0], argv[1:]
    assert (ROOT / script).is_file(), script
    if script == "train_ssl.py":
        return train_ssl.parse_args(flags)  # the method's flags, recipe and checks
    return PARSERS[script]().parse_args(flags)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_is_valid_bash_and_its_command_parses(name, stub):
    assert subprocess.run(["bash", "-n", str(ROOT / "slurm" / name)]).returncode == 0
    rc, err, argv = run_script(name, stub, OUT="out/x", IMAGE=None)
    assert rc == 0, err
    args = parse(argv)
    if name != "visualize_attention.sh":
        assert args.data_path == str(stub / "data")
    assert args.output_dir is None or args.output_dir == "out/x"  # eval_knn.sh writes nothing
    examples = header_examples(name)
    assert examples, f"{name} shows no example command"
    for extra in examples:
        rc, err, argv = run_script(name, stub, extra)
        assert rc == 0, (extra, err)
        args = parse(argv)
        for flag, value in zip(extra, extra[1:]):  # the extra flags come last, so they win
            got = getattr(args, flag[2:], None) if flag.startswith("--") else None
            if type(got) in (str, int, float) and not value.startswith("--"):
                assert got == type(got)(value), (flag, value, got)


@pytest.mark.parametrize("name", SCRIPTS)
def test_missing_variable_is_one_line(name, stub):
    rc, err, argv = run_script(name, stub, DATA=None, IMAGE=None)
    assert rc != 0 and argv is None  # nothing started
    assert len(err.strip().splitlines()) == 1 and re.search(r"DATA: set (IMAGE|DATA)", err), err
    if "${WEIGHTS:?" in (ROOT / "slurm" / name).read_text():  # (finetune.sh: none is scratch)
        rc, err, argv = run_script(name, stub, WEIGHTS=None)
        assert rc != 0 and argv is None
        assert len(err.strip().splitlines()) == 1 and "WEIGHTS: set WEIGHTS" in err, err
