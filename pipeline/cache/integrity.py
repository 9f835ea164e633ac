"""Integrity of shard files: what a shard's file list records and how it is checked.

    shard_files(shard_dir)            # {"attn_L00/c/0": FileDigest(size, sha256), ...} as written
    check_shard_files(shard_dir, shard.files, hash_files=False)   # ["file ... is missing", ...]

Every file of a shard directory except its own zarr.json is listed in its ShardMeta (see
cache_schemas/v3.py, "Integrity"); the writer takes the list from the finished temporary
directory, the reader and `verify-cache` compare against it. The fsync helpers make a
directory's contents durable before the rename that publishes it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from alignkd.cache import remote
from alignkd.cache_schemas import FileDigest

__all__ = ["file_digest", "shard_files", "dir_bytes", "check_shard_files", "check_objects", "fsync_tree", "fsync_dir"]


def file_digest(path: str | os.PathLike) -> FileDigest:
    """Size and sha256 of one file (read in 1 MiB blocks: chunk files can be large)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return FileDigest(size=size, sha256=h.hexdigest())


def shard_files(shard_dir: str | os.PathLike) -> dict[str, FileDigest]:
    """FileDigest of every file under a shard directory except its own zarr.json (which holds
    this list), by "/"-separated path relative to the directory, sorted."""
    root = Path(shard_dir)
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p != root / "zarr.json")
    return {p.relative_to(root).as_posix(): file_digest(p) for p in paths}


def dir_bytes(path: Path) -> int:
    """Total size of the files under `path` (an array: its zarr.json and chunk files)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def fsync_tree(path: Path) -> None:
    """Flush every file and directory under `path`: the rename that publishes a shard must not
    reach the disk before its contents do."""
    for d, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(d))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_shard_files(shard_dir: str | os.PathLike, files: Mapping[str, FileDigest], *,
                      hash_files: bool | Callable[[str], bool] = True) -> list[str]:
    """Problems of one shard directory against its file list, one line each, naming the file.

    Every listed file must be there with its listed size, and no other file may be (the
    shard's own zarr.json holds the list and is not in it). `hash_files` says which files
    also get their sha256 compared: all (True), none (False), or those a predicate accepts.
    `shard_dir` may be a URL (its objects are listed and, to hash, downloaded)."""
    if remote.is_url(shard_dir):
        fs, prefix = remote.filesystem(shard_dir)
        return check_objects(fs, prefix, remote.list_files(fs, prefix), files, hash_files)
    root = Path(shard_dir)
    on_disk = {}
    for d, _, names in os.walk(root):
        for n in names:
            rel = Path(d, n).relative_to(root).as_posix()
            if rel != "zarr.json":
                on_disk[rel] = Path(d, n)
    sizes = {rel: on_disk[rel].stat().st_size for rel in set(files) & set(on_disk)}
    return _compare(set(on_disk), sizes, files, hash_files, lambda rels: {r: file_digest(on_disk[r]) for r in rels})


def check_objects(fs, prefix: str, objects: Mapping[str, int], files: Mapping[str, FileDigest],
                   hash_files: bool | Callable[[str], bool]) -> list[str]:
    """check_shard_files for a shard prefix whose objects (rel -> size) were listed already."""
    objects = {rel: size for rel, size in objects.items() if rel != remote.MARKER}

    def digests(rels: list[str]) -> dict[str, FileDigest]:
        found = remote.file_digests(fs, {f"{prefix}/{r}": objects[r] for r in rels})
        return {r: found[f"{prefix}/{r}"] for r in rels}

    return _compare(set(objects), {r: objects[r] for r in set(files) & set(objects)}, files, hash_files, digests)


def _compare(present: set[str], sizes: Mapping[str, int], files: Mapping[str, FileDigest],
             hash_files: bool | Callable[[str], bool],
             digests: Callable[[list[str]], Mapping[str, FileDigest]]) -> list[str]:
    """The problems of a shard's `present` files against its list: `sizes` of the listed ones
    that are there, `digests` to hash those of the right size that `hash_files` picks."""
    problems = [f"file {rel} is missing" for rel in sorted(set(files) - present)]
    problems += [f"file {rel if rel.isprintable() else repr(rel)} is not in the shard's file list"
                 for rel in sorted(present - set(files))]
    to_hash = [rel for rel in sorted(sizes) if sizes[rel] == files[rel].size
               and (hash_files(rel) if callable(hash_files) else hash_files)]
    hashed = digests(to_hash) if to_hash else {}
    for rel in sorted(sizes):
        want, size = files[rel], sizes[rel]
        if size != want.size:
            problems.append(f"file {rel} is {size} bytes, the shard's file list says {want.size} (truncated or altered)")
        elif rel in hashed and hashed[rel] != want:
            problems.append(f"file {rel} has changed (its sha256 differs from the shard's file list)")
    return problems
