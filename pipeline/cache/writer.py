"""Write the teacher-signal cache: the root once, then one shard at a time, each atomically.

    init_cache(root, meta)                  # create the cache, or check that `meta` matches it
    removed = remove_partial(root)          # job start: delete what killed writers left
    done = set(list_complete_shards(root))  # resume: these shards are finished
    shard = write_shard(root, "train-000003", samples, skipped, meta=meta,
                        input_shard="data/train-000003.tar", input_size=123456)
    read_shard_meta(root, "train-000003")   # its ShardMeta (keys, skipped, bytes, codec error)

`root` is a directory or an fsspec URL ("s3://bucket/cache", "gs://...", "file://...");
the functions take either and do the same job for both (a URL's steps are in remote.py).

The layout (array names, dtypes, shapes) is alignkd.cache_schemas.v2; the quantisers are
alignkd.cache.codecs.

Why shards are written this way (both measured here): several processes writing rows into one
Zarr store lose data, and a ZipStore shared by processes corrupts. So each shard is written by
ONE writer, as its own Zarr group under `shards/.{name}.tmp-{hex}`, and `os.rename`d to
`shards/{name}` only when every array and the shard's attributes are on disk (fsynced). A shard
directory under its final name is therefore complete, which is what lets extraction resume by
shard. A killed writer leaves only a `.tmp-` directory: readers ignore it, `remove_partial`
(or `remove_partial_shard` for one name) deletes it. Call those only when no writer is running
(for that shard), since an in-progress shard looks exactly like a leftover one.

Rewriting a shard that exists moves the old directory aside (to a `.tmp-` name) first, renames
the new one in, then deletes the old one: at every moment the final name holds either the old
complete shard, nothing, or the new complete shard, never a mix.

A cache at a URL cannot rename (object stores have none): write_shard builds the shard exactly
as above in a local temporary directory (`scratch`, default the system's temp folder), then
uploads it with its own zarr.json LAST, which marks it complete (alignkd.cache.remote). A
shard prefix without that marker is partial: readers skip it, `remove_partial` and
`remove_partial_shard` delete it, a rewrite first deletes the marker, then the old objects.

Every file of a shard except its own zarr.json is listed in its ShardMeta with size and sha256
(`files`), hashed from the finished temporary directory just before the rename, so what is
listed is exactly what gets published; alignkd.cache.verify and the reader check against it.

Every input is checked before anything is written: `meta` against the cache's root metadata and
each sample against `meta` (shapes, offsets, ranges); errors are CacheSchemaError naming the
sample key. Arrays are chunked along axis 0 at about CHUNK_BYTES uncompressed per chunk, so a
reader fetching one sample decompresses little more than it needs.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import zarr

from alignkd.cache import remote
from alignkd.cache.codecs import Codec, error_stats, get_codec
from alignkd.cache.records import SampleSignals, vision_grid
from alignkd.cache.remote import is_url
from alignkd.cache_schemas import (
    IMAGE_TOKEN,
    SCALE_SUFFIX,
    SHARDS_GROUP,
    ArraySpec,
    CacheMeta,
    CacheSchemaError,
    CodecSpec,
    SHARD_LAYOUT,
    FileDigest,
    ShardMeta,
    attention_array,
    check_shard_name,
    packed_width,
    shard_arrays,
)

__all__ = [
    "CHUNK_BYTES",
    "init_cache",
    "read_cache_meta",
    "write_shard",
    "read_shard_meta",
    "list_complete_shards",
    "remove_partial",
    "remove_partial_shard",
    "file_digest",
    "shard_files",
]

CHUNK_BYTES = 1 << 20
"""Target uncompressed bytes per chunk (at least one row or sample per chunk)."""

_TMP = ".tmp-"
_INT32 = np.iinfo(np.int32)


# ---------------------------------------------------------------------------- the root


def init_cache(cache_root: str | os.PathLike, meta: CacheMeta) -> None:
    """Create the cache at `cache_root` with `meta` as its root attributes, or, if a cache is
    there already, check that it was made with the same settings (CacheMeta.differences) and
    raise CacheSchemaError naming the differing fields if not. The stored meta is kept as is
    (its `created` and `job` stay those of the run that created it)."""
    meta.validate()
    _check_writable(meta)
    if is_url(cache_root):
        return _init_remote(cache_root, meta)
    root = Path(cache_root)
    if (root / "zarr.json").exists():
        _check_same(root, meta)
        return
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise CacheSchemaError(f"{root} exists and is not an alignkd cache; refusing to write into it")
    root.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed in, so a cache root is never half made, and two
    # jobs starting at once cannot both create it (the second rename fails; then we compare).
    tmp = root.parent / f".{root.name}{_TMP}{uuid.uuid4().hex}"
    try:
        group = zarr.open_group(str(tmp), mode="w-", zarr_format=3, attributes=meta.to_dict())
        group.create_group(SHARDS_GROUP)
        _fsync_tree(tmp)
        try:
            os.rename(tmp, root)  # replaces `root` only if it is an empty directory
        except OSError:
            if not (root / "zarr.json").exists():
                raise
            _check_same(root, meta)  # someone else created it meanwhile
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(root.parent)


def _init_remote(url: str, meta: CacheMeta) -> None:
    """init_cache at a URL: the root made locally, then uploaded with its zarr.json last."""
    fs, root = remote.filesystem(url)
    if _remote_file(url, "zarr.json"):
        _check_same(url, meta)
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
    _check_same(url, meta)


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


def _check_writable(meta: CacheMeta) -> None:
    if meta.shard_layout != SHARD_LAYOUT:
        raise CacheSchemaError(f"shard layout {meta.shard_layout} is read only: this alignkd writes shard layout "
                               f"{SHARD_LAYOUT} (extract into a new cache)")


def _check_same(root: Path | str, meta: CacheMeta) -> None:
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
                   if remote.MARKER not in objects or (n.startswith(".") and _TMP in n)]
        return _remove_remote(cache_root, partial)
    shards = Path(cache_root) / SHARDS_GROUP
    if not shards.is_dir():
        return []
    return _remove([p for p in shards.iterdir() if p.name.startswith(".") and _TMP in p.name])


def remove_partial_shard(cache_root: str | os.PathLike, name: str) -> list[str]:
    """Delete the leftover temporary directories of shard `name` only (a retried shard)."""
    if is_url(cache_root):
        fs, root = remote.filesystem(cache_root)
        objects = remote.list_files(fs, f"{root}/{SHARDS_GROUP}/{check_shard_name(name)}")
        return _remove_remote(cache_root, [name] if objects and remote.MARKER not in objects else [])
    shards = Path(cache_root) / SHARDS_GROUP
    if not shards.is_dir():
        return []
    prefix = f".{check_shard_name(name)}{_TMP}"
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


# ---------------------------------------------------------------------------- writing a shard


def write_shard(
    cache_root: str | os.PathLike,
    shard_name: str,
    samples: Sequence[SampleSignals],
    skipped: Sequence[tuple[str, str]],
    *,
    meta: CacheMeta,
    input_shard: str,
    input_size: int,
    after_array: Callable[[str], None] | None = None,
    before_publish: Callable[[], None] | None = None,
    scratch: str | os.PathLike | None = None,
) -> ShardMeta:
    """Write one complete shard (the signals of `samples`, in order, plus the `skipped`
    (key, reason) pairs of its input shard) and return its ShardMeta. A shard of zero samples
    is valid: it records that the input shard was done and why each sample was skipped.

    `after_array(name)` is called each time an array is on disk, `before_publish()` once the
    whole shard is (uploaded, for a URL) but not yet published; the extraction stage uses them
    to inject faults in tests (an exception from either aborts the shard like a failed write).
    `scratch`: for a cache at a URL, the local folder the shard is built in before upload."""
    if is_url(cache_root):
        return _write_remote(cache_root, shard_name, samples, skipped, meta=meta, input_shard=input_shard,
                             input_size=input_size, after_array=after_array, before_publish=before_publish,
                             scratch=scratch)
    root = Path(cache_root)
    check_shard_name(shard_name)
    meta.validate()
    _check_writable(meta)
    _check_same(root, meta)  # also: the cache exists
    skipped = [(str(k), str(r)) for k, r in skipped]
    _check_samples(samples, skipped, meta, where=f"shard {shard_name}")

    shards_dir = root / SHARDS_GROUP
    tmp = shards_dir / f".{shard_name}{_TMP}{uuid.uuid4().hex}"
    specs = shard_arrays(meta)
    try:
        group = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        accounting = _Accounting()
        written = []
        for name, data in _shard_arrays(samples, meta, specs, accounting):
            _check_layout(specs[name], data)
            _write_array(group, name, data, meta.codecs)
            written.append(name)
            if after_array is not None:
                after_array(name)
        if written != list(specs):  # the generator below and the schema must agree exactly
            raise RuntimeError(f"writer bug: wrote {written}, the schema lists {list(specs)}")
        shard = ShardMeta(
            name=shard_name,
            input_shard=str(input_shard),
            input_size=int(input_size),
            keys=tuple(s.key for s in samples),
            fingerprints=tuple(s.fingerprint for s in samples),
            skipped=tuple({"key": k, "reason": r} for k, r in skipped),
            num_samples=len(samples),
            codec_error=accounting.errors(),
            nbytes={name: _dir_bytes(tmp / name) for name in specs},
            raw_fp16_bytes=dict(accounting.raw_fp16),
            files=shard_files(tmp),
        )
        shard.validate()
        group.attrs.update(shard.to_dict())
        _fsync_tree(tmp)
        if before_publish is not None:
            before_publish()
        _install(tmp, shards_dir / shard_name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return shard


def _write_remote(url: str, shard_name: str, samples: Sequence[SampleSignals], skipped: Sequence[tuple[str, str]],
                  *, meta: CacheMeta, input_shard: str, input_size: int, after_array: Callable[[str], None] | None,
                  before_publish: Callable[[], None] | None, scratch: str | os.PathLike | None) -> ShardMeta:
    """write_shard at a URL: the local writer builds and hashes the shard in a throwaway local
    cache, then remote.publish uploads it, its marker (zarr.json) last."""
    check_shard_name(shard_name)
    meta.validate()
    _check_writable(meta)
    _check_same(url, meta)  # also: the cache exists
    fs, root = remote.filesystem(url)
    if scratch is not None:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="alignkd-shard-", dir=scratch) as tmp:
        local = Path(tmp) / "cache"
        init_cache(local, meta)
        shard = write_shard(local, shard_name, samples, skipped, meta=meta, input_shard=input_shard,
                            input_size=input_size, after_array=after_array)
        remote.publish(local / SHARDS_GROUP / shard_name, fs, f"{root}/{SHARDS_GROUP}/{shard_name}", shard.files,
                       before_marker=before_publish)
    return shard


def _write_array(group: zarr.Group, name: str, data: np.ndarray, codecs: CodecSpec) -> None:
    """One array, chunked along axis 0 and compressed."""
    row_bytes = max(1, math.prod(data.shape[1:]) * data.dtype.itemsize)
    rows = min(max(1, CHUNK_BYTES // row_bytes), max(1, data.shape[0]))
    array = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=(rows, *data.shape[1:]),
        compressors=_compressors(codecs),
        fill_value=0,
    )
    if data.size:
        array[...] = data


def _compressors(codecs: CodecSpec) -> list | None:
    if codecs.compressor == "zstd":
        # The checksum lets a reader detect a corrupted chunk instead of decoding garbage.
        return [zarr.codecs.ZstdCodec(level=codecs.level, checksum=True)]
    if codecs.compressor == "blosc":
        return [zarr.codecs.BloscCodec(cname="zstd", clevel=codecs.level, shuffle="shuffle")]
    return None


def _install(tmp: Path, final: Path) -> None:
    """Rename a finished shard into place; an existing one goes aside first, then is deleted."""
    aside = None
    if final.exists():
        aside = final.with_name(f".{final.name}{_TMP}{uuid.uuid4().hex}.replaced")
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError:
        if aside is not None:
            os.rename(aside, final)  # put the old complete shard back
        raise
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside)


# ---------------------------------------------------------------------------- arrays of a shard


class _Accounting:
    """Codec error (per lossy float signal) and raw fp16 size (per float signal), summed over
    samples: the mean is weighted by element count."""

    def __init__(self) -> None:
        self.raw_fp16: dict[str, int] = {}
        self._max: dict[str, float] = {}
        self._sum: dict[str, float] = {}

    def add(self, signal: str, codec: Codec, x: np.ndarray, decoded: np.ndarray | None) -> None:
        self.raw_fp16[signal] = self.raw_fp16.get(signal, 0) + 2 * x.size
        if codec.lossy:
            stats = error_stats(x, decoded)
            self._max[signal] = max(self._max.get(signal, 0.0), stats["max"])
            self._sum[signal] = self._sum.get(signal, 0.0) + stats["mean"] * x.size

    def errors(self) -> dict[str, dict[str, float]]:
        out = {}
        for signal in self._max:
            n = self.raw_fp16[signal] // 2
            out[signal] = {"max": self._max[signal], "mean": self._sum[signal] / n if n else 0.0}
        return out


def _offsets(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


def _rows(s: SampleSignals) -> int:
    """Lq: attention rows of a sample (checked equal across layers beforehand)."""
    return int(next(iter(s.attention.values())).shape[-2])


def _shard_arrays(
    samples: Sequence[SampleSignals], meta: CacheMeta, specs: dict[str, ArraySpec], acc: _Accounting
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, data) for every array of the shard, in schema order, built one signal at a time
    so that only one signal's encoded form is in memory beyond the samples themselves."""
    n = len(samples)
    per_head = meta.attention_heads == "per_head"
    heads = meta.teacher.num_heads if per_head else 1
    c = meta.codecs
    offsets = {
        "ids_offsets": _offsets([len(s.input_ids) for s in samples]),
        "resp_offsets": _offsets([len(s.response_positions) for s in samples]),
        "rows_offsets": _offsets([_rows(s) for s in samples]),
        "attn_offsets": _offsets([_rows(s) * heads * packed_width(c.attention, s.vision_length) for s in samples]),
        "vision_offsets": _offsets([s.vision_length for s in samples]),
    }
    rows_of = {"T": "ids_offsets", "R": "resp_offsets", "L": "rows_offsets", "A": "attn_offsets", "V": "vision_offsets"}
    counts = {"N": n, "N+1": n + 1, **{sym: int(offsets[name][-1]) for sym, name in rows_of.items()}}

    def flat(name: str, get) -> np.ndarray:
        dtype = specs[name].dtype
        parts = [np.asarray(get(s)).astype(dtype) for s in samples]
        return np.concatenate(parts) if parts else np.zeros((0, *specs[name].shape[1:]), dtype)

    def coded(name: str, codec_name: str, pieces: Iterator[np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
        """Encode one float signal sample by sample into preallocated value (+ scale) arrays;
        a sample's values and scales land in the rows its offsets give, flattened to the
        arrays' trailing shape."""
        spec, codec = specs[name], get_codec(codec_name)
        scale_spec = specs[name + SCALE_SUFFIX] if codec.scaled else None
        values = np.zeros(_shape(spec, counts), spec.dtype)
        scale = np.zeros(_shape(scale_spec, counts), np.float32) if scale_spec else None
        for i, x in enumerate(pieces):
            try:
                parts = codec.encode(x)
            except ValueError as e:  # e.g. a log-prob beyond fp16's range: name the sample
                raise CacheSchemaError(f"sample {samples[i].key}: {name}: {e}") from None
            _put(values, spec, offsets, i, parts["values"])
            if scale is not None:
                _put(scale, scale_spec, offsets, i, parts["scale"])
            decoded = codec.decode(parts, x.shape[-1] if x.ndim else None) if codec.lossy else None
            acc.add(name, codec, x, decoded)
        yield name, values
        if scale is not None:
            yield name + SCALE_SUFFIX, scale

    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    yield "ids_offsets", offsets["ids_offsets"]
    yield "input_ids", flat("input_ids", _stored_ids)
    yield "resp_offsets", offsets["resp_offsets"]
    yield "response_positions", flat("response_positions", lambda s: s.response_positions)
    yield "topk_ids", flat("topk_ids", lambda s: np.asarray(s.topk_ids).reshape(-1, meta.topk))
    yield from coded("topk_logprobs", c.logprobs, (f32(s.topk_logprobs) for s in samples))
    yield from coded("tail_logmass", c.logprobs, (f32(s.tail_logmass) for s in samples))
    yield "rows_offsets", offsets["rows_offsets"]
    yield "attn_offsets", offsets["attn_offsets"]
    for layer in meta.layers:
        # (H, Lq, N_v) -> (Lq, H, N_v): rows first, so that they line up with the row scales.
        blocks = (f32(s.attention[layer])[..., : s.vision_length] for s in samples)
        yield from coded(attention_array(layer), c.attention, (b.transpose(1, 0, 2) if per_head else b for b in blocks))
    yield "vision_start", np.array([s.vision_start for s in samples], dtype=np.int32)
    yield "vision_length", np.array([s.vision_length for s in samples], dtype=np.int32)
    yield "vision_grid", np.array([vision_grid(s) for s in samples], dtype=np.int32).reshape(n, 2)
    yield "vision_offsets", offsets["vision_offsets"]
    yield from coded("vision_features", c.features, (f32(s.vision_features)[: s.vision_length] for s in samples))
    focus = np.zeros(counts["V"], np.float32)
    fp32 = get_codec("fp32")
    for i, s in enumerate(samples):
        piece = f32(s.focus)[: s.vision_length]
        _put(focus, specs["focus"], offsets, i, piece)
        acc.add("focus", fp32, piece, None)
    yield "focus", focus


def _put(target: np.ndarray, spec: ArraySpec, offsets: dict[str, np.ndarray], i: int, part: np.ndarray) -> None:
    """Sample i's part into its rows of `target` (row i when the array has one row per sample)."""
    if spec.offsets is None:
        target[i] = part
    else:
        off = offsets[spec.offsets]
        target[off[i] : off[i + 1]] = part.reshape(-1, *target.shape[1:])


def _stored_ids(s: SampleSignals) -> np.ndarray:
    """input_ids as stored: the vision span (all IMAGE_TOKEN, checked) holds 0, so ids need no sign."""
    ids = np.array(s.input_ids, dtype=np.int64)
    if s.vision_start >= 0:
        ids[s.vision_start : s.vision_start + s.vision_length] = 0
    return ids


def _shape(spec: ArraySpec, counts: dict[str, int]) -> tuple[int, ...]:
    return tuple(counts[d] if isinstance(d, str) else d for d in spec.shape)


def _check_layout(spec: ArraySpec, data: np.ndarray) -> None:
    """The data about to be written has the schema's dtype and trailing shape."""
    if data.dtype != np.dtype(spec.dtype) or tuple(data.shape[1:]) != tuple(spec.shape[1:]):
        raise RuntimeError(
            f"writer bug: {spec.name} is {data.dtype}{data.shape}, the schema says {spec.dtype}{spec.shape}"
        )


# ---------------------------------------------------------------------------- checking samples


def _check_samples(
    samples: Sequence[SampleSignals], skipped: list[tuple[str, str]], meta: CacheMeta, where: str
) -> None:
    seen: set[str] = set()
    for s in samples:
        if not isinstance(s, SampleSignals):
            raise CacheSchemaError(f"{where}: expected SampleSignals, got {type(s).__name__}")
        if not isinstance(s.key, str) or not s.key:
            raise CacheSchemaError(f"{where}: sample key {s.key!r} is not a non-empty string")
        if s.key in seen:
            raise CacheSchemaError(f"{where}: sample {s.key} appears twice")
        seen.add(s.key)
        try:
            _check_sample(s, meta)
        except CacheSchemaError as e:
            raise CacheSchemaError(f"{where}: sample {s.key}: {e}") from None
    for key, _ in skipped:
        if key in seen:
            raise CacheSchemaError(f"{where}: sample {key} is both written and skipped")


def _check_sample(s: SampleSignals, meta: CacheMeta) -> None:
    """One sample against the cache's shapes (see alignkd.cache.records for their meaning)."""
    d, h, k = meta.teacher.hidden_size, meta.teacher.num_heads, meta.topk
    if not isinstance(s.fingerprint, str) or len(s.fingerprint) != 64 or set(s.fingerprint) - set("0123456789abcdef"):
        raise CacheSchemaError(f"fingerprint {s.fingerprint!r} is not a sha256 hex digest")

    ids = _ints(s.input_ids, "input_ids", ndim=1)
    t = len(ids)
    if t == 0:
        raise CacheSchemaError("input_ids is empty")
    if t > meta.max_length:
        raise CacheSchemaError(f"{t} tokens, more than the cache's max_length {meta.max_length}")
    vs, nv = s.vision_start, s.vision_length
    if not (isinstance(vs, int | np.integer) and isinstance(nv, int | np.integer)):
        raise CacheSchemaError("vision_start and vision_length must be integers")
    text = ids
    if vs == -1:
        if nv != 0:
            raise CacheSchemaError(f"text-only sample (vision_start -1) has vision_length {nv}, expected 0")
        lq = 0
    else:
        if meta.num_vision_tokens is not None and nv != meta.num_vision_tokens:
            raise CacheSchemaError(f"vision_length {nv}, the cache has {meta.num_vision_tokens} vision tokens")
        if nv < 1:
            raise CacheSchemaError(f"vision_length {nv}: an image sample needs at least one vision token")
        if not 0 <= vs <= t - nv:
            raise CacheSchemaError(f"vision span {vs}..{vs + nv} is outside the {t} tokens")
        if not (ids[vs:vs + nv] == IMAGE_TOKEN).all():
            raise CacheSchemaError(f"input_ids[{vs}:{vs + nv}] are not all IMAGE_TOKEN ({IMAGE_TOKEN})")
        text = np.concatenate([ids[:vs], ids[vs + nv:]])
        lq = t - (vs + nv)  # rows are the positions after the vision block
        grid = vision_grid(s)
        if grid[0] * grid[1] != nv or min(grid) < 1:
            raise CacheSchemaError(f"vision_grid {grid} does not hold its {nv} vision tokens")
    vocab = meta.teacher.vocab_size
    if text.size and (text.min() < 0 or text.max() >= vocab):
        raise CacheSchemaError(f"input_ids outside the vocabulary 0..{vocab - 1} (IMAGE_TOKEN only in the vision span)")

    resp = _ints(s.response_positions, "response_positions", ndim=1)
    r = len(resp)
    if r and (resp.min() < 1 or resp.max() >= t or (np.diff(resp) <= 0).any()):
        raise CacheSchemaError(f"response_positions must be increasing and within 1..{t - 1}")
    topk_ids = _ints(s.topk_ids, "topk_ids", shape=(r, k))
    if topk_ids.size and (topk_ids.min() < 0 or topk_ids.max() >= vocab):
        raise CacheSchemaError(f"topk_ids outside the vocabulary 0..{vocab - 1}")
    _floats(s.topk_logprobs, "topk_logprobs", (r, k), allow_neg_inf=True)
    _floats(s.tail_logmass, "tail_logmass", (r,), allow_neg_inf=True)

    if not isinstance(s.attention, dict) or sorted(s.attention) != sorted(meta.layers):
        got = sorted(s.attention) if isinstance(s.attention, dict) else type(s.attention).__name__
        raise CacheSchemaError(f"attention has layers {got}, the cache stores layers {list(meta.layers)}")
    for layer in meta.layers:
        shape = (h, lq, nv) if meta.attention_heads == "per_head" else (lq, nv)
        # A sample without image has no rows; producers may pad its empty block to any width.
        a = _floats(s.attention[layer], f"attention[{layer}]", shape, any_width=lq == 0)
        if a.size and a.min() < 0:
            raise CacheSchemaError(f"attention[{layer}] has negative probabilities")

    feats = _floats(s.vision_features, "vision_features", (nv, d), any_rows=vs == -1)
    focus = _floats(s.focus, "focus", (nv,), any_rows=vs == -1)
    if vs == -1 and (feats.any() or focus.any()):
        raise CacheSchemaError("text-only sample has non-zero vision_features or focus")


def _ints(a: object, name: str, ndim: int | None = None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise CacheSchemaError(f"{name} has dtype {a.dtype}, expected integers")
    if shape is not None and a.shape != shape:
        raise CacheSchemaError(f"{name} has shape {a.shape}, expected {shape}")
    if ndim is not None and a.ndim != ndim:
        raise CacheSchemaError(f"{name} has {a.ndim} dimensions, expected {ndim}")
    if a.size and (a.min() < _INT32.min or a.max() > _INT32.max):
        raise CacheSchemaError(f"{name} has values outside int32")
    return a


def _floats(a: object, name: str, shape: tuple[int, ...], allow_neg_inf: bool = False, *,
            any_width: bool = False, any_rows: bool = False) -> np.ndarray:
    """`any_width`: the last axis may have any length (an empty block); `any_rows`: the first
    may (a text-only sample's vision arrays, which are not stored)."""
    a = np.asarray(a)
    if a.dtype.kind != "f":
        raise CacheSchemaError(f"{name} has dtype {a.dtype}, expected floats")
    fits = a.ndim == len(shape) and all(
        got == want or (any_width and i == len(shape) - 1) or (any_rows and i == 0)
        for i, (got, want) in enumerate(zip(a.shape, shape)))
    if not fits:
        raise CacheSchemaError(f"{name} has shape {a.shape}, expected {shape}")
    bad = np.isnan(a) | (np.isinf(a) & ~(allow_neg_inf & (a < 0)))
    if bad.any():
        raise CacheSchemaError(f"{name} has {'NaN or +inf' if allow_neg_inf else 'NaN or inf'} values")
    return a


# ---------------------------------------------------------------------------- files


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


def _dir_bytes(path: Path) -> int:
    """Total size of the files under `path` (an array: its zarr.json and chunk files)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _fsync_tree(path: Path) -> None:
    """Flush every file and directory under `path`: the rename that publishes a shard must not
    reach the disk before its contents do."""
    for d, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(d))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
