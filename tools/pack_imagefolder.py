"""An ImageFolder (any folder tree of files) as ONE file, and back: a dataset of 60,000 JPEGs
travels to a GPU machine with the checkout as a single git-ignored file in packs/.

    python tools/pack_imagefolder.py /path/to/cifar10-jpeg packs/cifar10.pack   # pack
    python tools/pack_imagefolder.py --unpack packs/cifar10.pack runs/data/cifar10  # unpack
    python tools/pack_imagefolder.py --info packs/cifar10.pack                   # what is in it

bench/gpu_suite.py unpacks packs/cifar10.pack itself (it imports `unpack`), once per machine.

The format (standard library only, little-endian):
    the files' bytes, back to back, in sorted path order
    the index: zlib-compressed UTF-8 JSON {"format": "minissl-pack", "version": 1,
               "files": [[relative path with "/", size], ...], "bytes": total, "sha256": hex}
               (sha256 of the file bytes above, checked while unpacking)
    16 bytes:  uint64 length of the compressed index, then the magic b"MSSLPACK"
A pack is written to <dest>.tmp and renamed when complete; an unpack is written to a sibling
folder and renamed, with <dest>/.pack-sha256 naming the pack it came from (the next unpack of
the same pack is then a no-op; one unpack into a folder at a time).

--max_mib (default 64): a lent GPU machine copies the working tree and the carried packs, at
most 64 MiB together; packing fails (and leaves nothing) when the pack plus this checkout's
working tree (git's tracked and untracked-but-not-ignored files) would not fit.
"""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from core import cli  # noqa: E402

MAGIC = b"MSSLPACK"
TRAILER = struct.Struct("<Q8s")
MARKER = ".pack-sha256"
CHUNK = 1 << 20


def tree_files(src):
    """(relative path with "/", absolute path) of every regular file under src, sorted; hidden
    files and folders (a name starting with ".") are left out."""
    src = Path(src)
    out = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if not name.startswith(".") and path.is_file():
                out.append((path.relative_to(src).as_posix(), path))
    return out


def working_tree_bytes(repo=REPO):
    """Bytes of the files a copy of the working tree carries (tracked, and untracked but not
    git-ignored); None when `repo` is not a git checkout."""
    try:
        listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    total = 0
    for rel in filter(None, listed.split(b"\0")):
        path = Path(repo) / os.fsdecode(rel)
        if path.is_file():  # a tracked file deleted in the working tree is not copied
            total += path.stat().st_size
    return total


def pack(src, dest, max_mib=64.0, repo=REPO):
    """Write the tree under `src` to the single file `dest`; returns its summary (info())."""
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise ValueError(f"{src} is not a folder; pass the root of the ImageFolder to pack "
                         "(the folder that holds train/ and test/)")
    files = tree_files(src)
    if not files:
        raise ValueError(f"{src} holds no files to pack; pass the root of an ImageFolder")
    if dest.is_dir():
        raise ValueError(f"{dest} is a folder; name the pack file, e.g. packs/cifar10.pack")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    digest, entries, total = hashlib.sha256(), [], 0
    try:
        with open(tmp, "wb") as out:
            for rel, path in files:
                data = path.read_bytes()
                out.write(data)
                digest.update(data)
                entries.append([rel, len(data)])
                total += len(data)
            index = zlib.compress(json.dumps(
                {"format": "minissl-pack", "version": 1, "files": entries, "bytes": total,
                 "sha256": digest.hexdigest()}, separators=(",", ":")).encode(), 9)
            out.write(index)
            out.write(TRAILER.pack(len(index), MAGIC))
        size = tmp.stat().st_size
        tree = working_tree_bytes(repo) if max_mib else None
        if max_mib and size + (tree or 0) > max_mib * 2**20:
            raise ValueError(
                f"the pack of {src} is {size / 2**20:.1f} MiB; with the working tree "
                f"({(tree or 0) / 2**20:.1f} MiB) that is {(size + (tree or 0)) / 2**20:.1f} MiB, "
                f"over --max_mib {max_mib:g} (what a lent GPU machine copies); pack a smaller "
                "tree, or pass --max_mib 0 to pack it anyway")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return {**info(dest), "tree_bytes": tree}


def read_index(pack_path):
    """The index of a pack (see the module docstring), with "data_start" added."""
    pack_path = Path(pack_path)
    with open(pack_path, "rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        if end < TRAILER.size:
            raise ValueError(f"{pack_path} is not a minissl pack (too short); make one with "
                             "tools/pack_imagefolder.py")
        f.seek(end - TRAILER.size)
        length, magic = TRAILER.unpack(f.read(TRAILER.size))
        if magic != MAGIC or length > end - TRAILER.size:
            raise ValueError(f"{pack_path} is not a minissl pack (no {MAGIC.decode()} trailer); "
                             "make one with tools/pack_imagefolder.py")
        f.seek(end - TRAILER.size - length)
        try:
            index = json.loads(zlib.decompress(f.read(length)))
        except (zlib.error, ValueError) as e:
            raise ValueError(f"{pack_path}: its index is damaged ({e}); pack the folder again")
    index["data_start"] = end - TRAILER.size - length - index["bytes"]
    if index["data_start"] != 0 or sum(s for _, s in index["files"]) != index["bytes"]:
        raise ValueError(f"{pack_path}: its index does not match its size (a truncated copy?); "
                         "copy or pack it again")
    return index


def info(pack_path):
    """Files, bytes, sha256 and file size of a pack."""
    index = read_index(pack_path)
    return {"files": len(index["files"]), "bytes": index["bytes"], "sha256": index["sha256"],
            "pack_bytes": Path(pack_path).stat().st_size}


def _safe(rel):
    parts = rel.split("/")
    if rel.startswith("/") or not rel or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"the pack names an unsafe path {rel!r}; it was not made by "
                         "tools/pack_imagefolder.py")
    return Path(*parts)


def unpack(pack_path, dest):
    """The tree of `pack_path` at `dest` (a folder made here); returns dest. Nothing to do when
    dest already holds this pack (its .pack-sha256); a dest from another pack is replaced."""
    pack_path, dest = Path(pack_path), Path(dest)
    index = read_index(pack_path)
    marker = dest / MARKER
    if marker.is_file() and marker.read_text().strip() == index["sha256"]:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.unpacking-*"):  # of an unpack killed midway
        shutil.rmtree(stale, ignore_errors=True)
    tmp = dest.with_name(f".{dest.name}.unpacking-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(pack_path, "rb") as blob:
            for rel, size in index["files"]:
                path = tmp / _safe(rel)
                path.parent.mkdir(parents=True, exist_ok=True)
                data = blob.read(size)
                if len(data) != size:
                    raise ValueError(f"{pack_path} ends inside {rel}; copy or pack it again")
                digest.update(data)
                path.write_bytes(data)
        if digest.hexdigest() != index["sha256"]:
            raise ValueError(f"{pack_path}: the unpacked bytes do not match the pack's sha256 "
                             "(a damaged copy); copy or pack it again")
        (tmp / MARKER).write_text(index["sha256"] + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv=None):
    parser = cli.ArgumentParser(
        "pack_imagefolder", formatter_class=cli.HelpFormatter,
        description="Pack a folder tree (an ImageFolder) into one file, or unpack it.")
    parser.add_argument("src", help="The folder to pack (with --unpack: the pack).")
    parser.add_argument("dest", nargs="?", default=None,
                        help="The pack to write, e.g. packs/cifar10.pack (with --unpack: the "
                             "folder to make).")
    parser.add_argument("--unpack", action="store_true", help="Unpack src into dest.")
    parser.add_argument("--info", action="store_true", help="Print what the pack src holds.")
    parser.add_argument("--max_mib", default=64.0, type=float,
                        help="Fail when the pack plus this checkout's working tree would exceed "
                             "this many MiB (what a lent GPU machine copies); 0: no limit.")
    args = parser.parse_args(argv)
    if args.info:
        print(json.dumps(info(args.src)))
        return 0
    if args.dest is None:
        parser.error("pass dest: the pack to write (or, with --unpack, the folder to make)")
    if args.unpack:
        n = len(read_index(args.src)["files"])
        print(f"unpacked {n} files into {unpack(args.src, args.dest)}")
        return 0
    s = pack(args.src, args.dest, args.max_mib)
    line = f"packed {s['files']} files, {s['pack_bytes'] / 2**20:.1f} MiB -> {args.dest}"
    if s["tree_bytes"] is not None:
        both = s["pack_bytes"] + s["tree_bytes"]
        line += (f"; with the working tree ({s['tree_bytes'] / 2**20:.1f} MiB): "
                 f"{both / 2**20:.1f} MiB of {args.max_mib:g} MiB")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
