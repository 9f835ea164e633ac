"""Quantised teacher signals through collate: padded as codes, dequantised on the batch's
device, they give the float batch and the losses of the numpy decode, bit for bit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from alignkd.cache.codecs import Quantised, get_codec
from alignkd.cache.reader import CacheReader
from alignkd.cache.records import SampleSignals
from alignkd.cache.store import init_cache, read_cache_meta
from alignkd.cache.writer import write_shard
from alignkd.cache_schemas import CodecSpec
from alignkd.data.distill import DistillDataset, StudentProcessor, TeacherBatch, _teacher_batch
from alignkd.losses import AlignKDAdapters
from alignkd.models import load_vlm
from alignkd.train import LossArgs, compute_losses

QUANTISED = [CodecSpec(attention="uint8", features="int8", logprobs="fp16"),
             CodecSpec(attention="uint4", features="int4", logprobs="fp16"),
             CodecSpec(attention="uint4b", features="int8l44", logprobs="fp16")]


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32)


def _assert_same(got: TeacherBatch, want: TeacherBatch) -> None:
    """Every field equal, float signals bit for bit (so -0.0 is not 0.0)."""
    for field in dataclasses.fields(TeacherBatch):
        a, b = getattr(got, field.name), getattr(want, field.name)
        if field.name == "attention":
            assert a.keys() == b.keys()
            for k in b:
                assert a[k].dtype == torch.float32 and np.array_equal(_bits(a[k]), _bits(b[k])), k
        elif b is None:  # pixel_values: only a recompute cache with the teacher's own pixels has them
            assert a is None, field.name
        elif b.dtype == torch.float32:
            assert a.dtype == torch.float32 and np.array_equal(_bits(a), _bits(b)), field.name
        else:
            assert torch.equal(a, b), field.name


def _record(rng: np.random.Generator, key: str, nv: int, *, heads: int, dim: int, mean: bool) -> SampleSignals:
    lq = 0 if nv == 0 else int(rng.integers(1, 6))
    t = 1 + nv + max(lq, 3)
    attention = rng.dirichlet(np.ones(nv + 4), (heads, lq))[..., :nv].astype(np.float32)
    return SampleSignals(
        key=key, fingerprint="0" * 64, input_ids=np.zeros(t, np.int32), response_positions=np.array([t - 1], np.int32),
        vision_start=1 if nv else -1, vision_length=nv, attention={0: attention.mean(0) if mean else attention},
        vision_features=(rng.standard_t(3, (nv, dim)) * 2).astype(np.float32), focus=rng.random(nv, np.float32),
        topk_ids=np.zeros((1, 4), np.int32), topk_logprobs=np.full((1, 4), -2.0, np.float32),
        tail_logmass=np.full(1, -1.0, np.float32))


def _as_stored(s: SampleSignals, codecs: CodecSpec) -> tuple[SampleSignals, SampleSignals]:
    """(the record as `get(dequantise=False)` gives it, as `get()` gives it: numpy-decoded)."""
    def both(x: np.ndarray, name: str):
        codec = get_codec(name)
        parts = codec.encode(x)
        return Quantised(name, parts["values"], parts["scale"], x.shape[-1]), codec.decode(parts, x.shape[-1])

    attn, feats = both(s.attention[0], codecs.attention), both(s.vision_features, codecs.features)
    return (dataclasses.replace(s, attention={0: attn[0]}, vision_features=feats[0]),
            dataclasses.replace(s, attention={0: attn[1]}, vision_features=feats[1]))


@pytest.mark.parametrize("mean", [False, True], ids=["per_head", "head_mean"])
@pytest.mark.parametrize("codecs", QUANTISED, ids=["8bit", "4bit", "bf16-scales"])
def test_a_ragged_quantised_batch_dequantises_to_the_float_batch_of_the_numpy_decode(codecs, mean):
    """Vision counts 7, 1, 0 (text only) and 4 in one batch, odd feature width: the codes pad
    to the widest sample (4-bit rows with a padding nibble), scales pad with 0."""
    rng = np.random.default_rng(5)
    records = [_record(rng, f"k{i}", nv, heads=3, dim=5, mean=mean) for i, nv in enumerate([7, 1, 0, 4])]
    stored, decoded = zip(*(_as_stored(s, codecs) for s in records))
    got = _teacher_batch(list(stored), seq_len=16)
    assert isinstance(got.vision_features, Quantised) and got.vision_features.values.dtype != np.float32
    assert all(isinstance(a, Quantised) for a in got.attention.values())
    _assert_same(got.to("cpu").dequantised(), _teacher_batch(list(decoded), seq_len=16))


@pytest.fixture(scope="module")
def quantised_caches(tiny_cache, tmp_path_factory):
    """The lossless tiny cache rewritten under each quantised codec set, by the cache writer."""
    source = CacheReader(tiny_cache)
    out = {}
    for codecs in QUANTISED:
        root = tmp_path_factory.mktemp("quantised") / codecs.attention
        meta = dataclasses.replace(read_cache_meta(tiny_cache), codecs=codecs)
        init_cache(root, meta)
        for name in source.shards:
            shard = source.shard_meta(name)
            write_shard(root, name, [source.get(k) for k in shard.keys],
                        [(s["key"], s["reason"]) for s in shard.skipped], meta=meta,
                        input_shard=shard.input_shard, input_size=shard.input_size)
        out[codecs.attention] = root
    return out


@pytest.mark.parametrize("attention", ["uint8", "uint4", "uint4b"])
def test_losses_from_codes_dequantised_after_collate_equal_the_losses_of_the_numpy_decode(
        tiny_models, demo_data, quantised_caches, attention):
    """The training step's path (codes through collate, dequantised where the batch is)
    against the reader's numpy decode collated as floats: the same teacher batch bit for bit,
    the same value of every Align-KD term."""
    reader = CacheReader(quantised_caches[attention])
    student = load_vlm(tiny_models["mobilevlm"]["student"])
    ds = DistillDataset(shards=str(demo_data / "train"), cache=reader, processor=StudentProcessor.of(student),
                        template="v1", max_length=256)
    items = [ds[i] for i in range(6)]
    batch, coded = ds.collate(items)
    _, floats = ds.collate([{**it, "signals": reader.get(key)} for it, key in zip(items, ds.keys)])
    assert isinstance(coded.attention[0], Quantised) and coded.attention[0].values.dtype == torch.uint8
    _assert_same(coded.to("cpu").dequantised(), floats)
    torch.manual_seed(0)
    adapters = AlignKDAdapters(teacher_heads=8, student_heads=4, teacher_width=128, student_width=64, mixer_convex=True)
    loss = LossArgs(focus_k=4)
    with torch.no_grad():
        a = compute_losses(student, adapters, batch, coded, loss)
        b = compute_losses(student, adapters, batch, floats, loss)
    assert a.keys() == b.keys() == {"sup", "logit", "attn", "v_all", "v_focus", "total"}
    assert all(torch.equal(a[k], b[k]) for k in b), {k: (float(a[k]), float(b[k])) for k in b}
