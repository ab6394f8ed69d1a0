"""tools/pack_imagefolder.py: an ImageFolder as one file and back, byte for byte; damaged or
foreign packs and an over-budget pack end in one clear error and leave nothing behind."""
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tools.pack_imagefolder import MAGIC, info, pack, read_index, unpack, working_tree_bytes

REPO = Path(__file__).resolve().parents[1]


def tiny_tree(root):
    files = {"train/cat/0001.jpg": b"\xff\xd8\xff\xe0cat" + bytes(range(256)),
             "train/dog/0002.jpg": b"\xff\xd8dog!" * 100, "test/cat/0003.jpg": b"\xff\xd8c",
             "test/dog/empty.jpg": b"", "README.txt": "caf\u00e9 \u00fc".encode()}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / ".DS_Store").write_bytes(b"junk")  # hidden: left out
    (root / "train" / ".cache").mkdir()
    (root / "train" / ".cache" / "x").write_bytes(b"junk")
    return files


def read_tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in Path(root).rglob("*")
            if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)}


def test_round_trip(tmp_path):
    files = tiny_tree(tmp_path / "src")
    (tmp_path / ".out.unpacking-99999" / "train").mkdir(parents=True)  # an unpack killed midway
    summary = pack(tmp_path / "src", tmp_path / "p" / "tiny.pack", max_mib=0)
    assert summary["files"] == 5 and summary["bytes"] == sum(map(len, files.values()))
    assert not list((tmp_path / "p").glob("*.tmp"))
    dest = unpack(tmp_path / "p" / "tiny.pack", tmp_path / "out")
    assert read_tree(dest) == files
    assert [p.name for p in dest.iterdir() if p.name.startswith(".")] == [".pack-sha256"]
    # the same pack again: nothing to do (a file changed since stays changed)
    (dest / "README.txt").write_bytes(b"changed")
    unpack(tmp_path / "p" / "tiny.pack", dest)
    assert (dest / "README.txt").read_bytes() == b"changed"
    # another pack into the same folder replaces the old tree entirely
    (tmp_path / "src" / "train" / "cat" / "0001.jpg").unlink()
    pack(tmp_path / "src", tmp_path / "p" / "tiny2.pack", max_mib=0)
    unpack(tmp_path / "p" / "tiny2.pack", dest)
    assert read_tree(dest) == {k: v for k, v in files.items() if k != "train/cat/0001.jpg"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "p", "src"]  # no leftovers


def test_damaged_and_foreign_packs_fail_clearly(tmp_path):
    tiny_tree(tmp_path / "src")
    good = tmp_path / "tiny.pack"
    pack(tmp_path / "src", good, max_mib=0)
    blob = bytearray(good.read_bytes())
    cases = {"flipped": blob[:10] + bytes([blob[10] ^ 1]) + blob[11:],  # a data byte
             "truncated": blob[5:], "foreign": b"\xff\xd8 a jpeg, not a pack" * 3, "empty": b""}
    for name, data in cases.items():
        path = tmp_path / f"{name}.pack"
        path.write_bytes(bytes(data))
        with pytest.raises(ValueError, match="sha256|not a minissl pack|does not match"):
            unpack(path, tmp_path / name)
        assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if "unpacking" in p.name]
    # an index naming a path outside the destination is refused before anything is written
    index = zlib.compress(json.dumps({"format": "minissl-pack", "version": 1,
                                      "files": [["../evil", 1]], "bytes": 1,
                                      "sha256": ""}).encode())
    (tmp_path / "evil.pack").write_bytes(b"x" + index + struct.pack("<Q8s", len(index), MAGIC))
    assert read_index(tmp_path / "evil.pack")["files"] == [["../evil", 1]]
    with pytest.raises(ValueError, match="unsafe path"):
        unpack(tmp_path / "evil.pack", tmp_path / "sub" / "dest")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "sub" / "dest").exists()


def test_cli_packs_checks_the_budget_and_says_why(tmp_path):
    tiny_tree(tmp_path / "src")
    run = [sys.executable, "tools/pack_imagefolder.py"]
    ok = subprocess.run([*run, str(tmp_path / "src"), str(tmp_path / "a.pack")], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "packed 5 files" in ok.stdout and "with the working tree" in ok.stdout
    assert info(tmp_path / "a.pack")["files"] == 5
    # the checkout alone is larger than 0.01 MiB: refused, nothing written
    over = subprocess.run([*run, str(tmp_path / "src"), str(tmp_path / "b.pack"), "--max_mib",
                           "0.01"], cwd=REPO, capture_output=True, text=True)
    assert over.returncode == 2 and over.stderr.count("\n") == 1, over.stderr
    assert over.stderr.startswith("error:") and "--max_mib 0.01" in over.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pack", "src"]
    bad = subprocess.run([*run, str(tmp_path / "nope"), str(tmp_path / "c.pack")], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a folder" in bad.stderr
    back = subprocess.run([*run, "--unpack", str(tmp_path / "a.pack"), str(tmp_path / "u")],
                          cwd=REPO, capture_output=True, text=True)
    assert back.returncode == 0 and read_tree(tmp_path / "u") == read_tree(tmp_path / "src")


def _cifar10_jpeg():
    """The CIFAR-10 JPEG ImageFolder next to the checkout, if this machine has it."""
    candidates = [os.environ.get("MINISSL_CIFAR10_JPEG", ""),
                  REPO.parent / "shared" / "data" / "cifar10-jpeg",
                  REPO.parents[1] / "shared" / "data" / "cifar10-jpeg"]  # from a worktree
    return next((Path(c) for c in candidates if c and (Path(c) / "train").is_dir()), None)


def test_cifar10_pack_and_the_working_tree_fit_a_lent_machine(tmp_path):
    """What bench/gpu_suite.py needs on a GPU machine: the pack of CIFAR-10 plus this checkout
    stays under the 64 MiB a lent machine copies (the packer's default --max_mib check)."""
    src = _cifar10_jpeg()
    if src is None:
        pytest.skip("no CIFAR-10 JPEG folder next to the checkout (MINISSL_CIFAR10_JPEG)")
    proc = subprocess.run([sys.executable, "tools/pack_imagefolder.py", str(src),
                           str(tmp_path / "cifar10.pack")], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    summary = info(tmp_path / "cifar10.pack")
    assert summary["files"] == 60000
    assert summary["pack_bytes"] + working_tree_bytes() < 64 * 2**20, proc.stdout
