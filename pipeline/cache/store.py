"""The cache as a whole, at a directory or an fsspec URL: its root, which shards are complete,
and the leftovers of killed writers.

    init_cache(root, meta)                  # create the cache, or check that `meta` matches it
    read_cache_meta(root)                   # its CacheMeta (migrated from older versions)
    removed = remove_partial(root)          # job start: delete what killed writers left
    done = set(list_complete_shards(root))  # resume: these shards are finished
    read_shard_meta(root, "train-000003")   # its ShardMeta (keys, skipped, bytes, codec error)

One shard is written by alignkd.cache.writer; this module never writes signal arrays. A
directory cache's root is built beside its final name and renamed in; at a URL it is uploaded
with its zarr.json last (alignkd.cache.remote). Call the removal functions only when no writer
is running (for that shard), since an in-progress shard looks exactly like a leftover one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import zarr

from alignkd.cache import remote
from alignkd.cache.integrity import fsync_dir, fsync_tree
from alignkd.cache.remote import is_url
from alignkd.cache_schemas import SHARD_LAYOUT, SHARDS_GROUP, CacheMeta, CacheSchemaError, ShardMeta, check_shard_name

__all__ = [
    "TMP_MARK",
    "init_cache",
    "read_cache_meta",
    "check_same",
    "check_writable",
    "list_complete_shards",
    "read_shard_meta",
    "remove_partial",
    "remove_partial_shard",
]

TMP_MARK = ".tmp-"
"""In the name of a temporary (unpublished) shard or root directory."""


def init_cache(cache_root: str | os.PathLike, meta: CacheMeta) -> None:
    """Create the cache at `cache_root` with `meta` as its root attributes, or, if a cache is
    there already, check that it was made with the same settings (CacheMeta.differences) and
    raise CacheSchemaError naming the differing fields if not. The stored meta is kept as is
    (its `created` and `job` stay those of the run that created it)."""
    meta.validate()
    check_writable(meta)
    if is_url(cache_root):
        return _init_remote(cache_root, meta)
    root = Path(cache_root)
    if (root / "zarr.json").exists():
        check_same(root, meta)
        return
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise CacheSchemaError(f"{root} exists and is not an alignkd cache; refusing to write into it")
    root.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed in, so a cache root is never half made, and two
    # jobs starting at once cannot both create it (the second rename fails; then we compare).
    tmp = root.parent / f".{root.name}{TMP_MARK}{uuid.uuid4().hex}"
    try:
        group = zarr.open_group(str(tmp), mode="w-", zarr_format=3, attributes=meta.to_dict())
        group.create_group(SHARDS_GROUP)
        fsync_tree(tmp)
        try:
            os.rename(tmp, root)  # replaces `root` only if it is an empty directory
        except OSError:
            if not (root / "zarr.json").exists():
                raise
            check_same(root, meta)  # someone else created it meanwhile
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(root.parent)


def _init_remote(url: str, meta: CacheMeta) -> None:
    """init_cache at a URL: the root made locally, then uploaded with its zarr.json last."""
    fs, root = remote.filesystem(url)
    if _remote_file(url, "zarr.json"):
        check_same(url, meta)
        return
    # A run that died while creating the cache leaves at most shards/zarr.json: finish it.
    if _names(fs, root) - {SHARDS_GROUP} or _names(fs, f"{root}/{SHARDS_GROUP}") - {"zarr.json"}:
        raise CacheSchemaError(f"{url} exists and is not an alignkd cache; refusing to write into it")
    with tempfile.TemporaryDirectory(prefix="alignkd-root-") as tmp:
        local = Path(tmp) / "cache"
        init_cache(local, meta)
        fs.put_file(str(local / SHARDS_GROUP / "zarr.json"), f"{root}/{SHARDS_GROUP}/zarr.json")
        remote.put_marker(fs, local / "zarr.json", f"{root}/zarr.json")  # now it is a cache
    # Object stores have no create-if-absent: read it back, so that of two jobs creating the
    # cache at once with different settings, one fails here (and every shard write checks too).
    check_same(url, meta)


def _remote_file(url: str, name: str) -> bool:
    fs, root = remote.filesystem(url)
    fs.invalidate_cache(root)
    return fs.isfile(f"{root}/{name}")


def _names(fs, prefix: str) -> set[str]:
    """Names of the entries one level under `prefix` (none if nothing is there)."""
    try:
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(prefix, detail=False)}
    except FileNotFoundError:
        return set()


def read_cache_meta(cache_root: str | os.PathLike) -> CacheMeta:
    """The cache's CacheMeta, migrated from an older schema version if needed; CacheSchemaError
    (naming the cache) for a missing cache, a newer or unknown version, or invalid metadata."""
    if is_url(cache_root):
        root, store = cache_root, remote.zarr_store(cache_root)  # one request below, not two
    else:
        root = Path(cache_root)
        store = str(root)
        if not (root / "zarr.json").is_file():
            raise CacheSchemaError(f"{root}: not an alignkd cache (no zarr.json)")
    try:
        group = zarr.open_group(store, mode="r", zarr_format=3)
    except Exception as e:  # noqa: BLE001 - any failure to open means "not a readable cache"
        if is_url(root) and isinstance(e, FileNotFoundError) and not _remote_file(root, "zarr.json"):
            raise CacheSchemaError(f"{root}: not an alignkd cache (no zarr.json)") from None
        raise CacheSchemaError(f"{root}: not a Zarr v3 group ({type(e).__name__}: {e})") from None
    return CacheMeta.from_dict(group.attrs.asdict(), source=f"cache at {root}")


def check_writable(meta: CacheMeta) -> None:
    if meta.shard_layout != SHARD_LAYOUT:
        raise CacheSchemaError(f"shard layout {meta.shard_layout} is read only: this alignkd writes shard layout "
                               f"{SHARD_LAYOUT} (extract into a new cache)")


def check_same(root: Path | str, meta: CacheMeta) -> None:
    diff = read_cache_meta(root).differences(meta)
    if diff:
        raise CacheSchemaError(
            f"cache at {root} was built with a different {', '.join(diff)}; "
            "refusing to mix (use a new --set cache.path or delete it)"
        )


# ---------------------------------------------------------------------------- shards on disk


def list_complete_shards(cache_root: str | os.PathLike) -> list[str]:
    """Names of the complete shards, sorted (temporary `.`-names are never listed)."""
    if is_url(cache_root):
        return sorted(n for n, objects in _remote_shards(cache_root).items()
                      if not n.startswith(".") and remote.MARKER in objects)
    shards = Path(cache_root) / SHARDS_GROUP
    if not shards.is_dir():
        return []
    return sorted(p.name for p in shards.iterdir() if not p.name.startswith(".") and (p / "zarr.json").is_file())


def read_shard_meta(cache_root: str | os.PathLike, name: str) -> ShardMeta:
    """ShardMeta of a complete shard (CacheSchemaError naming the shard if it is invalid)."""
    if is_url(cache_root):
        path = remote.child(cache_root, SHARDS_GROUP, check_shard_name(name))
        try:  # one request: a missing marker is a missing group
            group = zarr.open_group(remote.zarr_store(path), mode="r", zarr_format=3)
        except FileNotFoundError:
            raise CacheSchemaError(f"shard {path}: no such complete shard") from None
        return _shard_meta(group, path, name)
    path = Path(cache_root) / SHARDS_GROUP / check_shard_name(name)
    if not (path / "zarr.json").is_file():
        raise CacheSchemaError(f"shard {path}: no such complete shard")
    return _shard_meta(zarr.open_group(str(path), mode="r", zarr_format=3), path, name)


def _shard_meta(group: zarr.Group, path: Path | str, name: str) -> ShardMeta:
    shard = ShardMeta.from_dict(group.attrs.asdict(), source=f"shard {path}")
    if shard.name != name:
        raise CacheSchemaError(f"shard {path}: its attributes name it {shard.name!r}")
    return shard


def remove_partial(cache_root: str | os.PathLike) -> list[str]:
    """Delete every leftover temporary shard directory (at a URL: every shard prefix without
    its marker); returns their names, sorted."""
    if is_url(cache_root):
        partial = [n for n, objects in _remote_shards(cache_root).items()
                   if remote.MARKER not in objects or (n.startswith(".") and TMP_MARK in n)]
        return _remove_remote(cache_root, partial)
    shards = Path(cache_root) / SHARDS_GROUP
    if not shards.is_dir():
        return []
    return _remove([p for p in shards.iterdir() if p.name.startswith(".") and TMP_MARK in p.name])


def remove_partial_shard(cache_root: str | os.PathLike, name: str) -> list[str]:
    """Delete the leftover temporary directories of shard `name` only (a retried shard)."""
    if is_url(cache_root):
        fs, root = remote.filesystem(cache_root)
        objects = remote.list_files(fs, f"{root}/{SHARDS_GROUP}/{check_shard_name(name)}")
        return _remove_remote(cache_root, [name] if objects and remote.MARKER not in objects else [])
    shards = Path(cache_root) / SHARDS_GROUP
    if not shards.is_dir():
        return []
    prefix = f".{check_shard_name(name)}{TMP_MARK}"
    return _remove([p for p in shards.iterdir() if p.name.startswith(prefix)])


def _remove(paths: list[Path]) -> list[str]:
    for p in paths:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return sorted(p.name for p in paths)


def _remote_shards(url: str) -> dict[str, dict[str, int]]:
    """Every shard prefix of the cache at `url` with its objects (one listing)."""
    fs, root = remote.filesystem(url)
    return remote.list_shard_prefixes(fs, f"{root}/{SHARDS_GROUP}")


def _remove_remote(url: str, names: list[str]) -> list[str]:
    fs, root = remote.filesystem(url)
    for name in names:
        remote.remove_prefix(fs, f"{root}/{SHARDS_GROUP}/{name}")
    return sorted(names)
