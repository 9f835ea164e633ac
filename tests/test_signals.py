"""Quantising the teacher's signals where its forward ran: the shard it gives is the shard the
writer's numpy quantiser makes from the float records, file for file."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from alignkd.cache.codecs import Quantised
from alignkd.cache.store import init_cache, read_shard_meta
from alignkd.cache.writer import write_shard
from alignkd.cache_schemas import CodecSpec
from alignkd.data import DataArgs
from alignkd.data.batching import make_batch
from alignkd.data.shards import decode_sample, expand_shards, iter_raw_samples
from alignkd.extract import CacheArgs, ExtractArgs, TeacherWorker, _cache_meta
from alignkd.models import ModelArgs
from alignkd.signals import teacher_signals


@pytest.mark.parametrize("heads", ["per_head", "mean"])
@pytest.mark.parametrize("codecs", [CodecSpec(attention="uint8", features="int8", logprobs="fp16"),
                                    CodecSpec(attention="uint4", features="int4", logprobs="fp16"),
                                    CodecSpec(attention="uint4b", features="int8l44", logprobs="fp16")],
                         ids=["8bit", "4bit", "bf16-scales"])
def test_signals_quantised_on_the_device_write_the_numpy_quantisers_shard_file_for_file(
        tiny_models, demo_data, tmp_path, codecs, heads):
    """One input shard through the tiny teacher in batches of 8 (9 vision tokens: 4-bit rows
    pad a nibble), two layers: every file of the shard (chunks and array metadata, by the
    sha256 in its file list) is the same; of the shard's attributes only the mean codec error
    may differ, in float64 rounding (a sum in another order)."""
    args = ExtractArgs(teacher=ModelArgs(path=str(tiny_models["mobilevlm"]["teacher"]), device="cpu"),
                       data=DataArgs(shards=str(demo_data / "train"), template="v1", max_length=256, batch_size=8),
                       cache=CacheArgs(layers=[0, 1], topk=8, attention_heads=heads, codecs=codecs))
    worker = TeacherWorker(args)
    meta = _cache_meta(args, worker.describe())
    shard = expand_shards(str(demo_data / "train"))[0]
    samples = [decode_sample(raw) for raw in iter_raw_samples(shard)][:24]
    records: dict[str, list] = {"host": [], "device": []}
    for lo in range(0, len(samples), 8):
        batch, _ = make_batch(worker.vlm, samples[lo : lo + 8], template="v1", max_length=256)
        with torch.no_grad():
            out = worker.vlm(batch, tap_layers=(0, 1))
        for where in records:
            records[where] += teacher_signals(worker.vlm, batch, out, samples[lo : lo + 8], layers=[0, 1], topk=8,
                                              attention_heads=heads, codecs=codecs if where == "device" else None)
    assert all(isinstance(r.vision_features, Quantised) for r in records["device"] if r.vision_length)
    written = {}
    for where, recs in records.items():
        init_cache(tmp_path / where, meta)
        write_shard(tmp_path / where, "s", recs, [], meta=meta, input_shard=shard, input_size=1)
        written[where] = read_shard_meta(tmp_path / where, "s")
    host, device = written["host"], written["device"]
    assert device.files == host.files and device.nbytes == host.nbytes and device.raw_fp16_bytes == host.raw_fp16_bytes
    assert dataclasses.replace(device, codec_error=host.codec_error) == host
    assert device.codec_error.keys() == host.codec_error.keys() == {"attn_L00", "attn_L01", "vision_features",
                                                                   "topk_logprobs", "tail_logmass"}
    for signal, err in host.codec_error.items():
        assert device.codec_error[signal]["max"] == err["max"]
        assert device.codec_error[signal]["mean"] == pytest.approx(err["mean"], rel=1e-12, abs=0)
