"""Files that pack many chunks of one array (zarr's sharding codec), read and written directly.

    layout = PackedLayout.of(array)           # None: zarr reads and writes this array itself
    written = write_packed(array, data)       # the whole array's files, as zarr would write them
    chunks = PackedChunks(layout, shard_dir, name, files)
    block = chunks.chunk(7)                   # chunk 7 of the array, decoded and checked

A packed file is its chunks back to back, each encoded by the array's inner codecs (bytes,
compressor, crc32c), then an index of (offset, length) per chunk with its own crc32c (zarr's
sharding codec, index at the end). Through zarr, every chunk costs a round trip to zarr's
event-loop thread and a thread-pool call per codec, which is more than the compression or
decompression itself for chunks of one sample's part: about 0.4 ms a chunk, a dozen chunks a
sample (measured on the writer: 4.9 of its 6.1 ms per sample at the bench's cpu preset). Here
the same codec objects run synchronously, in the calling thread.

Both sides use zarr's codec objects' synchronous methods (`_encode_sync` / `_decode_sync`) and
its sharding codec's chunk and index specs: semi-private parts of zarr 3.1, which the project
pins (<3.2). `PackedLayout.of` returns None where any of them is missing, and zarr's own
read and write are used instead. tests/cache/test_packed_chunks.py holds the files written
here byte for byte to zarr's own.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

from alignkd.cache_schemas import CacheSchemaError

__all__ = ["EMPTY", "PackedChunks", "PackedLayout", "chunk_file", "write_packed"]

EMPTY = 2**64 - 1
"""The sharding index's (offset, length) of a chunk that was not written (all fill value)."""


class PackedLayout:
    """How one array's chunks are packed into its files: rows per chunk and chunks per file,
    the inner and index codec chains and their specs."""

    def __init__(self, array: zarr.Array, codec, shard_spec) -> None:
        self.array = array
        self.per_file = shard_spec.shape[0] // codec.chunk_shape[0]
        self.codecs = codec.codecs
        self.spec = codec._get_chunk_spec(shard_spec)
        self.index_codecs = codec.index_codecs
        self.index_spec = codec._get_index_chunk_spec((self.per_file,))
        self.index_bytes = codec._shard_index_size((self.per_file,))
        self.index_at_end = codec.index_location.value == "end"

    @classmethod
    def of(cls, array: zarr.Array) -> PackedLayout | None:
        """The layout of an array whose chunks are packed along axis 0, or None where zarr must
        read and write it: chunks one per file (caches written before packing), chunks or files
        split along another axis than the first (not as alignkd writes them), a codec without a
        synchronous path, or zarr helpers that changed."""
        from zarr.abc.codec import ArrayArrayCodec, SupportsSyncCodec
        from zarr.codecs import ShardingCodec
        from zarr.core.buffer import default_buffer_prototype

        codecs = array.metadata.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or len(array.shape) == 0:
            return None
        if tuple(codecs[0].chunk_shape[1:]) != array.shape[1:] or tuple(array.shards[1:]) != array.shape[1:]:
            return None
        inner = (*codecs[0].codecs, *codecs[0].index_codecs)
        if not all(isinstance(c, SupportsSyncCodec) and not isinstance(c, ArrayArrayCodec) for c in inner):
            return None
        try:
            a = array._async_array
            spec = a.metadata.get_chunk_spec((0,) * len(array.shape), a.config, default_buffer_prototype())
            return cls(array, codecs[0], spec)
        except AttributeError:
            return None

    @property
    def chunk_rows(self) -> int:
        return self.spec.shape[0]


class PackedChunks:
    """The chunks of one local array in packed files, read with plain reads and decoded with
    the array's own codecs, synchronously. A file's index is read once (per open shard). A
    chunk is checked by its crc32c (written with it) as it is decoded, so each byte is read
    once; the file's sha256 in the shard's list is for `verify-cache`, which reads whole files.
    Damage is a CacheSchemaError naming the shard's folder and the file."""

    def __init__(self, layout: PackedLayout, directory: Path, name: str, files: dict) -> None:
        self.layout, self.directory, self.name, self.files = layout, str(directory), name, files
        self.file_of: dict[int, str] = {}  # file number -> its path relative to the shard (chunk_file)
        self.indexes: dict[int, np.ndarray | None] = {}

    def chunk(self, index: int) -> np.ndarray:
        """Chunk `index` of the array, decoded (fill values where zarr wrote none)."""
        lay = self.layout
        number, within = divmod(index, lay.per_file)
        rel = self.file_of.get(number) or self.file_of.setdefault(number, chunk_file(lay.array, self.name, index))
        if number not in self.indexes:
            self.indexes[number] = self._index(rel) if rel in self.files else None  # None: not written, all fill
        index_table = self.indexes[number]
        start, length = (None, None) if index_table is None else (int(x) for x in index_table[within])
        if index_table is None or start == EMPTY:
            return np.full(lay.spec.shape, lay.spec.fill_value, dtype=lay.spec.dtype.to_native_dtype())
        data = self._bytes(rel, start, length)
        try:
            return decode(lay.codecs, data, lay.spec).as_numpy_array()
        except Exception as e:  # noqa: BLE001 - a checksum or decoder error: the bytes are not the written ones
            raise self._damaged(rel, f"has changed (chunk {within} fails its check: {e})") from None

    def _index(self, rel: str) -> np.ndarray:
        lay = self.layout
        size = self.files[rel].size
        if size < lay.index_bytes:
            raise self._damaged(rel, f"is {size} bytes, too short for its chunk index")
        data = self._bytes(rel, size - lay.index_bytes if lay.index_at_end else 0, lay.index_bytes)
        try:
            table = decode(lay.index_codecs, data, lay.index_spec).as_numpy_array()
        except Exception as e:  # noqa: BLE001 - the index's own crc32c
            raise self._damaged(rel, f"has changed (its chunk index fails its check: {e})") from None
        used = table[table[:, 0] != EMPTY]
        if (used[:, 0] + used[:, 1] > size).any():
            raise self._damaged(rel, "has changed (its chunk index points past its end)")
        return table

    def _bytes(self, rel: str, start: int, length: int) -> bytes:
        try:
            fd = os.open(os.path.join(self.directory, rel), os.O_RDONLY)
        except FileNotFoundError:
            raise self._damaged(rel, "is missing") from None
        try:
            data = os.pread(fd, length, start)
        finally:
            os.close(fd)
        if len(data) != length:
            raise self._damaged(rel, "is shorter than its chunk index says (truncated)")
        return data

    def _damaged(self, rel: str, what: str) -> CacheSchemaError:
        return CacheSchemaError(f"shard {self.directory} is damaged: file {rel} {what}; "
                                "`alignkd verify-cache` lists every damaged shard")


def write_packed(array: zarr.Array, data: np.ndarray) -> bool:
    """Write all of `data` into a freshly created local array's packed files, the bytes zarr's
    own `array[...] = data` writes: chunks in order, the last padded with the fill value, a
    chunk that is all fill value left out (index entry EMPTY) and a file of only such chunks not
    written; the index with its crc32c at the end. False (nothing written) where this cannot
    write the array (not local, not packed along axis 0, a fill value other than 0): the caller
    writes it through zarr."""
    from zarr.storage import LocalStore

    layout = PackedLayout.of(array)
    if layout is None or not isinstance(array.store, LocalStore) or layout.spec.fill_value != 0 \
            or not layout.index_at_end:
        return False
    rows, per_file = layout.chunk_rows, layout.per_file
    data = np.ascontiguousarray(data, dtype=array.dtype)
    chunks = -(-data.shape[0] // rows)
    directory = Path(array.store.root) / array.path
    for first in range(0, chunks, per_file):  # chunk numbers starting each file
        table = np.full((per_file, 2), EMPTY, dtype=np.uint64)
        parts, at = [], 0
        for within in range(min(per_file, chunks - first)):
            lo = (first + within) * rows
            block = data[lo : lo + rows]
            if block.shape[0] < rows:  # the array's last chunk: padded, as zarr stores edge chunks
                block = np.concatenate([block, np.zeros((rows - block.shape[0], *block.shape[1:]), block.dtype)])
            if not block.view(np.uint8).any():  # all 0 bit for bit (zarr compares floats' bits to 0.0 too)
                continue
            encoded = encode(layout.codecs, block, layout.spec)
            table[within] = (at, len(encoded))
            parts.append(encoded)
            at += len(encoded)
        if not parts:
            continue
        parts.append(encode(layout.index_codecs, table, layout.index_spec))
        path = directory / chunk_file(array, "", first)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"".join(parts))
    return True


def chunk_file(array: zarr.Array, name: str, index: int) -> str:
    """The file, relative to the shard, that holds chunk `index` (along axis 0) of an array:
    "{name}/c/{n}" ("c/{n}/0" in two dimensions: zarr's chunk key encoding), n = index // chunks
    per file (1 where each chunk is a file)."""
    per_file = array.shards[0] // array.chunks[0] if array.shards else 1
    key = array.metadata.encode_chunk_key((index // per_file,) + (0,) * (array.ndim - 1))
    return f"{name}/{key}" if name else key


def decode(codecs, data: bytes, spec):
    """Bytes of one chunk through a zarr codec chain, last codec first, synchronously."""
    value = spec.prototype.buffer.from_bytes(data)
    for codec in reversed(codecs):
        value = codec._decode_sync(value, spec)
    return value


def encode(codecs, block: np.ndarray, spec) -> bytes:
    """One chunk's values through a zarr codec chain, first codec first, synchronously."""
    value = spec.prototype.nd_buffer.from_numpy_array(block)
    for codec in codecs:
        value = codec._encode_sync(value, spec)
    return value.to_bytes()
