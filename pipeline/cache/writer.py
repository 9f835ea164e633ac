"""Write one shard of the teacher-signal cache, atomically.

    init_cache(root, meta)                  # alignkd.cache.store: the root, once
    shard = write_shard(root, "train-000003", samples, skipped, meta=meta,
                        input_shard="data/train-000003.tar", input_size=123456)

`root` is a directory or an fsspec URL ("s3://bucket/cache", "gs://...", "file://..."); the
function takes either and does the same job for both (a URL's steps are in remote.py). The
layout (array names, dtypes, shapes) is alignkd.cache_schemas.v3, the quantisers are
alignkd.cache.codecs, the checks of each sample alignkd.cache.records, the cache's root and
its listing alignkd.cache.store, the file lists alignkd.cache.integrity.

Why shards are written this way (both measured here): several processes writing rows into one
Zarr store lose data, and a ZipStore shared by processes corrupts. So each shard is written by
ONE writer, as its own Zarr group under `shards/.{name}.tmp-{hex}`, and `os.rename`d to
`shards/{name}` only when every array and the shard's attributes are on disk (fsynced). A shard
directory under its final name is therefore complete, which is what lets extraction resume by
shard. A killed writer leaves only a `.tmp-` directory: readers ignore it, `store.remove_partial`
(or `remove_partial_shard` for one name) deletes it.

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
sample key. A sample's attention blocks or features may come already quantised (codecs.Quantised,
made on the teacher's GPU with the cache's codec): their codes and scales are stored as they are,
the very bytes the numpy encoder would have made from the floats, and their codec error comes
with them.

Chunks (measured at paper scale by bench/cache_random_reads.py): a training run reads samples
in random order, so what a sample's read decodes should be its own bytes. Each array is
chunked along axis 0 at about one sample's part (_chunk_rows): exactly one where all samples
of the shard have equal parts (144-token features, their scales and focus), else at most
CHUNK_BYTES aligned to the rows every part is a multiple of. So many chunks would be too many
files (and too long a file list in ShardMeta), so zarr's sharding codec packs them about
FILE_BYTES to a file, with an index of where each chunk is; each chunk is compressed and then
carries its crc32c, which lets the reader check the bytes it reads without hashing a whole
file (the file's sha256 stays in the list for verify-cache). Any Zarr v3 client reads it.
The packed files are written by alignkd.cache.packed with zarr's codecs run synchronously: the
bytes zarr's own write gives, without its event-loop and thread-pool round trip per chunk (a
256-sample shard of the bench's cpu preset: 6.0 against 8.5 ms a sample, quantising included).
"""

from __future__ import annotations

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
from alignkd.cache.codecs import Codec, Quantised, error_stats, get_codec
from alignkd.cache.integrity import dir_bytes, fsync_dir, fsync_tree, shard_files
from alignkd.cache.packed import write_packed
from alignkd.cache.records import SampleSignals, check_samples, vision_grid
from alignkd.cache.remote import is_url
from alignkd.cache.store import TMP_MARK, check_same, check_writable, init_cache
from alignkd.cache_schemas import (
    SCALE_SUFFIX,
    SHARDS_GROUP,
    ArraySpec,
    CacheMeta,
    CacheSchemaError,
    CodecSpec,
    ShardMeta,
    attention_array,
    check_shard_name,
    packed_width,
    shard_arrays,
)

__all__ = ["ARRAY_METADATA_BYTES", "CHUNK_BYTES", "FILE_BYTES", "write_shard"]

CHUNK_BYTES = 128 << 10
"""Most uncompressed bytes per chunk, unless one sample's equal part is larger (_chunk_rows):
about a ninth of a paper-scale sample's attention block."""

ARRAY_METADATA_BYTES = 1150
"""About the size of one array's zarr.json as written with packed chunks (measured on demo
caches; ~620 for an array of one chunk file): the dry run's estimate of metadata per array."""

FILE_BYTES: int | None = 64 << 20
"""Target uncompressed bytes of chunks per file (zarr's sharding codec); None: a file per chunk."""


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
    check_writable(meta)
    check_same(root, meta)  # also: the cache exists
    skipped = [(str(k), str(r)) for k, r in skipped]
    check_samples(samples, skipped, meta, where=f"shard {shard_name}")

    shards_dir = root / SHARDS_GROUP
    tmp = shards_dir / f".{shard_name}{TMP_MARK}{uuid.uuid4().hex}"
    specs = shard_arrays(meta)
    try:
        group = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        accounting = _Accounting()
        offsets = {}  # each offsets array comes before the arrays it indexes (the schema's order)
        for name, data in _shard_arrays(samples, meta, specs, accounting):
            if specs[name].shape == ("N+1",):
                offsets[name] = data
            _write_array(group, name, data, meta.codecs, _chunk_rows(specs[name], offsets, data))
            if after_array is not None:
                after_array(name)
        shard = ShardMeta(
            name=shard_name,
            input_shard=str(input_shard),
            input_size=int(input_size),
            keys=tuple(s.key for s in samples),
            fingerprints=tuple(s.fingerprint for s in samples),
            skipped=tuple({"key": k, "reason": r} for k, r in skipped),
            num_samples=len(samples),
            codec_error=accounting.errors(),
            nbytes={name: dir_bytes(tmp / name) for name in specs},
            raw_fp16_bytes=dict(accounting.raw_fp16),
            files=shard_files(tmp),
        )
        shard.validate()
        group.attrs.update(shard.to_dict())
        fsync_tree(tmp)
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
    check_writable(meta)
    check_same(url, meta)  # also: the cache exists
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


def _write_array(group: zarr.Group, name: str, data: np.ndarray, codecs: CodecSpec, chunk: int) -> None:
    """One array along axis 0 in chunks of `chunk` rows (_chunk_rows), packed about FILE_BYTES
    to a file by zarr's sharding codec, each chunk compressed and then given its crc32c. An
    array of one chunk is one plain chunk file, as every chunk was before (FILE_BYTES None):
    there is nothing to pack, and packing's metadata (~0.5 KB) would outweigh a small array."""
    row_bytes = max(1, math.prod(data.shape[1:]) * data.dtype.itemsize)
    trailing = tuple(data.shape[1:])
    if FILE_BYTES is None or chunk >= data.shape[0]:
        shards, compressors = None, _compressors(codecs)
    else:
        per_file = max(1, FILE_BYTES // (chunk * row_bytes))
        shards = (chunk * min(per_file, -(-max(1, data.shape[0]) // chunk)), *trailing)  # whole chunks
        # Each chunk's own checksum: a reader checks what it decodes without hashing the whole file.
        compressors = [*(_compressors(codecs) or []), zarr.codecs.Crc32cCodec()]
    array = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=(chunk, *trailing),
        shards=shards,
        compressors=compressors,
        fill_value=0,
    )
    if data.size and not write_packed(array, data):  # packed: written directly (alignkd.cache.packed)
        array[...] = data


def _chunk_rows(spec: ArraySpec, offsets: dict[str, np.ndarray], data: np.ndarray) -> int:
    """Rows per chunk, the least a reader decodes. An array of each sample's rows (indexed by
    offsets) is read one sample at a time: its chunk is about one sample's part (at most
    CHUNK_BYTES), in whole multiples of the rows every part is a whole number of (their gcd).
    Where the parts are equal (a fixed vision-token count's features, scales, focus) a chunk is
    one sample's part exactly, and a sample's read decodes nothing else; where they differ, a
    read decodes under two chunks more than it needs. An array of a row per sample is read
    whole when a shard opens: chunks of CHUNK_BYTES."""
    row_bytes = max(1, math.prod(data.shape[1:]) * data.dtype.itemsize)
    target, unit = CHUNK_BYTES, 1
    if spec.offsets is not None:
        lengths = np.diff(offsets[spec.offsets])
        lengths = lengths[lengths > 0]  # a text-only sample has no vision rows: it shifts nothing
        if lengths.size:
            unit = int(np.gcd.reduce(lengths))
            target = min(CHUNK_BYTES, int(lengths.mean() * row_bytes))
    return min(max(1, target // (unit * row_bytes)) * unit, max(1, data.shape[0]))


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
        aside = final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex}.replaced")
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError:
        if aside is not None:
            os.rename(aside, final)  # put the old complete shard back
        raise
    fsync_dir(final.parent)
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
        if codec.lossy:
            stats = error_stats(x, decoded)
            self.add_error(signal, x.size, stats["max"], stats["mean"] * x.size)
        else:
            self.raw_fp16[signal] = self.raw_fp16.get(signal, 0) + 2 * x.size

    def add_error(self, signal: str, size: int, top: float, total: float) -> None:
        """An array of `size` elements with codec error max `top` and sum `total`."""
        self.raw_fp16[signal] = self.raw_fp16.get(signal, 0) + 2 * size
        self._max[signal] = max(self._max.get(signal, 0.0), top)
        self._sum[signal] = self._sum.get(signal, 0.0) + total

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
    """(name, data) for every array of `specs` (the schema's shard_arrays), in its order, with
    its dtype and shape, built one signal at a time so that only one signal's encoded form is
    in memory beyond the samples themselves. Which arrays a shard has, their order, dtypes and
    shapes are the schema's; what this adds is where each comes from in a sample."""
    n = len(samples)
    per_head = meta.attention_heads == "per_head"
    heads = meta.teacher.num_heads if per_head else 1
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    # The rows each sample has in the arrays an offsets array indexes.
    lengths = {
        "ids_offsets": lambda s: len(s.input_ids),
        "resp_offsets": lambda s: len(s.response_positions),
        "rows_offsets": _rows,
        "attn_offsets": lambda s: _rows(s) * heads * packed_width(meta.codecs.attention, s.vision_length),
        "vision_offsets": lambda s: s.vision_length,
    }
    offsets = {name: _offsets([lengths[name](s) for s in samples]) for name in specs if name in lengths}
    counts = {"N": n, "N+1": n + 1}
    for spec in specs.values():
        if spec.offsets is not None:
            counts[spec.shape[0]] = int(offsets[spec.offsets][-1])
    # An array of one value (or row) per sample.
    per_sample = {"vision_start": lambda s: s.vision_start, "vision_length": lambda s: s.vision_length,
                  "vision_grid": vision_grid}
    # An array of each sample's rows, stored as they are.
    exact = {"input_ids": _stored_ids, "response_positions": lambda s: s.response_positions,
             "topk_ids": lambda s: s.topk_ids}
    # A float signal of each sample's rows, through its codec.
    floats = {
        "topk_logprobs": lambda s: f32(s.topk_logprobs),
        "tail_logmass": lambda s: f32(s.tail_logmass),
        # (H, Lq, N_v) -> (Lq, H, N_v): rows first, so that they line up with the row scales.
        **{attention_array(layer): (lambda s, layer=layer: _rows_first(s.attention[layer], s.vision_length, per_head))
           for layer in meta.layers},
        "vision_features": lambda s: (s.vision_features if isinstance(s.vision_features, Quantised)
                                      else f32(s.vision_features)[: s.vision_length]),
        "focus": lambda s: f32(s.focus)[: s.vision_length],
    }

    def coded(name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Encode one float signal sample by sample into preallocated value (+ scale) arrays;
        a sample's values and scales land in the rows its offsets give, flattened to the
        arrays' trailing shape."""
        spec = specs[name]
        codec_name = spec.codec
        codec = get_codec(codec_name)
        scale_spec = specs[name + SCALE_SUFFIX] if codec.scaled else None
        values = np.zeros(_shape(spec, counts), spec.dtype)
        scale = np.zeros(_shape(scale_spec, counts), scale_spec.dtype) if scale_spec else None
        for i, s in enumerate(samples):
            x = floats[name](s)
            if isinstance(x, Quantised):  # encoded on the teacher's device
                if x.codec != codec_name or x.error is None:
                    raise CacheSchemaError(f"sample {s.key}: {name}: codes of codec {x.codec}"
                                           f"{'' if x.error is not None else ' without their error'}, "
                                           f"the cache stores {codec_name}")
                _put(values, spec, offsets, i, x.values)
                _put(scale, scale_spec, offsets, i, codec.stored_scale(x.scale))
                acc.add_error(name, math.prod(x.shape), *x.error)
                continue
            try:
                parts = codec.encode(x)
            except ValueError as e:  # e.g. a log-prob beyond fp16's range: name the sample
                raise CacheSchemaError(f"sample {s.key}: {name}: {e}") from None
            _put(values, spec, offsets, i, parts["values"])
            if scale is not None:
                _put(scale, scale_spec, offsets, i, codec.stored_scale(parts["scale"]))
            decoded = codec.decode(parts, x.shape[-1] if x.ndim else None) if codec.lossy else None
            acc.add(name, codec, x, decoded)
        return values, scale

    scales: dict[str, np.ndarray] = {}  # made with their values, written after them
    for name, spec in specs.items():
        shape = _shape(spec, counts)
        if name in scales:
            yield name, scales.pop(name)
        elif name in offsets:
            yield name, offsets[name].astype(spec.dtype)
        elif name in per_sample:
            yield name, np.array([per_sample[name](s) for s in samples], dtype=spec.dtype).reshape(shape)
        elif name in exact:
            parts = [np.asarray(exact[name](s)).astype(spec.dtype).reshape(-1) for s in samples]
            yield name, (np.concatenate(parts) if parts else np.zeros(0, spec.dtype)).reshape(shape)
        elif name in floats:
            values, scale = coded(name)
            if scale is not None:
                scales[name + SCALE_SUFFIX] = scale
            yield name, values
        else:
            raise CacheSchemaError(f"the schema lists an array {name!r} this writer cannot fill")


def _rows_first(block: np.ndarray | Quantised, vision_length: int, per_head: bool) -> np.ndarray | Quantised:
    """A sample's attention block as stored: (Lq, H, N_v) per head, (Lq, N_v) head mean."""
    if isinstance(block, Quantised):  # its width is the sample's own already
        if not per_head:
            return block
        return Quantised(block.codec, block.values.transpose(1, 0, 2), block.scale.T, block.length, block.error)
    rows = np.asarray(block, dtype=np.float32)[..., :vision_length]
    return rows.transpose(1, 0, 2) if per_head else rows


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
