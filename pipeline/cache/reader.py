"""Read the teacher-signal cache: samples by key, dequantised to float32.

    reader = CacheReader("demo-out/cache")     # checks the root metadata (CacheSchemaError)
    reader = CacheReader("s3://bucket/cache")  # or any fsspec URL (alignkd.cache.remote)
    reader.meta                                # CacheMeta: shapes, layers, codecs, teacher, job
    len(reader), "000017" in reader, reader.keys()
    s = reader.get("000017")                   # SampleSignals, shapes as in alignkd.cache.records
    s = reader.get("000017", dequantise=False) # attention / vision_features as stored (codecs.Quantised)
    reader.skipped()                           # [(key, reason, shard)] of samples with no signals
    reader.shard_meta("train-000003")          # ShardMeta (bytes, codec error, input shard)
    reader.fingerprint()                       # sha256 of all metadata: what a run trained on

What is read when:
  * opening reads only the root attributes and lists the complete shards (names starting with
    "." are partial and ignored);
  * the key index (key -> shard, row) is built on first need from each shard's attributes, never
    from its signal arrays; a key stored in two shards is a CacheSchemaError naming both;
  * a shard is opened when one of its samples is first read: its files are checked against the
    shard's file list (none missing or extra, sizes; hashes of the metadata and index files),
    its arrays against the schema (names, dtypes, shapes, offsets), and its small offset arrays
    are loaded; at most `max_open_shards` stay open (least recently used are closed);
  * `get` reads only the chunks holding that sample (about its own bytes: see writer.py) and
    checks each the first time it enters the chunk cache. A shard written by this version
    packs its chunks into a few files (zarr's sharding codec): the reader reads a chunk's
    bytes from the local file itself and decodes them with the array's own zarr codecs
    (alignkd.cache.packed), checking the chunk's crc32c and the file index's; that skips zarr's
    event-loop and thread-pool round trips, which cost more than the decompression for a
    dozen small arrays a sample. Older shards (a file per chunk) are read through zarr as
    before, each chunk file checked against its sha256 as zarr reads it (remote.
    VerifyingStore: hashed on the way to the decoder, so a chunk is read once).
Damage is a CacheSchemaError naming the shard and file, raised before any of its data is
returned. Checking only what is read costs one pass over the bytes a run reads anyway,
instead of re-hashing a terabyte cache on every start; `alignkd verify-cache`
(alignkd.cache.verify) checks every file's sha256 up front.

A cache at a URL is read through zarr's FsspecStore, with the same checks: the listing and
sizes when a shard is opened, each object's sha256 as it is downloaded whole (remote.
VerifyingStore), so no chunk is fetched twice, and a packed chunk, fetched by byte range, by
its crc32c (zarr checks it). Shard attributes are fetched concurrently when
the key index is built (one request each: latency, not bandwidth, is the cost there).

Shapes and dtypes come from the cache (its CacheMeta and shard_arrays), never from the caller.
A CacheReader can be handed to worker processes: its open shards are not pickled, each process
reopens what it reads.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore

from alignkd.cache import remote
from alignkd.cache.codecs import Quantised, get_codec
from alignkd.cache.records import SampleSignals, vision_grid
from alignkd.cache.integrity import check_shard_files
from alignkd.cache.packed import PackedChunks, PackedLayout, chunk_file
from alignkd.cache.store import list_complete_shards, read_cache_meta, read_shard_meta
from alignkd.cache_schemas import (
    IMAGE_TOKEN,
    SCALE_SUFFIX,
    SHARDS_GROUP,
    ArraySpec,
    CacheMeta,
    CacheSchemaError,
    ShardMeta,
    attention_array,
    packed_width,
    shard_arrays,
)

__all__ = ["CacheReader", "open_shard"]

# Decoded chunks kept per reader (so per DataLoader worker), across all its open shards.
_CHUNK_CACHE_BYTES = 256 * 2**20
_REMOTE_THREADS = 16  # concurrent requests for shard attributes at a URL


class _ChunkCache:
    """Least-recently-used decoded chunks, bounded in bytes."""

    def __init__(self, max_bytes: int = _CHUNK_CACHE_BYTES) -> None:
        self.max_bytes, self.nbytes = max_bytes, 0
        self.items: OrderedDict[tuple[str, str, int], np.ndarray] = OrderedDict()

    def get(self, key: tuple[str, str, int], load) -> np.ndarray:
        hit = self.items.get(key)
        if hit is not None:
            self.items.move_to_end(key)
            return hit
        data = load()
        self.items[key] = data
        self.nbytes += data.nbytes
        while self.nbytes > self.max_bytes and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.nbytes -= old.nbytes
        return data


class CacheReader:
    """Random access to the samples of a cache directory or URL (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, max_open_shards: int = 64) -> None:
        self.path: Path | str = path.rstrip("/") if remote.is_url(path) else Path(path)
        self._meta = read_cache_meta(self.path)
        self._specs = shard_arrays(self._meta)
        self._shards = list_complete_shards(self.path)
        self._max_open = max(1, max_open_shards)
        self._shard_metas: dict[str, ShardMeta] = {}
        self._index: dict[str, tuple[str, int]] | None = None
        self._open: OrderedDict[str, _OpenShard] = OrderedDict()
        self._chunks = _ChunkCache()
        # Shards whose file list was checked in this process: a shard closed by the LRU and
        # opened again is not listed and stat'ed again (thousands of chunk files at scale).
        self._files_checked: set[str] = set()
        self._pid = os.getpid()

    # -------------------------------------------------------------------- what is in it

    @property
    def meta(self) -> CacheMeta:
        return self._meta

    @property
    def shards(self) -> list[str]:
        """Names of the complete shards, sorted."""
        return list(self._shards)

    def shard_meta(self, name: str) -> ShardMeta:
        if name not in self._shard_metas:
            if name not in self._shards:
                raise KeyError(f"no complete shard {name!r} in cache {self.path}")
            self._shard_metas[name] = read_shard_meta(self.path, name)
        return self._shard_metas[name]

    def fingerprint(self) -> str:
        """sha256 over the root metadata and each complete shard's name and attributes (keys,
        sample fingerprints, bytes, codec errors): which cache contents a run was trained on.
        Reads attributes only, not the signal arrays."""
        self._fetch_shard_metas()
        h = hashlib.sha256(_canonical(self._meta.to_dict()))
        for name in self._shards:
            h.update(b"\0" + name.encode() + b"\0" + _canonical(self.shard_meta(name).to_dict()))
        return h.hexdigest()

    def keys(self) -> list[str]:
        """Sample keys in shard order, then row order."""
        return list(self._key_index())

    def __len__(self) -> int:
        return len(self._key_index())

    def __contains__(self, key: object) -> bool:
        return key in self._key_index()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def skipped(self) -> list[tuple[str, str, str]]:
        """(key, reason, shard) of every sample the extraction skipped."""
        self._fetch_shard_metas()
        return [(s["key"], s["reason"], name) for name in self._shards for s in self.shard_meta(name).skipped]

    def _key_index(self) -> dict[str, tuple[str, int]]:
        if self._index is None:
            self._fetch_shard_metas()
            index: dict[str, tuple[str, int]] = {}
            for name in self._shards:
                for row, key in enumerate(self.shard_meta(name).keys):
                    if key in index:
                        raise CacheSchemaError(
                            f"cache at {self.path}: sample {key} is in shards {index[key][0]} and {name}"
                        )
                    index[key] = (name, row)
            self._index = index
        return self._index

    def _fetch_shard_metas(self) -> None:
        """At a URL, every shard's attributes not read yet, fetched concurrently."""
        missing = [n for n in self._shards if n not in self._shard_metas]
        if remote.is_url(self.path) and len(missing) > 1:
            with ThreadPoolExecutor(min(_REMOTE_THREADS, len(missing))) as pool:
                metas = pool.map(lambda n: read_shard_meta(self.path, n), missing)
                self._shard_metas.update(zip(missing, metas))

    # -------------------------------------------------------------------- reading a sample

    def get(self, key: str, *, dequantise: bool = True) -> SampleSignals:
        """The sample's signals, dequantised to float32 (ids int32); KeyError if absent.

        `dequantise=False`: attention blocks and vision_features of a scaled codec (uint8,
        uint4, uint4b, int8, int8l44, int4) come back as stored, `Quantised` codes and row
        scales (float32, uint4b's bfloat16 bits widened) in the float block's orientation
        ((H, Lq, P) and (H, Lq); (N_v, P) and (N_v,)), for the training
        step to dequantise on its device (alignkd.data.distill); float codecs, and caches of
        shard layout 1, are decoded as always."""
        try:
            name, row = self._key_index()[key]
        except KeyError:
            raise KeyError(f"sample {key!r} is not in cache {self.path}") from None
        shard = self._shard(name)
        meta, codecs = self._meta, self._meta.codecs
        t0, t1 = shard.span("ids_offsets", row)
        r0, r1 = shard.span("resp_offsets", row)
        start, length = int(shard.vision_start[row]), int(shard.vision_length[row])
        heads = meta.teacher.num_heads if meta.attention_heads == "per_head" else None
        layout1 = meta.shard_layout == 1
        stored = not dequantise and not layout1

        input_ids = shard.read("input_ids", slice(t0, t1)).astype(np.int32)
        if start >= 0:  # stored as 0 in version 2; IMAGE_TOKEN already in version 1
            input_ids[start : start + length] = IMAGE_TOKEN
        attention = {}
        cached = meta.signals == "cached"  # a recompute cache's attention, P^T and focus come from its teacher slice
        for layer in meta.layers if cached else ():
            name_l = attention_array(layer)
            l0, l1 = shard.span("rows_offsets", row)
            if layout1:  # rows (Lq, H, N_v) of one fixed width; a text-only sample has none
                rows = shard.decode(name_l, codecs.attention, slice(l0, l1), meta.num_vision_tokens)[..., :length]
            else:
                rows = shard.decode_block(name_l, codecs.attention, shard.span("attn_offsets", row), (l0, l1),
                                          heads, length, dequantise=not stored)
            # Stored as (Lq, H, N_v) rows; a sample's block is (H, Lq, N_v).
            if isinstance(rows, Quantised):  # codes and scales turned the same way (views; collate copies)
                attention[layer] = Quantised(rows.codec, rows.values.transpose(1, 0, 2), rows.scale.T, rows.length) \
                    if heads else rows
            else:
                attention[layer] = np.ascontiguousarray(rows.transpose(1, 0, 2)) if rows.ndim == 3 else rows
        if not cached:  # no rows: alignkd.recompute fills them in the student stage
            features, focus = np.zeros((0, meta.teacher.hidden_size), np.float32), np.zeros(0, np.float32)
        elif layout1:  # one row of N_v tokens per sample, zeros for a text-only one
            features = shard.decode("vision_features", codecs.features, row, meta.teacher.hidden_size)[:length]
            focus = shard.read("focus", row)[:length]
        else:
            v0, v1 = shard.span("vision_offsets", row)
            features = shard.decode("vision_features", codecs.features, slice(v0, v1), meta.teacher.hidden_size,
                                    dequantise=not stored)
            focus = shard.read("focus", slice(v0, v1))
        grid = tuple(int(x) for x in shard.vision_grid[row]) if shard.vision_grid is not None else None
        signals = SampleSignals(
            key=key,
            fingerprint=self.shard_meta(name).fingerprints[row],
            input_ids=input_ids,
            response_positions=shard.read("response_positions", slice(r0, r1)).astype(np.int32),
            vision_start=start,
            vision_length=length,
            attention=attention,
            vision_features=features,
            focus=np.asarray(focus, dtype=np.float32),
            topk_ids=shard.read("topk_ids", slice(r0, r1)).astype(np.int32),
            topk_logprobs=shard.decode("topk_logprobs", codecs.logprobs, slice(r0, r1), meta.topk),
            tail_logmass=shard.decode("tail_logmass", codecs.logprobs, slice(r0, r1), None),
            vision_grid=grid,
        )
        signals.vision_grid = vision_grid(signals)
        return signals

    def _shard(self, name: str) -> _OpenShard:
        if remote.is_url(self.path) and os.getpid() != self._pid:
            # A forked DataLoader worker: the parent's open stores hold its network clients.
            self._open, self._chunks, self._pid = OrderedDict(), _ChunkCache(), os.getpid()
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        shard = _OpenShard(_shard_path(self.path, name), self._specs, self.shard_meta(name), self._chunks,
                           check_files=name not in self._files_checked)
        self._files_checked.add(name)
        self._open[name] = shard
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return shard

    def __getstate__(self) -> dict:
        # Open Zarr handles belong to this process; workers reopen shards lazily.
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_chunks"] = _ChunkCache()
        return state


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _shard_path(cache_root: str | os.PathLike, name: str) -> Path | str:
    if remote.is_url(cache_root):
        return remote.child(cache_root, SHARDS_GROUP, name)
    return Path(cache_root) / SHARDS_GROUP / name


def open_shard(cache_root: str | os.PathLike, meta: CacheMeta, shard: ShardMeta, *,
               check_files: bool = True) -> _OpenShard:
    """Open one shard as the reader does (files, schema and offsets checked); CacheSchemaError
    naming the shard and what is wrong. For alignkd.cache.verify."""
    return _OpenShard(_shard_path(cache_root, shard.name), shard_arrays(meta), shard, _ChunkCache(),
                      check_files=check_files)




class _OpenShard:
    """One shard's array handles, checked against the schema, plus its small index arrays."""

    def __init__(self, path: Path | str, specs: dict[str, ArraySpec], shard: ShardMeta, chunks: _ChunkCache, *,
                 check_files: bool) -> None:
        self.path = path
        self._where = str(path)  # the shard's part of its chunks' keys in the chunk cache
        self.files = shard.files
        # At a URL the store hashes every object as it downloads it (remote.VerifyingStore).
        self.remote = remote.is_url(path)
        num_samples = shard.num_samples
        # The index arrays (offsets, vision spans) are read whole right below; the schema says which.
        index = {name for name, spec in specs.items() if spec.signal == "index"}
        # Before Zarr parses anything (first open in this process): every file listed and of its
        # size, metadata and index files hashed (they are read whole right below); chunks are
        # hashed whenever they are read.
        hashed = False if self.remote else lambda f: f.endswith("zarr.json") or f.split("/")[0] in index
        problems = check_shard_files(path, shard.files, hash_files=hashed) if check_files else []
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            root = path.rsplit("/", 2)[0] if self.remote else path.parent.parent
            raise CacheSchemaError(f"shard {path} is damaged: {problems[0]}{more}; "
                                   f"`alignkd verify-cache {root}` lists every damaged shard")
        # Every file zarr reads is checked against the list as it is read (one read, not two).
        store = remote.zarr_store(path, files=shard.files) if self.remote else remote.VerifyingStore(
            LocalStore(str(path), read_only=True), files=shard.files, where=str(path))
        group = zarr.open_group(store, mode="r", zarr_format=3)
        self.arrays: dict[str, zarr.Array] = {}
        for name, spec in specs.items():
            try:
                array = group[name]
            except KeyError:
                raise CacheSchemaError(f"shard {path}: array {name} is missing") from None
            fits = isinstance(array, zarr.Array) and array.dtype == np.dtype(spec.dtype)
            if not fits or array.shape[1:] != spec.shape[1:]:
                raise CacheSchemaError(
                    f"shard {path}: array {name} is {getattr(array, 'dtype', '?')}{getattr(array, 'shape', '')}, "
                    f"the schema says {spec.dtype}{spec.shape}"
                )
            expected_rows = {"N": num_samples, "N+1": num_samples + 1}.get(spec.shape[0])
            if expected_rows is not None and array.shape[0] != expected_rows:
                raise CacheSchemaError(f"shard {path}: array {name} has {array.shape[0]} rows, not {expected_rows}")
            self.arrays[name] = array
        # Rows per chunk, looked up once: zarr derives `chunks` from its metadata on every access.
        self.chunk_rows = {name: array.chunks[0] for name, array in self.arrays.items()}
        # Chunks packed into files (zarr's sharding codec, as the writer packs them now) are read
        # straight from a local file, not through zarr's event loop (see alignkd.cache.packed).
        self.packed = {} if self.remote else {
            name: PackedChunks(layout, Path(path), name, shard.files) for name, array in self.arrays.items()
            if (layout := PackedLayout.of(array)) is not None}
        self.offsets = {name: self.arrays[name][:] for name, spec in specs.items() if spec.shape == ("N+1",)}
        for name, spec in specs.items():
            if spec.offsets:
                off = self.offsets[spec.offsets]
                if off[0] != 0 or (np.diff(off) < 0).any() or off[-1] != self.arrays[name].shape[0]:
                    rows = self.arrays[name].shape[0]
                    raise CacheSchemaError(f"shard {path}: {spec.offsets} does not index the {rows} rows of {name}")
        self.vision_start = self.arrays["vision_start"][:]
        self.vision_length = self.arrays["vision_length"][:]
        self.vision_grid = self.arrays["vision_grid"][:] if "vision_grid" in self.arrays else None
        self._chunks = chunks

    def span(self, offsets: str, row: int) -> tuple[int, int]:
        off = self.offsets[offsets]
        return int(off[row]), int(off[row + 1])

    def read(self, name: str, where: slice | int) -> np.ndarray:
        """Rows of one array along axis 0, through a small cache of whole decoded chunks.

        A sample is a few rows of ~a dozen arrays; asking zarr for each slice would decompress
        the chunk holding it every time, so neighbouring samples (the common case: shuffles
        within a shard, sequential scans) reuse the decoded chunk instead."""
        array = self.arrays[name]
        lo, hi = (where, where + 1) if isinstance(where, int) else (where.start, where.stop)
        if hi <= lo:
            return np.empty((0, *array.shape[1:]), dtype=array.dtype)
        size = self.chunk_rows[name]
        pieces = []
        for i in range(lo // size, (hi - 1) // size + 1):
            chunk = self._chunk(name, i, size)
            pieces.append(chunk[max(lo - i * size, 0) : min(hi - i * size, size)])
        out = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return out[0] if isinstance(where, int) else out

    def _chunk(self, name: str, index: int, size: int) -> np.ndarray:
        def load() -> np.ndarray:
            if name in self.packed:
                return self.packed[name].chunk(index)
            try:  # the store checks a chunk file as zarr reads it; a packed chunk its crc32c
                return self.arrays[name][index * size : (index + 1) * size]
            except ValueError as e:  # zarr's checksum error for a packed chunk read at a URL
                raise CacheSchemaError(f"shard {self.path} is damaged: file {chunk_file(self.arrays[name], name, index)}"
                                       f" has changed (a chunk fails its check: {e}); `alignkd verify-cache` lists "
                                       "every damaged shard") from None

        return self._chunks.get((self._where, name, index), load)

    def decode_block(self, name: str, codec_name: str, values: tuple[int, int], rows: tuple[int, int],
                     heads: int | None, length: int, dequantise: bool = True) -> np.ndarray | Quantised:
        """One sample's attention block of a flattened (A,) array: values[a0:a1] reshaped to
        (Lq, H, P_v) or (Lq, P_v), with the row scales rows[l0:l1], decoded to length N_v
        (`dequantise=False` and a scaled codec: the parts as stored)."""
        codec = get_codec(codec_name)
        lq = rows[1] - rows[0]
        shape = (lq, heads, packed_width(codec_name, length)) if heads else (lq, packed_width(codec_name, length))
        parts = {"values": self.read(name, slice(*values)).reshape(shape)}
        if codec.scaled:
            parts["scale"] = codec.loaded_scale(self.read(name + SCALE_SUFFIX, slice(*rows)))
            if not dequantise:
                return Quantised(codec_name, parts["values"], parts["scale"], length)
        return codec.decode(parts, length)

    def decode(self, name: str, codec_name: str, where: slice | int, length: int | None,
               dequantise: bool = True) -> np.ndarray | Quantised:
        codec = get_codec(codec_name)
        parts = {"values": self.read(name, where)}
        if codec.scaled:
            parts["scale"] = codec.loaded_scale(self.read(name + SCALE_SUFFIX, where))
            if not dequantise:
                return Quantised(codec_name, parts["values"], parts["scale"], length)
        return codec.decode(parts, length)
