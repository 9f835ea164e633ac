"""A cache at an fsspec URL (object storage): the storage steps the writer, reader and verify
take for it. Callers use the ordinary cache functions with a URL in place of a directory:

    init_cache("s3://bucket/caches/mobilevlm", meta)     # alignkd.cache.writer, as for a path
    write_shard("s3://bucket/caches/mobilevlm", ...)     # built locally, uploaded, then published
    CacheReader("gs://bucket/caches/mobilevlm")          # reads through zarr's FsspecStore
    verify_cache("s3://bucket/caches/mobilevlm")         # sizes and sha256 of every object

    is_url("s3://bucket/x")      # True: any "scheme://" string; a plain path is a local cache
    fs, root = filesystem(url)   # the fsspec filesystem; ValueError "pip install 'alignkd[s3]'"
                                 # when the scheme's client package is missing

The layout is the local one, object for file: `{url}/zarr.json`, `{url}/shards/zarr.json`,
`{url}/shards/{name}/zarr.json` and the arrays under it, so a cache copied between a disk and a
bucket (`gsutil cp -r`, `aws s3 sync`) stays a valid cache.

Object stores have no rename and no directories, so a shard cannot appear at once as a local
one does (built under a temporary name, renamed in). Instead its own zarr.json, which holds its
ShardMeta and so its file list, is the completion marker and is always written LAST:

    publish         built and hashed by the local writer in scratch space (see writer.py), then:
                    1. the marker of any earlier version is deleted, then every object under
                       the shard's prefix (an earlier killed attempt, or the old version);
                    2. the files are uploaded (concurrently where the filesystem can);
                    3. the prefix is listed: exactly the listed files, of their sizes, must be
                       there (a lost upload, or a stray object, is never published);
                    4. the marker is uploaded.

A shard is complete if and only if its marker exists. A worker that dies before step 4 leaves
objects without a marker: readers and `list_complete_shards` do not see them, verify-cache
lists them as partial, and the next attempt (the same worker's retry, or the next run's
`remove_partial`) deletes them and writes the shard again. The cache root is made the same
way: `shards/zarr.json` first, the root's zarr.json (its CacheMeta) last.

What this relies on: one PUT is all or nothing (true of S3 and GCS; at a `file://` URL the
marker is copied beside its name and renamed in), and listings are strongly consistent (S3 and
GCS both are). For a disk every node mounts, a plain path is the better choice: shards appear
by one rename there, with no upload step. fsspec caches directory listings per process, so
every listing here drops that cache first: a driver must see what its workers uploaded.
Credentials and endpoints come from each client's own configuration (environment, config files,
or fsspec's `FSSPEC_S3_ENDPOINT_URL`-style variables).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, WrapperStore

from alignkd.cache_schemas import CacheSchemaError, FileDigest

__all__ = [
    "is_url",
    "filesystem",
    "child",
    "list_files",
    "list_shard_prefixes",
    "remove_prefix",
    "file_digests",
    "publish",
    "put_marker",
    "zarr_store",
    "VerifyingStore",
]

# The client package, and the alignkd extra that installs it, of the schemes that need one.
_CLIENTS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
MARKER = "zarr.json"
_HASH_BATCH_BYTES = 64 * 2**20  # objects fetched together when hashing (concurrently on S3/GCS)
_GLOB = re.compile(r"[*?\[]")


def is_url(path: object) -> bool:
    """True for an fsspec URL ("s3://...", "memory://...", "file://..."); a Path never is."""
    return isinstance(path, str) and "://" in path


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path of `url` on it). A missing client package or an unknown scheme
    is one ValueError naming the URL and, for S3 and GCS, the extra to install."""
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    scheme = url.split("://", 1)[0].split("::")[-1]
    try:
        fs, path = url_to_fs(url)
    except ImportError:
        if scheme in _CLIENTS:
            package, extra = _CLIENTS[scheme]
            raise ValueError(f"{url}: {scheme}:// needs {package}: pip install 'alignkd[{extra}]'") from None
        raise ValueError(f"{url}: the fsspec filesystem for {scheme}:// is not installed") from None
    except ValueError as e:
        raise ValueError(f"{url}: {e}") from None
    if isinstance(fs, LocalFileSystem) and not fs.auto_mkdir:
        # file:// has real folders, which uploads must create; object stores have none.
        fs = LocalFileSystem(auto_mkdir=True)
    return fs, path.rstrip("/")


def child(url: str, *parts: str) -> str:
    """`url` with "/"-joined parts appended (never os.path: a URL's "//" must survive)."""
    return "/".join([url.rstrip("/"), *parts])


# ---------------------------------------------------------------------------- listing and removing


def list_files(fs: Any, prefix: str) -> dict[str, int]:
    """Size of every object under `prefix`, by "/" path relative to it ({} if there is none)."""
    prefix = prefix.rstrip("/")
    fs.invalidate_cache(prefix)  # what other processes uploaded since this one last listed
    out = {}
    for name, info in fs.find(prefix, detail=True).items():
        name = name.rstrip("/")
        if info.get("type") == "directory" or not name.startswith(prefix + "/"):
            continue
        out[name[len(prefix) + 1 :]] = int(info["size"])
    return out


def list_shard_prefixes(fs: Any, shards_prefix: str) -> dict[str, dict[str, int]]:
    """Every shard prefix under `shards_prefix`, complete or not, with its objects and sizes
    (one recursive listing for the whole cache, not one request per shard)."""
    out: dict[str, dict[str, int]] = {}
    for rel, size in list_files(fs, shards_prefix).items():
        name, sep, inside = rel.partition("/")
        if sep:  # shards/zarr.json itself belongs to no shard
            out.setdefault(name, {})[inside] = size
    return out


def remove_prefix(fs: Any, prefix: str) -> None:
    """Delete every object under `prefix` (nothing there is fine)."""
    from fsspec.implementations.local import LocalFileSystem

    prefix = prefix.rstrip("/")
    if isinstance(fs, LocalFileSystem):  # real folders, which must go too
        if fs.exists(prefix):
            fs.rm(prefix, recursive=True)
        return
    paths = [f"{prefix}/{rel}" for rel in list_files(fs, prefix)]
    if any(_GLOB.search(p) for p in paths):
        # fsspec's rm() expands glob patterns; a shard name may hold "[" or "*".
        for p in paths:
            fs.rm_file(p)
    elif paths:
        fs.rm(paths)  # S3 and GCS clients delete a list in batched requests
    fs.invalidate_cache(prefix)


# ---------------------------------------------------------------------------- hashing


def file_digests(fs: Any, sizes: Mapping[str, int]) -> dict[str, FileDigest]:
    """FileDigest of each object, by path; `sizes` (from a listing) sets the batches of about
    64 MiB fetched together, which S3 and GCS clients fetch concurrently (one object at a time
    would be bound by request latency, not bandwidth)."""
    out: dict[str, FileDigest] = {}
    batch: list[str] = []
    total = 0
    for path in [*sizes, None]:
        if path is not None and (not batch or total + sizes[path] <= _HASH_BATCH_BYTES):
            batch.append(path)
            total += sizes[path]
            continue
        for name, blob in zip(batch, fs.cat_ranges(batch, None, None)):
            if isinstance(blob, BaseException):
                raise blob
            out[name] = FileDigest(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
        batch, total = ([path], sizes[path]) if path is not None else ([], 0)
    return out


# ---------------------------------------------------------------------------- publishing


def publish(local_dir: str | Path, fs: Any, prefix: str, files: Mapping[str, FileDigest], *,
            before_marker: Callable[[], None] | None = None) -> None:
    """Upload a finished local shard directory to `prefix`, its marker last (see the module
    docstring). `files` lists every file but the marker, as a ShardMeta does;
    `before_marker` runs once they are up and checked (tests inject faults there)."""
    local_dir, prefix = Path(local_dir), prefix.rstrip("/")
    # 1. Not complete any more, then empty: the old marker goes before any object under it.
    try:
        fs.rm_file(f"{prefix}/{MARKER}")
    except FileNotFoundError:
        pass
    remove_prefix(fs, prefix)
    # 2. The files, in one call so that async clients upload them concurrently.
    names = sorted(files)
    if names:
        fs.put([str(local_dir / n) for n in names], [f"{prefix}/{n}" for n in names])
    # 3. Exactly what was uploaded is there, nothing more, nothing less.
    there = list_files(fs, prefix)
    want = {n: d.size for n, d in files.items()}
    if there != want:
        wrong = sorted(n for n in set(there) | set(want) if there.get(n) != want.get(n))
        raise OSError(f"{prefix}: after the upload {len(wrong)} object(s) are missing, extra or of the wrong "
                      f"size ({', '.join(wrong[:3])}); not publishing it")
    if before_marker is not None:
        before_marker()
    # 4. The marker: from now on it is complete.
    put_marker(fs, local_dir / MARKER, f"{prefix}/{MARKER}")


def put_marker(fs: Any, local_file: str | Path, path: str) -> None:
    """Upload a completion marker so that it appears whole or not at all: one PUT on an object
    store; on a file:// folder, where a file is written in place, a copy renamed in."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.put_file(str(local_file), tmp)
        fs.mv(tmp, path)
    else:
        fs.put_file(str(local_file), path)
    fs.invalidate_cache(path.rsplit("/", 1)[0])


# ---------------------------------------------------------------------------- reading through zarr


def zarr_store(url: str, files: Mapping[str, FileDigest] | None = None) -> FsspecStore | VerifyingStore:
    """A read-only zarr store at `url`; with `files` (a shard's file list), every object read
    whole is checked against it (VerifyingStore)."""
    filesystem(url)  # the clear error for a missing client, before zarr's own ImportError
    store = FsspecStore.from_url(url, read_only=True)
    return store if files is None else VerifyingStore(store, files=files, where=url)


class VerifyingStore(WrapperStore):
    """A read-only store that checks each object it returns against a shard's file list.

    Hashing a file before zarr reads it would read every chunk twice (from object storage:
    download it twice). So the check happens here, on the bytes zarr is about to decode: each
    listed object read whole has its size and sha256 compared, and a listed object that is
    missing is damage, not zeros (zarr would read a missing chunk as fill values). The reader
    wraps both its local (LocalStore) and its URL (FsspecStore) shards in it."""

    def __init__(self, store: Store, *, files: Mapping[str, FileDigest], where: str) -> None:
        super().__init__(store)
        self._files, self._where = files, where

    def _with_store(self, store: Store) -> VerifyingStore:
        return type(self)(store, files=self._files, where=self._where)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        want = self._files.get(key)
        if want is None:
            return value  # the shard's own zarr.json (checked by the schema)
        if value is None:
            raise CacheSchemaError(f"shard {self._where} is damaged: file {key} is missing")
        if byte_range is not None:
            return value  # a chunk of a packed file (or its index): zarr checks its crc32c
        data = value.to_bytes()
        if len(data) != want.size or hashlib.sha256(data).hexdigest() != want.sha256:
            raise CacheSchemaError(f"shard {self._where} is damaged: file {key} has changed (its sha256 differs "
                                   "from the shard's file list); `alignkd verify-cache` lists every damaged shard")
        return value

    async def _get_many(self, requests):  # through get() above, not the wrapped store's
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)
