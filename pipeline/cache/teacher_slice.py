"""The teacher slice of a recompute cache on disk: `{cache}/teacher_slice/` (cache_schemas/v3.py).

    meta = write_teacher_slice(root, tensors, fields)   # extraction, once per cache
    tensors, meta = read_teacher_slice(root)             # the student stage; CacheSchemaError if damaged
    check_teacher_slice(root, hashes=False)              # its first problem, one line, or None (verify-cache)
    slice_nbytes(root)                                   # bytes of both files, or None without a slice

`tensors` are the teacher's own tensors by the names alignkd.recompute gives them; `fields`
are SliceMeta's other fields. The tensors are written with safetensors (no pickle), their
size and sha256 go into slice.json. A directory cache builds the folder under a temporary
name and renames it in, so `teacher_slice/` is complete whenever it exists; at a URL the
tensors are uploaded first and slice.json last (it is the marker, as a shard's zarr.json is).
Reading checks the size and sha256 of the tensors before they are parsed: every problem is one
line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from alignkd.cache import remote
from alignkd.cache.integrity import fsync_dir, fsync_tree
from alignkd.cache.store import TMP_MARK
from alignkd.cache_schemas import SLICE_META, SLICE_TENSORS, TEACHER_SLICE, CacheSchemaError, SliceMeta

__all__ = ["write_teacher_slice", "read_teacher_slice", "read_slice_meta", "check_teacher_slice", "slice_nbytes"]


def write_teacher_slice(cache_root: str | os.PathLike, tensors: dict[str, torch.Tensor],
                        fields: dict[str, Any]) -> SliceMeta:
    """Write the slice (replacing one that is there) and return its SliceMeta."""
    data = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    # As JSON data, so nested fields (the tower's) are parsed and checked as slice.json will be
    meta = SliceMeta.from_dict({**fields, "tensors": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}})
    text = json.dumps(meta.to_dict(), indent=2, sort_keys=True).encode()
    if remote.is_url(cache_root):
        fs, root = remote.filesystem(str(cache_root))
        folder = f"{root}/{TEACHER_SLICE}"
        if fs.exists(f"{folder}/{SLICE_META}"):
            fs.rm_file(f"{folder}/{SLICE_META}")  # unmarked first: never a marker beside other tensors
        fs.pipe_file(f"{folder}/{SLICE_TENSORS}", data)
        fs.pipe_file(f"{folder}/{SLICE_META}", text)
        return meta
    root = Path(cache_root)
    final = root / TEACHER_SLICE
    tmp = root / f".{TEACHER_SLICE}{TMP_MARK}{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        (tmp / SLICE_TENSORS).write_bytes(data)
        (tmp / SLICE_META).write_bytes(text)
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def read_slice_meta(cache_root: str | os.PathLike) -> SliceMeta:
    """slice.json alone (CacheSchemaError naming it when it is missing or invalid)."""
    where = _path(cache_root, SLICE_META)
    try:
        raw = json.loads(_read(cache_root, SLICE_META))
    except json.JSONDecodeError as e:
        raise CacheSchemaError(f"{where}: not valid JSON ({e})") from None
    try:
        return SliceMeta.from_dict(raw, source=where)
    except CacheSchemaError as e:  # e.g. a slice written before SliceMeta.tower existed
        raise CacheSchemaError(f"{e} (run the same extract-teacher job again to rewrite the slice)") from None


def read_teacher_slice(cache_root: str | os.PathLike) -> tuple[dict[str, torch.Tensor], SliceMeta]:
    """The slice's tensors (on the CPU, in their stored dtype) and its SliceMeta, after its
    tensors' size and sha256 were checked against slice.json."""
    meta = read_slice_meta(cache_root)
    where = _path(cache_root, SLICE_TENSORS)
    data = _read(cache_root, SLICE_TENSORS)
    if len(data) != meta.tensors.size:
        raise CacheSchemaError(f"{where}: {len(data)} bytes, slice.json says {meta.tensors.size} (damaged or "
                               f"truncated: run the same extract-teacher job again to rewrite the slice)")
    if hashlib.sha256(data).hexdigest() != meta.tensors.sha256:
        raise CacheSchemaError(f"{where}: sha256 differs from slice.json's (damaged: run the same extract-teacher "
                               f"job again to rewrite the slice)")
    return load_safetensors(data), meta


def check_teacher_slice(cache_root: str | os.PathLike, *, hashes: bool = True) -> str | None:
    """The slice's first problem as one line naming the file, None when it is intact:
    slice.json against the schema, the tensors' size, and with `hashes` their sha256."""
    try:
        if hashes:
            read_teacher_slice(cache_root)
            return None
        meta = read_slice_meta(cache_root)
        where = _path(cache_root, SLICE_TENSORS)
        if remote.is_url(cache_root):
            fs, path = remote.filesystem(where)
            size = fs.size(path) if fs.exists(path) else None
        else:
            size = Path(where).stat().st_size if Path(where).is_file() else None
        if size is None:
            _read(cache_root, SLICE_TENSORS)  # the missing-file error
        if size != meta.tensors.size:
            return f"{where}: {size} bytes, slice.json says {meta.tensors.size} (damaged or truncated)"
    except CacheSchemaError as e:
        return str(e)
    return None


def slice_nbytes(cache_root: str | os.PathLike) -> int | None:
    """Bytes of the slice's two files, None when the cache has no complete slice."""
    try:
        meta = read_slice_meta(cache_root)
    except CacheSchemaError:
        return None
    return meta.tensors.size + len(_read(cache_root, SLICE_META))


def _path(cache_root: str | os.PathLike, name: str) -> str:
    if remote.is_url(cache_root):
        return remote.child(str(cache_root), TEACHER_SLICE, name)
    return str(Path(cache_root) / TEACHER_SLICE / name)


def _read(cache_root: str | os.PathLike, name: str) -> bytes:
    where = _path(cache_root, name)
    try:
        if remote.is_url(cache_root):
            fs, path = remote.filesystem(where)
            return fs.cat_file(path)
        return Path(where).read_bytes()
    except FileNotFoundError:
        raise CacheSchemaError(f"{where}: missing (a recompute cache needs its teacher slice: run the same "
                               f"extract-teacher job again to write it)") from None
