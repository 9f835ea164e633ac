"""Check a teacher-signal cache for damage: every shard file against the list its shard wrote.

    alignkd verify-cache demo-out/cache            # every file hashed; exit status 1 if damaged
    alignkd verify-cache demo-out/cache --quick    # file lists and sizes only, no hashing
    alignkd verify-cache s3://bucket/cache         # a cache at an fsspec URL: the same checks

    report = verify_cache("demo-out/cache")        # CacheVerification
    report.damaged                                 # {"train-000003": ["file attn_L00/c/0/0/0 is missing"]}

What is checked (the file list, `ShardMeta.files`, is described in cache_schemas/v3.py):
  * the root metadata and each shard's attributes against the schema (CacheSchemaError for
    the root: without it nothing can be read; a shard whose attributes fail is damaged);
  * each shard directory's files against its list: none missing, none extra, each of the
    listed size and, unless `hashes=False`, the listed sha256;
  * each shard's arrays against the schema (names, dtypes, shapes, offsets), as the reader
    checks them when it opens a shard;
  * a shard directory without its zarr.json: its attributes are lost, and readers would
    silently skip its samples, so it counts as damaged;
  * a sample key stored in two shards;
  * a recompute cache's teacher slice (alignkd.cache.teacher_slice): slice.json against the
    schema, its tensors' size and, with hashes, sha256; reported under the name "teacher_slice".
Leftover temporary shards (`.{name}.tmp-...`) are listed but are not damage: no reader looks
at them and the next `extract-teacher` run removes them.

At a URL (alignkd.cache.remote) the same checks run on objects: one listing gives every
shard's objects and sizes, hashing downloads them (in concurrent batches), and shards are
checked 16 at a time (each costs requests, not disk reads). A shard prefix without its
zarr.json is a shard whose upload never finished, so there it counts as partial, not damaged:
the marker is written last, so its absence is exactly what an interrupted upload leaves.

A damaged shard is repaired by deleting its directory and running the same extract-teacher
job again: extraction resumes by shard and redoes exactly the missing ones.

Cost: `hashes=True` reads every byte of the cache once (sha256 runs at about 1.5 GB/s on one
core with SHA extensions, so disk speed usually sets the pace). `train-student` runs the
`hashes=False` pass before its first step, which only lists directories and reads sizes, and
the reader checks each chunk when it first reads it (its crc32c in a packed file, the file's
sha256 where each chunk is a file): damage is never trained on, and a multi-terabyte cache
is not re-hashed on every start.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from alignkd.cache import remote
from alignkd.cache.integrity import check_objects, check_shard_files
from alignkd.cache.reader import open_shard
from alignkd.cache.store import list_complete_shards, read_cache_meta, read_shard_meta
from alignkd.cache_schemas import SHARDS_GROUP, TEACHER_SLICE, CacheMeta, CacheSchemaError, ShardMeta

__all__ = ["CacheVerification", "check_shard_files", "verify_cache"]


@dataclass
class CacheVerification:
    """What `verify_cache` found. `damaged` maps a shard name to its problems, each one line
    naming the file or array; a cache is intact when `damaged` is empty."""

    path: str
    shards: int = 0
    files: int = 0
    bytes: int = 0
    hashed: bool = True
    damaged: dict[str, list[str]] = field(default_factory=dict)
    partial: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged


def verify_cache(path: str | os.PathLike, *, hashes: bool = True) -> CacheVerification:
    """Check every shard of the cache at `path` (see the module docstring). Raises
    CacheSchemaError only when the root itself is unreadable (not a cache, bad metadata)."""
    url = remote.is_url(path)
    root = path.rstrip("/") if url else Path(path)
    meta = read_cache_meta(root)
    report = CacheVerification(path=str(root), hashed=hashes)
    if url:
        fs, prefix = remote.filesystem(root)
        objects = remote.list_shard_prefixes(fs, f"{prefix}/{SHARDS_GROUP}")
        complete = sorted(n for n, objs in objects.items() if not n.startswith(".") and remote.MARKER in objs)
        report.partial = sorted(set(objects) - set(complete))

        def check(name: str) -> tuple[ShardMeta | None, list[str]]:
            return _check_shard(root, meta, name, lambda s: check_objects(
                fs, f"{prefix}/{SHARDS_GROUP}/{name}", objects[name], s.files, hashes))

        with ThreadPoolExecutor(16) as pool:
            checked = list(pool.map(check, complete))
    else:
        shards_dir = root / SHARDS_GROUP
        complete = list_complete_shards(root)
        if shards_dir.is_dir():
            for p in sorted(shards_dir.iterdir()):
                if p.name.startswith("."):
                    report.partial.append(p.name)
                elif p.is_dir() and p.name not in complete:
                    report.damaged[p.name] = ["zarr.json is missing: the shard's attributes are lost"]
        checked = (_check_shard(root, meta, name, lambda s, name=name: check_shard_files(
            shards_dir / name, s.files, hash_files=hashes)) for name in complete)
    owner: dict[str, str] = {}
    for name, (shard, problems) in zip(complete, checked):
        report.shards += 1
        if shard is None:
            report.damaged[name] = problems
            continue
        report.files += len(shard.files)
        report.bytes += sum(d.size for d in shard.files.values())
        for key in shard.keys:
            if key in owner:
                problems.append(f"sample {key} is also in shard {owner[key]}")
            owner.setdefault(key, name)
        if problems:
            report.damaged[name] = problems
    if meta.signals == "recompute":  # its teacher slice serves every sample: checked like a shard
        from alignkd.cache.teacher_slice import check_teacher_slice

        problem = check_teacher_slice(root, hashes=hashes)
        if problem:
            report.damaged[TEACHER_SLICE] = [problem]
    return report


def _check_shard(root: Path | str, meta: CacheMeta, name: str,
                 check_files: Callable[[ShardMeta], list[str]]) -> tuple[ShardMeta | None, list[str]]:
    """(its ShardMeta, or None if that is unreadable; its problems) for one complete shard."""
    try:
        shard = read_shard_meta(root, name)
    except CacheSchemaError as e:
        return None, [str(e)]
    problems = check_files(shard)
    if not problems:
        try:
            # arrays against the schema, offsets against the rows (the files were just checked)
            open_shard(root, meta, shard, check_files=False)
        except CacheSchemaError as e:
            problems.append(str(e))
    return shard, problems
