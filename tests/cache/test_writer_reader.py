"""Writer -> reader round trips, atomic shards, refusals, and the cache as plain Zarr."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from alignkd.cache import writer
from alignkd.cache.inspect import format_table, inspect_cache
from alignkd.cache.reader import CacheReader
from alignkd.cache.records import SampleSignals
from alignkd.cache.store import init_cache, list_complete_shards, read_shard_meta, remove_partial, remove_partial_shard
from alignkd.cache.writer import write_shard
from alignkd.cache_schemas import CacheMeta, CacheSchemaError, CodecSpec, TeacherInfo

NV, HIDDEN, HEADS, VOCAB = 9, 24, 3, 50

# ---------------------------------------------------------------------------- realistic random signals


def make_meta(*, heads: str = "per_head", codecs: CodecSpec = CodecSpec(), topk: int = 5, **changes) -> CacheMeta:
    teacher = TeacherInfo(
        family="tiny", path="/models/teacher", config_hash="c" * 64, weights_fingerprint="w" * 64,
        vision_tower=None, num_layers=3, num_heads=HEADS, hidden_size=HIDDEN, vocab_size=VOCAB,
    )
    fields = dict(
        teacher=teacher, tokenizer_hash="t" * 64, template="v1", max_length=128, num_vision_tokens=NV,
        image_preprocessing={"pad_to_square": True}, layers=(0, 2), attention_heads=heads, topk=topk,
        codecs=codecs, job={"note": "test"}, alignkd_version="0.1.0", created="2026-01-02T03:04:05+00:00",
    )
    fields.update(changes)
    return CacheMeta(**fields)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def make_sample(rng: np.random.Generator, meta: CacheMeta, key: str, *, text_only: bool = False,
                nv: int | None = None) -> SampleSignals:
    """One sample as the teacher would produce it: causal layer-0 attention restricted to the
    vision keys (rows need not sum to 1), heavy-tailed projector features, top-k of a real
    log-softmax with its tail mass. Lengths vary; some samples have no response. `nv`: this
    sample's vision tokens (default the cache's fixed count); a text-only sample has none."""
    k = meta.topk
    nv = 0 if text_only else (meta.num_vision_tokens if nv is None else nv)
    if text_only:
        t = int(rng.integers(4, 30))
        ids = rng.integers(3, VOCAB, t)
        vs, lq = -1, 0
    else:
        before, lq = int(rng.integers(1, 5)), int(rng.integers(1, 30))
        t = before + nv + lq
        ids = rng.integers(3, VOCAB, t)
        ids[before:before + nv] = -200
        vs = before
    attention, first = {}, None
    for layer in meta.layers:
        probs = np.zeros((HEADS, lq, nv), np.float32)
        for i in range(lq):
            q = vs + nv + i  # the query position sees keys 0..q
            p = softmax(rng.standard_normal((HEADS, q + 1)) * 2)
            probs[:, i] = p[:, vs:vs + nv]
        first = probs if first is None else first
        attention[layer] = probs if meta.attention_heads == "per_head" else probs.mean(axis=0)
    if text_only:
        feats = np.zeros((nv, HIDDEN), np.float32)
        focus = np.zeros(nv, np.float32)
    else:
        feats = (rng.standard_t(3, (nv, HIDDEN)) * rng.uniform(0.01, 5, (nv, 1))).astype(np.float32)
        focus = first.mean(axis=0).sum(axis=0).astype(np.float32)
    r = int(rng.integers(0, min(t - 1, 12) + 1))
    positions = np.sort(rng.choice(np.arange(1, t), size=r, replace=False)).astype(np.int32)
    logprobs = np.log(softmax(rng.standard_normal((r, VOCAB)) * 3))
    top = np.argsort(-logprobs, axis=1)[:, :k]
    top_lp = np.take_along_axis(logprobs, top, axis=1)
    tail = np.log1p(-np.exp(top_lp).sum(axis=1)) if k < VOCAB else np.full(r, -np.inf)
    return SampleSignals(
        key=key, fingerprint=hashlib.sha256(key.encode()).hexdigest(), input_ids=ids.astype(np.int32),
        response_positions=positions, vision_start=vs, vision_length=nv, attention=attention,
        vision_features=feats, focus=focus, topk_ids=top.astype(np.int32), topk_logprobs=top_lp.astype(np.float32),
        tail_logmass=tail.astype(np.float32),
    )


def make_samples(rng: np.random.Generator, meta: CacheMeta, n: int, prefix: str) -> list[SampleSignals]:
    """n samples, every third one text-only."""
    return [make_sample(rng, meta, f"{prefix}{i:03d}", text_only=i % 3 == 2) for i in range(n)]


def make_cache(tmp_path: Path, meta: CacheMeta, sizes=(5, 4), seed: int = 0) -> tuple[Path, dict[str, SampleSignals]]:
    """A cache with one shard per entry of `sizes`; returns its root and the samples written."""
    root = tmp_path / "cache"
    init_cache(root, meta)
    rng = np.random.default_rng(seed)
    written = {}
    for j, n in enumerate(sizes):
        samples = make_samples(rng, meta, n, prefix=f"s{j}-")
        write_shard(root, f"shard-{j:02d}", samples, [(f"s{j}-bad", "image does not decode")], meta=meta,
                    input_shard=f"/data/shard-{j:02d}.tar", input_size=1000 + j)
        written.update({s.key: s for s in samples})
    return root, written


def tree_digest(path: Path) -> dict[str, str]:
    files = [p for p in sorted(path.rglob("*")) if p.is_file()]
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---------------------------------------------------------------------------- round trips

LOSSLESS = CodecSpec(attention="fp32", features="fp32", logprobs="fp32")


@pytest.mark.parametrize("heads", ["per_head", "mean"])
@pytest.mark.parametrize("compressor", ["zstd", "blosc", "none"])
def test_lossless_codecs_give_back_every_sample_exactly(tmp_path, heads, compressor):
    meta = make_meta(heads=heads, codecs=dataclasses.replace(LOSSLESS, compressor=compressor))
    root, written = make_cache(tmp_path, meta)
    reader = CacheReader(root)
    assert sorted(reader.keys()) == sorted(written) and len(reader) == len(written)
    for key, want in written.items():
        got = reader.get(key)
        assert got.key == key and got.fingerprint == want.fingerprint
        assert (got.vision_start, got.vision_length) == (want.vision_start, want.vision_length)
        for field in ("input_ids", "response_positions", "topk_ids", "topk_logprobs", "tail_logmass",
                      "vision_features", "focus"):
            a, b = getattr(got, field), getattr(want, field)
            assert a.dtype == b.dtype and a.shape == b.shape, field
            np.testing.assert_array_equal(a, b, err_msg=f"{key} {field}")
        assert sorted(got.attention) == [0, 2]
        for layer, a in got.attention.items():
            assert a.dtype == np.float32 and a.flags.c_contiguous
            np.testing.assert_array_equal(a, want.attention[layer], err_msg=f"{key} layer {layer}")


def test_text_only_samples_come_back_with_no_attention_rows_and_no_vision_tokens(tmp_path):
    meta = make_meta()
    root, written = make_cache(tmp_path, meta, sizes=(3,))
    got = CacheReader(root).get("s0-002")  # every third sample is text-only
    assert got.vision_start == -1 and got.vision_length == 0 and got.vision_grid == (0, 0)
    assert all(a.shape == (HEADS, 0, 0) for a in got.attention.values())
    assert got.vision_features.shape == (0, HIDDEN) and got.focus.shape == (0,)


def test_the_zero_filled_vision_arrays_of_a_fixed_grid_producer_are_taken_for_a_text_only_sample(tmp_path):
    meta = make_meta()
    rng = np.random.default_rng(3)
    text = make_sample(rng, meta, "text", text_only=True)
    text.vision_features, text.focus = np.zeros((NV, HIDDEN), np.float32), np.zeros(NV, np.float32)
    text.attention = {layer: np.zeros((HEADS, 0, NV), np.float32) for layer in meta.layers}
    root = tmp_path / "cache"
    init_cache(root, meta)
    write_shard(root, "s", [text], [], meta=meta, input_shard="x.tar", input_size=0)
    got = CacheReader(root).get("text")
    assert got.vision_features.shape == (0, HIDDEN) and all(a.shape == (HEADS, 0, 0) for a in got.attention.values())


@pytest.mark.parametrize("heads", ["per_head", "mean"])
@pytest.mark.parametrize("codecs", [LOSSLESS, CodecSpec(attention="uint4", features="int4", logprobs="fp16"),
                                    CodecSpec(attention="uint4b", features="int8l44", logprobs="fp16")])
def test_samples_with_different_vision_token_counts_share_a_shard(tmp_path, heads, codecs):
    """A dynamic-resolution teacher (num_vision_tokens None): each sample its own N_v and grid,
    odd counts included (4-bit rows pad a nibble), read back each with its own shapes."""
    meta = make_meta(heads=heads, codecs=codecs, num_vision_tokens=None)
    rng = np.random.default_rng(7)
    grids = [(2, 3), (1, 1), None, (4, 5), (3, 3)]
    samples = []
    for i, grid in enumerate(grids):
        s = make_sample(rng, meta, f"k{i}", text_only=grid is None, nv=grid[0] * grid[1] if grid else None)
        s.vision_grid = grid
        samples.append(s)
    root = tmp_path / "cache"
    init_cache(root, meta)
    write_shard(root, "mixed", samples, [], meta=meta, input_shard="x.tar", input_size=0)
    reader = CacheReader(root)
    for want in samples:
        got = reader.get(want.key)
        nv = want.vision_length
        assert got.vision_grid == (want.vision_grid or (0, 0)) and got.vision_length == nv
        assert got.vision_features.shape == (nv, HIDDEN) and got.focus.shape == (nv,)
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.focus, want.focus)
        for layer, a in got.attention.items():
            x = want.attention[layer]
            assert a.shape == x.shape
            slack = 2.0**-9 if codecs.attention == "uint4b" else 1e-5  # a bfloat16 scale: up to 2^-9 larger
            tol = 0 if codecs is LOSSLESS else x.max(axis=-1, keepdims=True) / 15 / 2 * (1 + slack) + 1e-7 if x.size else 0
            assert (np.abs(a - x) <= tol).all(), (want.key, layer)
        if codecs is LOSSLESS:
            np.testing.assert_array_equal(got.vision_features, want.vision_features)


@pytest.mark.bad_input
def test_a_fixed_count_cache_refuses_a_sample_with_another_count_and_a_grid_that_does_not_hold_it(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cache"
    meta = make_meta()
    init_cache(root, meta)
    with pytest.raises(CacheSchemaError, match=f"sample odd: vision_length 4, the cache has {NV} vision tokens"):
        write_shard(root, "s", [make_sample(rng, meta, "odd", nv=4)], [], meta=meta, input_shard="x", input_size=0)
    dynamic = make_meta(num_vision_tokens=None)
    bad = make_sample(rng, dynamic, "grid", nv=6)
    bad.vision_grid = (2, 2)
    root2 = tmp_path / "cache2"
    init_cache(root2, dynamic)
    with pytest.raises(CacheSchemaError, match=r"sample grid: vision_grid \(2, 2\) does not hold its 6"):
        write_shard(root2, "s", [bad], [], meta=dynamic, input_shard="x", input_size=0)
    assert list_complete_shards(root) == list_complete_shards(root2) == []


def test_ids_and_positions_are_stored_as_narrow_as_is_exact(tmp_path):
    root, written = make_cache(tmp_path, make_meta(), sizes=(3,))
    group = zarr.open_group(str(root / "shards" / "shard-00"), mode="r")
    assert group["input_ids"].dtype == np.uint16 and group["topk_ids"].dtype == np.uint16
    assert group["response_positions"].dtype == np.uint16
    wide = make_meta(teacher=dataclasses.replace(make_meta().teacher, vocab_size=151_665), max_length=70_000)
    root = tmp_path / "wide"
    init_cache(root, wide)
    sample = make_sample(np.random.default_rng(0), wide, "w")
    sample.topk_ids[:] = 151_000  # beyond uint16
    write_shard(root, "s", [sample], [], meta=wide, input_shard="x", input_size=0)
    group = zarr.open_group(str(root / "shards" / "s"), mode="r")
    assert group["input_ids"].dtype == np.uint32 and group["response_positions"].dtype == np.uint32
    got = CacheReader(root).get("w")
    assert got.topk_ids.dtype == np.int32 and (got.topk_ids == 151_000).all()
    np.testing.assert_array_equal(got.input_ids, sample.input_ids)  # the vision span read back as IMAGE_TOKEN


@pytest.mark.parametrize("heads", ["per_head", "mean"])
@pytest.mark.parametrize(
    "attention,features,a_levels,f_levels,a_slack",
    # uint4b's scale is max / 15 rounded to bfloat16, up to 2^-9 larger, and so is its half step
    [("uint8", "int8", 255, 127, 1e-5), ("uint4", "int4", 15, 7, 1e-5), ("uint4b", "int8l44", 15, 44, 2.0**-9)]
)
def test_lossy_codecs_stay_within_the_formula_bounds_for_every_sample(
    tmp_path, heads, attention, features, a_levels, f_levels, a_slack
):
    meta = make_meta(heads=heads, codecs=CodecSpec(attention=attention, features=features, logprobs="fp16"))
    root, written = make_cache(tmp_path, meta)
    reader = CacheReader(root)
    for key, want in written.items():
        got = reader.get(key)
        for layer, a in got.attention.items():
            x = want.attention[layer].astype(np.float64)
            step = x.max(axis=-1, keepdims=True) / a_levels if x.size else 0
            assert (np.abs(a - x) <= step / 2 * (1 + a_slack) + 1e-7).all(), (key, layer)
        x = want.vision_features.astype(np.float64)
        step = np.abs(x).max(axis=-1, keepdims=True) / f_levels
        assert (np.abs(got.vision_features - x) <= step / 2 * (1 + 1e-5) + 1e-6 * np.abs(x)).all(), key
        # fp16 log-probs are exactly numpy's cast; ids and positions are exact.
        np.testing.assert_array_equal(got.topk_logprobs, want.topk_logprobs.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(got.tail_logmass, want.tail_logmass.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.focus, want.focus)


def test_a_minus_infinite_tail_survives_fp16(tmp_path):
    meta = make_meta(topk=VOCAB)  # top-k holds all the mass: the tail is log 0
    root, written = make_cache(tmp_path, meta, sizes=(4,))
    reader = CacheReader(root)
    for key, want in written.items():
        tail = reader.get(key).tail_logmass
        assert tail.shape == want.tail_logmass.shape and np.isneginf(tail).all()
    assert "tail_logmass" in read_shard_meta(root, "shard-00").codec_error


# ---------------------------------------------------------------------------- shard metadata


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_shard_meta_counts_bytes_on_disk_fp16_size_and_codec_error(tmp_path):
    meta = make_meta()
    root, written = make_cache(tmp_path, meta, sizes=(6,))
    shard = read_shard_meta(root, "shard-00")
    shard_dir = root / "shards" / "shard-00"
    arrays = sorted(p.name for p in shard_dir.iterdir() if p.is_dir())
    assert sorted(shard.nbytes) == arrays
    for name in arrays:
        assert shard.nbytes[name] == dir_bytes(shard_dir / name), name

    reader = CacheReader(root)
    samples = list(written.values())
    got = [reader.get(s.key) for s in samples]
    assert shard.keys == tuple(s.key for s in samples) and shard.num_samples == 6
    assert shard.skipped == ({"key": "s0-bad", "reason": "image does not decode"},)
    assert (shard.input_shard, shard.input_size) == ("/data/shard-00.tar", 1000)
    # fp16 size: 2 bytes per float value, counted from the samples themselves.
    assert shard.raw_fp16_bytes["attn_L02"] == 2 * sum(s.attention[2].size for s in samples)
    images = sum(s.vision_start >= 0 for s in samples)  # text-only samples store no vision tokens
    assert shard.raw_fp16_bytes["vision_features"] == 2 * images * NV * HIDDEN
    assert shard.raw_fp16_bytes["focus"] == 2 * images * NV
    # Codec error: recomputed from what the reader returns.
    for name, field in [("attn_L00", None), ("vision_features", "vision_features"), ("topk_logprobs", "topk_logprobs")]:
        diffs = np.concatenate([
            np.abs((g.attention[0] if field is None else getattr(g, field)).astype(np.float64)
                   - (w.attention[0] if field is None else getattr(w, field))).ravel()
            for g, w in zip(got, samples)
        ])
        assert shard.codec_error[name]["max"] == pytest.approx(diffs.max(), rel=1e-6)
        assert shard.codec_error[name]["mean"] == pytest.approx(diffs.mean(), rel=1e-6)
    assert "focus" not in shard.codec_error  # stored as float32: not lossy


def test_the_cache_is_plain_zarr_with_the_documented_array_names(tmp_path):
    meta = make_meta(codecs=CodecSpec(attention="uint8", features="int8", logprobs="fp16"))
    root, written = make_cache(tmp_path, meta, sizes=(3, 2))
    group = zarr.open_group(str(root), mode="r")
    assert group.attrs["schema_version"] == 3 and group.attrs["codecs"]["attention"] == "uint8"
    assert sorted(group["shards"].group_keys()) == ["shard-00", "shard-01"]
    shard = group["shards"]["shard-01"]
    assert sorted(shard.array_keys()) == sorted([
        "ids_offsets", "input_ids", "resp_offsets", "response_positions", "topk_ids", "topk_logprobs",
        "tail_logmass", "rows_offsets", "attn_offsets", "attn_L00", "attn_L00_scale", "attn_L02", "attn_L02_scale",
        "vision_start", "vision_length", "vision_grid", "vision_offsets", "vision_features", "vision_features_scale",
        "focus",
    ])
    assert shard["attn_L00"].dtype == np.uint8 and shard["attn_L00"].ndim == 1
    assert shard["vision_features"].shape == (2 * NV, HIDDEN) and shard["focus"].dtype == np.float32
    # Decode sample 0 of this shard by hand from the docstring's rules.
    want = written[shard.attrs["keys"][0]]
    ids_off, rows_off, attn_off = shard["ids_offsets"][:], shard["rows_offsets"][:], shard["attn_offsets"][:]
    ids = shard["input_ids"][ids_off[0]:ids_off[1]].astype(np.int32)
    vs, nv = int(shard["vision_start"][0]), int(shard["vision_length"][0])
    assert (ids[vs:vs + nv] == 0).all() and tuple(shard["vision_grid"][0]) == (3, 3)
    ids[vs:vs + nv] = -200
    np.testing.assert_array_equal(ids, want.input_ids)
    lq = rows_off[1] - rows_off[0]
    q = shard["attn_L02"][attn_off[0]:attn_off[1]].astype(np.float32).reshape(lq, HEADS, nv)  # (Lq, H, N_v)
    scale = shard["attn_L02_scale"][rows_off[0]:rows_off[1]]                                 # (Lq, H)
    by_hand = (q * scale[..., None]).transpose(1, 0, 2)
    np.testing.assert_array_equal(by_hand, CacheReader(root).get(want.key).attention[2])


def test_a_shard_of_only_skipped_samples_is_a_complete_shard(tmp_path):
    meta = make_meta()
    root, _ = make_cache(tmp_path, meta, sizes=(2,))
    write_shard(root, "empty", [], [("x1", "no conversations"), ("x2", "too long")], meta=meta,
                input_shard="/data/empty.tar", input_size=10)
    reader = CacheReader(root)
    assert reader.shards == ["empty", "shard-00"] and len(reader) == 2
    assert sorted(reader.skipped()) == [("s0-bad", "image does not decode", "shard-00"),
                                        ("x1", "no conversations", "empty"), ("x2", "too long", "empty")]


# ---------------------------------------------------------------------------- atomic shards


@pytest.mark.fault
def test_a_failure_mid_write_leaves_no_shard_and_the_others_untouched(tmp_path, monkeypatch):
    meta = make_meta()
    root, _ = make_cache(tmp_path, meta, sizes=(3,))
    before = tree_digest(root / "shards" / "shard-00")
    real, calls = writer._write_array, []

    def failing(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 5:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "_write_array", failing)
    samples = make_samples(np.random.default_rng(9), meta, 3, prefix="new-")
    with pytest.raises(OSError, match="disk full"):
        write_shard(root, "shard-01", samples, [], meta=meta, input_shard="x", input_size=1)
    assert sorted(os.listdir(root / "shards")) == ["shard-00", "zarr.json"]  # nothing half-written left
    assert tree_digest(root / "shards" / "shard-00") == before
    assert CacheReader(root).keys() == ["s0-000", "s0-001", "s0-002"]


KILLED_WRITER = """
import os, sys
import numpy as np
sys.path.insert(0, {tests!r})
import test_writer_reader as t
from alignkd.cache import writer

real, calls = writer._write_array, []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 6:
        os._exit(17)  # like SIGKILL: no cleanup runs
    return real(*args, **kwargs)
writer._write_array = dying
meta = t.make_meta()
samples = t.make_samples(np.random.default_rng(5), meta, 3, prefix="killed-")
writer.write_shard({root!r}, "shard-01", samples, [], meta=meta, input_shard="x", input_size=1)
"""


@pytest.mark.fault
def test_a_killed_writer_leaves_only_a_temporary_directory_that_remove_partial_deletes(tmp_path):
    meta = make_meta()
    root, _ = make_cache(tmp_path, meta, sizes=(3,))
    before = tree_digest(root / "shards" / "shard-00")
    script = KILLED_WRITER.format(tests=str(Path(__file__).parent), root=str(root))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 17, proc.stderr
    leftovers = [n for n in os.listdir(root / "shards") if n.startswith(".shard-01.tmp-")]
    assert len(leftovers) == 1
    assert list_complete_shards(root) == ["shard-00"]
    assert CacheReader(root).keys() == ["s0-000", "s0-001", "s0-002"]
    assert remove_partial(root) == leftovers
    assert sorted(os.listdir(root / "shards")) == ["shard-00", "zarr.json"]
    assert tree_digest(root / "shards" / "shard-00") == before
    # The shard can now be written for real.
    write_shard(root, "shard-01", make_samples(np.random.default_rng(5), meta, 3, prefix="killed-"), [],
                meta=meta, input_shard="x", input_size=1)
    assert len(CacheReader(root)) == 6


def test_rewriting_a_shard_replaces_it_whole(tmp_path):
    meta = make_meta()
    root, _ = make_cache(tmp_path, meta, sizes=(3,))
    samples = make_samples(np.random.default_rng(7), meta, 2, prefix="again-")
    write_shard(root, "shard-00", samples, [], meta=meta, input_shard="y", input_size=2)
    assert sorted(os.listdir(root / "shards")) == ["shard-00", "zarr.json"]
    reader = CacheReader(root)
    assert reader.keys() == ["again-000", "again-001"] and reader.skipped() == []
    np.testing.assert_array_equal(reader.get("again-001").input_ids, samples[1].input_ids)


def test_remove_partial_shard_removes_only_that_shards_leftovers(tmp_path):
    meta = make_meta()
    root, _ = make_cache(tmp_path, meta, sizes=(1,))
    for name in [".a.tmp-1", ".a.tmp-2.replaced", ".ab.tmp-3", ".b.tmp-4"]:
        (root / "shards" / name).mkdir()
    assert remove_partial_shard(root, "a") == [".a.tmp-1", ".a.tmp-2.replaced"]
    assert remove_partial(root) == [".ab.tmp-3", ".b.tmp-4"]
    assert list_complete_shards(root) == ["shard-00"]


# ---------------------------------------------------------------------------- refusals


@pytest.mark.bad_input
def test_init_cache_accepts_the_same_settings_and_refuses_different_ones(tmp_path):
    meta = make_meta()
    root = tmp_path / "cache"
    init_cache(root, meta)
    rerun = dataclasses.replace(meta, created="2027-05-05T00:00:00+00:00", job={"other": "run"},
                                teacher=dataclasses.replace(meta.teacher, path="/mnt/other/teacher"))
    init_cache(root, rerun)  # bookkeeping differs only: fine
    assert CacheReader(root).meta == meta  # and the original record is kept
    other = dataclasses.replace(meta, topk=6, teacher=dataclasses.replace(meta.teacher, config_hash="d" * 64))
    with pytest.raises(CacheSchemaError) as err:
        init_cache(root, other)
    assert str(err.value) == (
        f"cache at {root} was built with a different teacher.config_hash, topk; "
        "refusing to mix (use a new --set cache.path or delete it)"
    )


@pytest.mark.bad_input
def test_init_cache_refuses_a_directory_that_is_not_a_cache(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("hi")
    with pytest.raises(CacheSchemaError, match="is not an alignkd cache"):
        init_cache(tmp_path / "busy", make_meta())
    (tmp_path / "empty").mkdir()
    init_cache(tmp_path / "empty", make_meta())  # an empty directory is fine
    assert CacheReader(tmp_path / "empty").shards == []


@pytest.mark.bad_input
def test_write_shard_refuses_settings_that_differ_from_the_cache(tmp_path):
    root, _ = make_cache(tmp_path, make_meta(), sizes=(1,))
    other = make_meta(codecs=CodecSpec(attention="uint4"))
    samples = make_samples(np.random.default_rng(1), other, 2, prefix="x")
    with pytest.raises(CacheSchemaError, match="different codecs.attention"):
        write_shard(root, "shard-01", samples, [], meta=other, input_shard="x", input_size=1)
    assert list_complete_shards(root) == ["shard-00"]


def _set(field, value):
    return lambda s: dataclasses.replace(s, **{field: value})


def _attention(fn):
    return lambda s: dataclasses.replace(s, attention={k: fn(v) for k, v in s.attention.items()})


BAD_SAMPLES = {
    "features of another width": (_set("vision_features", np.zeros((NV, HIDDEN + 1), np.float32)),
                                  "vision_features has shape"),
    "a missing layer": (lambda s: dataclasses.replace(s, attention={0: s.attention[0]}), "attention has layers"),
    "top-k of another k": (lambda s: dataclasses.replace(s, topk_ids=s.topk_ids[:, :2]), "topk_ids has shape"),
    "fewer attention rows than text": (_attention(lambda a: a[:, :-1]), r"attention\[0\] has shape"),
    "NaN features": (lambda s: dataclasses.replace(s, vision_features=np.full_like(s.vision_features, np.nan)), "NaN"),
    "negative attention": (_attention(lambda a: a - 1), "negative probabilities"),
    "no image tokens at the vision span": (lambda s: dataclasses.replace(s, input_ids=np.abs(s.input_ids)),
                                           "IMAGE_TOKEN"),
    "a response at position 0": (_set("response_positions", np.zeros(1, np.int32)), "response_positions"),
    "a token id outside the vocabulary": (lambda s: dataclasses.replace(s, topk_ids=s.topk_ids + VOCAB), "vocabulary"),
    "a bad fingerprint": (_set("fingerprint", "abc"), "fingerprint"),
    "float ids": (lambda s: dataclasses.replace(s, input_ids=s.input_ids.astype(np.float32)), "input_ids has dtype"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
@pytest.mark.bad_input
def test_write_shard_refuses_a_bad_sample_naming_its_key_before_writing(tmp_path, case):
    meta = make_meta()
    root, _ = make_cache(tmp_path, meta, sizes=(1,))
    rng = np.random.default_rng(4)
    samples = [make_sample(rng, meta, "good"), make_sample(rng, meta, "bad-one")]
    while samples[1].response_positions.size == 0:  # every case needs a response row to break
        samples[1] = make_sample(rng, meta, "bad-one")
    mutate, match = BAD_SAMPLES[case]
    samples[1] = mutate(samples[1])
    with pytest.raises(CacheSchemaError, match=match) as err:
        write_shard(root, "shard-01", samples, [], meta=meta, input_shard="x", input_size=1)
    assert str(err.value).startswith("shard shard-01: sample bad-one: ")
    assert sorted(os.listdir(root / "shards")) == ["shard-00", "zarr.json"]


@pytest.mark.bad_input
def test_write_shard_refuses_text_only_samples_with_vision_signals_and_duplicate_keys(tmp_path):
    meta = make_meta()
    root, _ = make_cache(tmp_path, meta, sizes=(1,))
    rng = np.random.default_rng(2)
    text = make_sample(rng, meta, "text", text_only=True)
    with pytest.raises(CacheSchemaError, match="sample text: text-only sample has non-zero"):
        write_shard(root, "x", [dataclasses.replace(text, focus=np.ones(NV, np.float32))], [], meta=meta,
                    input_shard="x", input_size=1)
    with pytest.raises(CacheSchemaError, match="sample text appears twice"):
        write_shard(root, "x", [text, text], [], meta=meta, input_shard="x", input_size=1)
    with pytest.raises(CacheSchemaError, match="sample text is both written and skipped"):
        write_shard(root, "x", [text], [("text", "why")], meta=meta, input_shard="x", input_size=1)


@pytest.mark.bad_input
def test_a_value_the_codec_cannot_store_is_refused_naming_the_sample(tmp_path):
    meta = make_meta()
    root, _ = make_cache(tmp_path, meta, sizes=(1,))
    rng = np.random.default_rng(3)
    sample = make_sample(rng, meta, "deep")
    while sample.response_positions.size == 0:
        sample = make_sample(rng, meta, "deep")
    sample.topk_logprobs[0, -1] = -1e5  # finite, but beyond fp16
    with pytest.raises(CacheSchemaError, match="sample deep: topk_logprobs: fp16: .*float16 range"):
        write_shard(root, "shard-01", [sample], [], meta=meta, input_shard="x", input_size=1)
    assert sorted(os.listdir(root / "shards")) == ["shard-00", "zarr.json"]


@pytest.mark.fault
def test_the_reader_refuses_a_key_stored_in_two_shards(tmp_path):
    meta = make_meta()
    root, written = make_cache(tmp_path, meta, sizes=(2,))
    write_shard(root, "shard-01", [written["s0-001"]], [], meta=meta, input_shard="x", input_size=1)
    reader = CacheReader(root)  # opening reads no shard attributes yet
    with pytest.raises(CacheSchemaError, match="sample s0-001 is in shards shard-00 and shard-01"):
        reader.keys()


def set_root_attrs(root: Path, **changes) -> None:
    group = zarr.open_group(str(root), mode="r+")
    attrs = group.attrs.asdict()
    attrs.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del attrs[key]
    group.attrs.clear()
    group.attrs.update(attrs)


@pytest.mark.bad_input
def test_the_reader_refuses_newer_or_invalid_metadata_naming_the_cache(tmp_path):
    root, _ = make_cache(tmp_path, make_meta(), sizes=(1,))
    set_root_attrs(root, schema_version=4)
    with pytest.raises(CacheSchemaError) as err:
        CacheReader(root)
    assert str(err.value) == f"cache at {root}: cache schema version 4 is newer than this alignkd (3): upgrade alignkd"
    set_root_attrs(root, schema_version=3, topk=None)
    with pytest.raises(CacheSchemaError, match=f"cache at {root}: missing key topk"):
        CacheReader(root)
    with pytest.raises(CacheSchemaError, match="not an alignkd cache"):
        CacheReader(tmp_path / "nowhere")


@pytest.mark.fault
def test_the_reader_checks_a_shards_arrays_against_the_schema(tmp_path):
    root, _ = make_cache(tmp_path, make_meta(), sizes=(2,))
    group = zarr.open_group(str(root / "shards" / "shard-00"), mode="r+")
    del group["attn_L02_scale"]
    reader = CacheReader(root)
    assert len(reader) == 2  # the index needs attributes only
    # The shard's file list catches it first (alignkd.cache.verify), before Zarr reads anything.
    with pytest.raises(CacheSchemaError, match=r"shard .*shard-00 is damaged: file attn_L02_scale/\S+ is missing"):
        reader.get("s0-000")


def test_the_reader_indexes_from_attributes_without_opening_arrays(tmp_path, monkeypatch):
    from alignkd.cache import reader as reader_module

    root, written = make_cache(tmp_path, make_meta(), sizes=(2, 3))

    def no_arrays(*args, **kwargs):
        raise AssertionError("a shard's arrays were opened")

    monkeypatch.setattr(reader_module, "_OpenShard", no_arrays)
    reader = CacheReader(root)
    assert sorted(reader.keys()) == sorted(written) and "s1-002" in reader and "nope" not in reader
    assert reader.shard_meta("shard-01").num_samples == 3
    with pytest.raises(KeyError, match="not in cache"):
        reader.get("nope")


def test_the_cache_fingerprint_changes_with_its_contents_only(tmp_path):
    meta = make_meta()
    root, written = make_cache(tmp_path, meta, sizes=(2,))
    first = CacheReader(root).fingerprint()
    assert CacheReader(root).fingerprint() == first and len(first) == 64
    write_shard(root, "shard-01", make_samples(np.random.default_rng(8), meta, 1, prefix="more-"), [],
                meta=meta, input_shard="y", input_size=1)
    second = CacheReader(root).fingerprint()
    assert second != first
    write_shard(root, "shard-01", make_samples(np.random.default_rng(8), meta, 1, prefix="other-"), [],
                meta=meta, input_shard="y", input_size=1)
    assert CacheReader(root).fingerprint() not in (first, second)


# ---------------------------------------------------------------------------- inspect


def test_inspect_cache_adds_up_the_shard_metadata(tmp_path):
    meta = make_meta(codecs=CodecSpec(attention="uint8", features="int8"))
    root, written = make_cache(tmp_path, meta, sizes=(5, 4))
    report = inspect_cache(root)
    shards = [read_shard_meta(root, n) for n in ("shard-00", "shard-01")]
    assert (report["samples"], report["shards"], report["skipped"]) == (9, 2, 2)
    attn = report["signals"]["attn_L00"]
    stored = sum(s.nbytes["attn_L00"] + s.nbytes["attn_L00_scale"] for s in shards)
    assert attn["codec"] == "uint8" and attn["bytes"] == stored
    assert attn["bytes_per_sample"] == pytest.approx(stored / 9)
    assert attn["raw_fp16_bytes_per_sample"] == pytest.approx(sum(s.raw_fp16_bytes["attn_L00"] for s in shards) / 9)
    assert attn["max_error"] == max(s.codec_error["attn_L00"]["max"] for s in shards)
    assert report["signals"]["input_ids"]["ratio"] is None and report["signals"]["focus"]["max_error"] is None
    assert report["total"]["bytes"] == sum(sum(s.nbytes.values()) for s in shards)
    table = format_table(report)
    for name in report["signals"]:
        assert name in table


@pytest.mark.parametrize("heads", ["per_head", "mean"])
@pytest.mark.parametrize("codecs", [CodecSpec(attention="uint8", features="int8", logprobs="fp16"),
                                    CodecSpec(attention="uint4", features="int4", logprobs="fp16"),
                                    CodecSpec(attention="uint4b", features="int8l44", logprobs="fp16"),
                                    CodecSpec(attention="fp16", features="fp16", logprobs="fp16")])
def test_samples_read_as_stored_dequantise_on_torch_to_the_readers_floats(tmp_path, heads, codecs):
    """`get(key, dequantise=False)`: a scaled codec's attention and features as codes and row
    scales in the float block's orientation, which `codecs.dequantise` turns into the same
    float32 bits as the reader's own decode; float codecs come back decoded as always."""
    import torch

    from alignkd.cache.codecs import Quantised, dequantise

    meta = make_meta(heads=heads, codecs=codecs, num_vision_tokens=None)
    rng = np.random.default_rng(11)
    samples = [make_sample(rng, meta, f"k{i}", text_only=nv == 0, nv=nv or None) for i, nv in enumerate([6, 1, 0, 9])]
    root = tmp_path / "cache"
    init_cache(root, meta)
    write_shard(root, "mixed", samples, [], meta=meta, input_shard="x.tar", input_size=0)
    reader = CacheReader(root)

    def floats(x):
        if not isinstance(x, Quantised):
            return x
        return dequantise(Quantised(x.codec, torch.from_numpy(np.ascontiguousarray(x.values)),
                                    torch.from_numpy(np.ascontiguousarray(x.scale)), x.length)).numpy()

    for s in samples:
        want, got = reader.get(s.key), reader.get(s.key, dequantise=False)
        assert isinstance(got.vision_features, Quantised) == (codecs.features != "fp16")
        pairs = [(got.vision_features, want.vision_features)] + [(got.attention[k], want.attention[k]) for k in meta.layers]
        for a, b in pairs:
            assert a.shape == b.shape
            np.testing.assert_array_equal(floats(a).view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("codecs", [CodecSpec(compressor="none"),
                                    CodecSpec(attention="uint8", features="int8", compressor="none")],
                         ids=["default", "8bit"])
def test_sample_nbytes_is_what_a_one_sample_shard_stores_per_array(tmp_path, codecs):
    """The byte count the dry run and inspect-cache use, against the arrays the writer made
    (uint4b's scales are 2 bytes a row); the offsets' shared final entry is not the sample's."""
    from alignkd.cache_schemas import SHARDS_GROUP, sample_nbytes, shard_arrays

    meta = make_meta(codecs=codecs)
    sample = make_sample(np.random.default_rng(3), meta, "one")
    root = tmp_path / "cache"
    init_cache(root, meta)
    write_shard(root, "only", [sample], [], meta=meta, input_shard="x.tar", input_size=0)
    lq = next(iter(sample.attention.values())).shape[-2]
    want = sample_nbytes(meta, tokens=len(sample.input_ids), responses=len(sample.response_positions), rows=lq,
                         vision=sample.vision_length)
    assert set(want) == set(shard_arrays(meta))
    for name, spec in shard_arrays(meta).items():
        stored = zarr.open_array(str(root / SHARDS_GROUP / "only" / name), mode="r")
        assert str(stored.dtype) == spec.dtype, name
        shared = stored.dtype.itemsize if spec.shape[0] == "N+1" else 0
        assert want[name] == stored.nbytes - shared, name
