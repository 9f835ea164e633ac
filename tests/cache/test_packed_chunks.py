"""Chunks packed into files (zarr's sharding codec, each chunk about one sample's part): every
sample reads back exactly as from the layout before (one file per ~1 MiB chunk), whatever the
chunk and file sizes, and plain Zarr reads the same arrays; a damaged chunk or chunk index is a
one-line error naming the shard and the file."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import zarr
from test_writer_reader import make_meta, make_sample

from alignkd.cache import writer
from alignkd.cache.codecs import Quantised
from alignkd.cache.reader import CacheReader
from alignkd.cache.store import init_cache, read_shard_meta
from alignkd.cache.writer import write_shard
from alignkd.cache_schemas import CacheSchemaError, CodecSpec, shard_arrays
from reliability_report import injected

def _chunk_rows_before(spec, offsets, data) -> int:
    """The writer's rule before chunks were sized to samples: about CHUNK_BYTES per chunk."""
    row_bytes = max(1, int(np.prod(data.shape[1:])) * data.dtype.itemsize)
    return min(max(1, writer.CHUNK_BYTES // row_bytes), max(1, data.shape[0]))


# The layout caches were written in before: a file per chunk of about 1 MiB.
BEFORE = dict(FILE_BYTES=None, CHUNK_BYTES=1 << 20, _chunk_rows=_chunk_rows_before)
# Packed, with sizes so small that a sample spans chunks, a file holds several, an array several files.
TINY = dict(FILE_BYTES=512, CHUNK_BYTES=128, _chunk_rows=writer._chunk_rows)


def _samples(meta, n: int = 10):
    """Image samples of varying lengths (and, with no fixed count, varying vision tokens), every
    third one text-only."""
    rng = np.random.default_rng(3)
    nv = [None if meta.num_vision_tokens else int(x) for x in rng.integers(1, 12, n)]
    return [make_sample(rng, meta, f"k{i:02d}", text_only=i % 3 == 2, nv=nv[i]) for i in range(n)]


def _write(root, meta, samples, monkeypatch, knobs) -> CacheReader:
    for name, value in knobs.items():
        monkeypatch.setattr(writer, name, value)
    init_cache(root, meta)
    write_shard(root, "s", samples, [], meta=meta, input_shard="x.tar", input_size=0)
    return CacheReader(root)


def _same(a, b, what: str) -> None:
    if isinstance(b, Quantised):
        assert isinstance(a, Quantised) and a.codec == b.codec and a.length == b.length, what
        np.testing.assert_array_equal(a.values, b.values, err_msg=what)
        np.testing.assert_array_equal(a.scale, b.scale, err_msg=what)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape, what
        np.testing.assert_array_equal(a, b, err_msg=what)


@pytest.mark.parametrize("heads,codecs,fixed", [
    ("per_head", CodecSpec(), True),
    ("mean", CodecSpec(attention="uint4", features="int4", compressor="blosc"), True),
    ("per_head", CodecSpec(attention="fp16", features="fp16", compressor="none"), False),
    ("per_head", CodecSpec(attention="uint4", features="int8"), False),
])
def test_every_sample_reads_back_as_from_the_layout_before(tmp_path, monkeypatch, heads, codecs, fixed):
    meta = make_meta(heads=heads, codecs=codecs, **({} if fixed else {"num_vision_tokens": None}))
    samples = _samples(meta)
    before = _write(tmp_path / "before", meta, samples, monkeypatch, BEFORE)
    after = _write(tmp_path / "after", meta, samples, monkeypatch, TINY)
    shard = tmp_path / "after" / "shards" / "s"
    assert len(list((shard / "attn_L00" / "c").iterdir())) > 1  # the tiny sizes did split it
    assert zarr.open_array(str(shard / "attn_L00"), mode="r").shards is not None
    assert zarr.open_array(str(tmp_path / "before" / "shards" / "s" / "attn_L00"), mode="r").shards is None

    for s in reversed(samples):
        for dequantise in (True, False):
            got, want = after.get(s.key, dequantise=dequantise), before.get(s.key, dequantise=dequantise)
            for field in ("input_ids", "response_positions", "topk_ids", "topk_logprobs", "tail_logmass",
                          "vision_features", "focus"):
                _same(getattr(got, field), getattr(want, field), f"{s.key} {field}")
            for layer in meta.layers:
                _same(got.attention[layer], want.attention[layer], f"{s.key} layer {layer}")
            assert (got.vision_start, got.vision_length, got.vision_grid) == \
                (want.vision_start, want.vision_length, want.vision_grid)
    # The packed arrays were read straight from their files, the others (and every one before) through zarr.
    packed = {name for name in shard_arrays(meta)
              if zarr.open_array(str(shard / name), mode="r").shards is not None}
    assert "attn_L00" in packed and set(after._open["s"].packed) == packed and not before._open["s"].packed
    for name in shard_arrays(meta):  # a generic Zarr client reads the same arrays from either layout
        np.testing.assert_array_equal(zarr.open_array(str(shard / name), mode="r")[:],
                                      zarr.open_array(str(tmp_path / "before" / "shards" / "s" / name), mode="r")[:])
    # The same samples give the same bytes.
    _write(tmp_path / "again", meta, samples, monkeypatch, TINY)
    assert read_shard_meta(tmp_path / "again", "s").files == read_shard_meta(tmp_path / "after", "s").files


@pytest.mark.parametrize("knobs", [{}, TINY], ids=["as shipped", "tiny chunks and files"])
@pytest.mark.parametrize("heads,codecs,fixed", [
    ("per_head", CodecSpec(), True),
    ("mean", CodecSpec(attention="uint4", features="int4", compressor="blosc"), True),
    ("per_head", CodecSpec(attention="fp16", features="fp16", logprobs="fp32", compressor="none"), False),
    ("per_head", CodecSpec(attention="uint8", features="int8l44"), False),
])
def test_packed_files_are_written_byte_for_byte_as_zarr_writes_them(tmp_path, monkeypatch, knobs, heads, codecs,
                                                                   fixed):
    """The direct writer (alignkd.cache.packed.write_packed) against zarr's own `array[...] =`:
    every file of the shard equal, with all-zero chunks (left out of the index) and arrays
    ending mid-chunk and mid-file."""
    from test_writer_reader import tree_digest

    meta = make_meta(heads=heads, codecs=codecs, **({} if fixed else {"num_vision_tokens": None}))
    samples = _samples(meta, n=13)
    zeroed = samples[1]  # an image sample whose features and focus are all 0: chunks zarr leaves out
    samples[1] = dataclasses.replace(zeroed, vision_features=np.zeros_like(zeroed.vision_features),
                                     focus=np.zeros_like(zeroed.focus))
    real, direct_writes = writer.write_packed, []
    monkeypatch.setattr(writer, "write_packed", lambda array, data: direct_writes.append(real(array, data)) or
                        direct_writes[-1])
    _write(tmp_path / "direct", meta, samples, monkeypatch, knobs)
    assert any(direct_writes), "the direct writer wrote nothing"
    calls = []
    monkeypatch.setattr(writer, "write_packed", lambda array, data: calls.append(array.path) or False)
    _write(tmp_path / "zarr", meta, samples, monkeypatch, knobs)
    assert calls, "no array was packed"
    direct, by_zarr = tree_digest(tmp_path / "direct" / "shards"), tree_digest(tmp_path / "zarr" / "shards")
    assert direct.keys() == by_zarr.keys()
    assert [name for name in direct if direct[name] != by_zarr[name]] == []


def test_a_fixed_vision_token_count_puts_each_samples_features_in_a_chunk_of_its_own(tmp_path, monkeypatch):
    meta = make_meta(codecs=CodecSpec())
    samples = _samples(meta)
    _write(tmp_path / "c", meta, samples, monkeypatch, {})
    shard = tmp_path / "c" / "shards" / "s"
    nv = meta.num_vision_tokens
    assert zarr.open_array(str(shard / "vision_features"), mode="r").chunks[0] == nv
    assert zarr.open_array(str(shard / "focus"), mode="r").chunks[0] == nv


@pytest.mark.fault
@pytest.mark.parametrize("where", ["chunk", "chunk index"])
def test_a_damaged_chunk_or_chunk_index_is_a_one_line_error_naming_the_shard_and_file(tmp_path, monkeypatch, where):
    meta = make_meta(codecs=dataclasses.replace(CodecSpec(), compressor="none"))  # nothing but the checksums
    samples = _samples(meta)
    reader = _write(tmp_path / "c", meta, samples, monkeypatch, TINY)
    f = tmp_path / "c" / "shards" / "s" / "vision_features" / "c" / "0" / "0"
    data = bytearray(f.read_bytes())
    data[0 if where == "chunk" else -8] ^= 0x40  # the first sample's first code, or the file's index
    f.write_bytes(bytes(data))
    injected(f"altered packed {where} (same size)")
    with pytest.raises(CacheSchemaError) as e:
        reader.get("k00")
    message = str(e.value)
    assert "\n" not in message and "shards/s is damaged: file vision_features/c/0/0 has changed" in message
    assert ("its chunk index" in message) == (where == "chunk index")
    # Samples whose chunks live in other files still read.
    other = next(s for s in reversed(samples) if s.vision_length)
    np.testing.assert_array_equal(reader.get(other.key).input_ids, other.input_ids)
