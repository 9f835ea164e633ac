"""Stage 1 on local Ray with 2 CPUs: a 3-shard run with 2 workers, the cached signals against
a fresh single-sample teacher computation, resume in every way a run can be interrupted,
refusal to mix caches, and the dry-run estimate against the real size."""

import dataclasses
import io
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkd.cache.reader import CacheReader
from alignkd.cache.store import list_complete_shards
from alignkd.cache_schemas import CacheSchemaError, CodecSpec
from alignkd.data import DataArgs
from alignkd.data.batching import make_batch
from alignkd.data.shards import decode_sample, expand_shards, iter_raw_samples
from alignkd.extract import CacheArgs, ExtractArgs, RayArgs, estimate_size, extract
from alignkd.faults import KILL_ENV
from alignkd.models import ModelArgs, load_vlm
from alignkd.signals import teacher_signals
from reliability_report import injected, tried

LOSSLESS = CodecSpec(attention="fp32", features="fp32", logprobs="fp32", compressor="zstd")


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _args(tiny_models, demo_data, cache, codecs=LOSSLESS, teacher="teacher", **cache_kw):
    return ExtractArgs(
        teacher=ModelArgs(path=str(tiny_models["mobilevlm"][teacher]), device="cpu"),
        data=DataArgs(shards=str(demo_data / "train"), template="v1", max_length=256, batch_size=8),
        cache=CacheArgs(path=str(cache), layers=[0, 1], topk=8, codecs=codecs, **cache_kw),
        ray=RayArgs(num_workers=2, cpus_per_worker=0.5),
        dry_run_samples=16,
    )


def _run(args):
    return extract(args, echo=lambda _: None, progress=False)


def _arrays(cache: Path) -> dict[str, bytes]:
    """Every chunk and metadata file of every shard, except attributes that hold times."""
    out = {}
    for f in sorted((cache / "shards").rglob("*")):
        if f.is_file() and f.name != "zarr.json":
            out[str(f.relative_to(cache))] = f.read_bytes()
    return out


@pytest.fixture(scope="module")
def reference_cache(ray_session, tiny_models, demo_data, tmp_path_factory):
    """An uninterrupted lossless run: 3 shards, 2 workers."""
    cache = tmp_path_factory.mktemp("ref") / "cache"
    summary = _run(_args(tiny_models, demo_data, cache))
    assert summary.shards_total == 3 and len(summary.shards_written) == 3
    return cache


def _fresh_signals(vlm, sample, layers=(0, 1), topk=8):
    """The teacher on one sample alone: no padding, no batch neighbours."""
    batch, skipped = make_batch(vlm, [sample], template="v1", max_length=256)
    assert not skipped
    with torch.no_grad():
        out = vlm(batch, tap_layers=layers)
    return teacher_signals(vlm, batch, out, [sample], layers=layers, topk=topk)[0]


def test_cached_signals_equal_the_teachers_fresh_computation(reference_cache, tiny_models, demo_data):
    reader = CacheReader(reference_cache)
    samples = [decode_sample(r) for s in expand_shards(demo_data / "train") for r in iter_raw_samples(s)]
    assert sorted(reader.keys()) == sorted(s.key for s in samples)
    vlm = load_vlm(tiny_models["mobilevlm"]["teacher"])
    for sample in samples[::7]:
        got, want = reader.get(sample.key), _fresh_signals(vlm, sample)
        assert got.fingerprint == want.fingerprint
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.response_positions, want.response_positions)
        assert (got.vision_start, got.vision_length) == (want.vision_start, want.vision_length)
        for layer in (0, 1):
            np.testing.assert_allclose(got.attention[layer], want.attention[layer], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.vision_features, want.vision_features, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.focus, want.focus, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
        np.testing.assert_allclose(got.topk_logprobs, want.topk_logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got.tail_logmass, want.tail_logmass, atol=1e-4, rtol=0)


def test_quantised_cache_stays_within_the_codecs_error(ray_session, reference_cache, tiny_models, demo_data, tmp_path):
    codecs = CodecSpec(attention="uint8", features="int8", logprobs="fp16", compressor="zstd")
    _run(_args(tiny_models, demo_data, tmp_path / "q", codecs=codecs))
    exact, lossy = CacheReader(reference_cache), CacheReader(tmp_path / "q")
    for key in list(exact.keys())[::5]:
        a, b = exact.get(key), lossy.get(key)
        for layer in (0, 1):
            rowmax = a.attention[layer].max(axis=-1, keepdims=True)
            assert np.all(np.abs(a.attention[layer] - b.attention[layer]) <= rowmax / 255 / 2 + 1e-6)
        absmax = np.abs(a.vision_features).max(axis=-1, keepdims=True)
        assert np.all(np.abs(a.vision_features - b.vision_features) <= absmax / 127 / 2 + 1e-5)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, rtol=1e-3, atol=1e-3)


def test_a_second_run_is_a_no_op(ray_session, reference_cache, tiny_models, demo_data):
    before = {f: f.stat().st_mtime_ns for f in (reference_cache / "shards").rglob("*")}
    summary = _run(_args(tiny_models, demo_data, reference_cache))
    assert summary.shards_written == [] and summary.shards_done_before == 3
    assert {f: f.stat().st_mtime_ns for f in (reference_cache / "shards").rglob("*")} == before


@pytest.mark.fault
def test_resume_after_a_deleted_shard_and_a_partial_one(ray_session, reference_cache, tiny_models, demo_data, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(reference_cache, cache)
    shards = list_complete_shards(cache)
    shutil.rmtree(cache / "shards" / shards[0])
    injected("a finished cache shard deleted")
    partial = cache / "shards" / f".{shards[1]}.tmp-deadbeef"
    shutil.copytree(cache / "shards" / shards[1], partial)  # as if a run died while writing
    injected("a partial shard left by a killed writer")
    summary = _run(_args(tiny_models, demo_data, cache))
    assert summary.shards_written == [shards[0]]
    assert summary.removed_partial and not partial.exists()
    assert _arrays(cache) == _arrays(reference_cache)


@pytest.mark.fault
def test_a_worker_killed_mid_shard_loses_and_duplicates_nothing(ray_session, reference_cache, tiny_models, demo_data,
                                                                tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    victim = list_complete_shards(reference_cache)[1]
    monkeypatch.setenv(KILL_ENV, victim)  # reaches the workers through their runtime_env (faults.worker_env)
    injected("SIGKILL of one Ray worker mid-shard")
    summary = _run(_args(tiny_models, demo_data, cache))
    assert (cache / f".fault-{victim}").exists()  # the worker really died once, mid-shard
    assert sorted(summary.shards_written) == list_complete_shards(reference_cache)
    assert _arrays(cache) == _arrays(reference_cache)
    reader = CacheReader(cache)
    assert len(reader) == len(CacheReader(reference_cache))


@pytest.mark.fault
def test_a_different_teacher_or_config_refuses_to_mix_into_a_cache(ray_session, reference_cache, tiny_models,
                                                                   demo_data, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(reference_cache, cache)
    with pytest.raises(CacheSchemaError, match="teacher"):
        _run(_args(tiny_models, demo_data, cache, teacher="student"))
    with pytest.raises(CacheSchemaError, match="topk"):
        _run(dataclasses.replace(_args(tiny_models, demo_data, cache),
                                 cache=CacheArgs(path=str(cache), layers=[0, 1], topk=4, codecs=LOSSLESS)))


@pytest.mark.parametrize("heads", ["per_head", "mean"])
def test_dry_run_estimate_is_within_ten_percent_of_the_real_size(ray_session, tiny_models, demo_data, tmp_path, heads):
    codecs = CodecSpec(attention="uint8", features="int8", logprobs="fp16", compressor="none")
    # Every sample read: this checks the size model; how many samples a real dry run reads only
    # sets its sampling error (captions and one-word answers differ several-fold in size).
    args = dataclasses.replace(_args(tiny_models, demo_data, tmp_path / "c", codecs=codecs, attention_heads=heads),
                               dry_run_samples=48)
    est = estimate_size(args)
    summary = _run(args)
    assert est["samples"] == summary.samples_written + summary.samples_skipped
    assert abs(est["total"] - summary.bytes_written) <= 0.10 * summary.bytes_written


@pytest.mark.bad_input
def test_pngs_named_jpg_are_decoded_by_content_counted_and_give_the_same_signals(ray_session, reference_cache,
                                                                                 tiny_models, demo_data, tmp_path):
    import tarfile

    data = tmp_path / "train"
    data.mkdir()
    renamed = 0
    for shard in sorted((demo_data / "train").glob("*.tar")):
        with tarfile.open(shard) as src, tarfile.open(data / shard.name, "w", format=tarfile.GNU_FORMAT) as dst:
            for member in src.getmembers():
                body = src.extractfile(member).read()
                if member.name.endswith(".png") and renamed < 3:
                    member.name, renamed = member.name.removesuffix(".png") + ".jpg", renamed + 1
                member.size = len(body)
                dst.addfile(member, io.BytesIO(body))
    tried(3)  # images whose extension names another format
    args = _args(tiny_models, demo_data, tmp_path / "cache")
    args.data.shards = str(data)
    summary = _run(args)
    assert renamed == 3 and summary.images_mislabelled == 3 and summary.samples_skipped == 0
    assert _arrays(tmp_path / "cache") == _arrays(reference_cache)  # the same pixels, the same signals


def test_placeable_workers_counts_what_each_alive_node_holds():
    from alignkd.extract import placeable_workers

    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}},
             {"Alive": True, "Resources": {"CPU": 3.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    assert placeable_workers(nodes, cpus=1, gpus=1) == 2  # the CPU-only node holds no GPU worker
    assert placeable_workers(nodes, cpus=2, gpus=0) == 4 + 1
    assert placeable_workers(nodes, cpus=0.5, gpus=0.5) == 4
    assert placeable_workers(nodes, cpus=9, gpus=0) == 0


@pytest.mark.bad_input
def test_workers_the_cluster_cannot_place_are_refused_in_one_line_or_fewer_are_used(ray_session, reference_cache,
                                                                                  tiny_models, demo_data, tmp_path):
    tried()
    args = _args(tiny_models, demo_data, tmp_path / "none")
    args.ray = RayArgs(num_workers=1, cpus_per_worker=3)  # the session has 2 CPUs
    with pytest.raises(RuntimeError, match=r"cannot place a teacher worker asking for 3 CPU \(its nodes: 2 CPU, 0 GPU\)"):
        _run(args)
    assert not (tmp_path / "none").exists()  # refused before anything was written
    args = _args(tiny_models, demo_data, tmp_path / "two")
    args.ray = RayArgs(num_workers=3, cpus_per_worker=1)
    lines = []
    summary = extract(args, echo=lines.append, progress=False)
    assert [line for line in lines if line.startswith("warning: the Ray cluster holds 2 of the 3 teacher workers")]
    assert len(summary.shards_written) == 3 and _arrays(tmp_path / "two") == _arrays(reference_cache)


@pytest.mark.fault
def test_a_worker_that_dies_on_a_shard_with_no_restart_left_names_the_shard(ray_session, reference_cache, tiny_models,
                                                                             demo_data, tmp_path, monkeypatch):
    victim = list_complete_shards(reference_cache)[0]
    monkeypatch.setenv(KILL_ENV, victim)
    injected("SIGKILL of a Ray worker with no restart left")
    args = _args(tiny_models, demo_data, tmp_path / "cache")
    args.ray = RayArgs(num_workers=1, cpus_per_worker=0.5, max_restarts=0)
    # The worker holds two shards (one computed, one written): both die with it, both are named.
    with pytest.raises(RuntimeError, match=f"shard (\\S+ or )?{victim}( or \\S+)? failed \\(its worker died, "
                                           "restarts used up"):
        _run(args)
    assert victim not in list_complete_shards(tmp_path / "cache")


def test_ray_forward_threads_sets_the_teachers_torch_threads_apart_from_the_cpus_it_reserves(tiny_models, demo_data,
                                                                                           tmp_path):
    from alignkd.extract import TeacherWorker

    threads = torch.get_num_threads()
    try:
        for ray_args, want in [(RayArgs(cpus_per_worker=2), 2), (RayArgs(cpus_per_worker=2, forward_threads=1), 1)]:
            TeacherWorker(dataclasses.replace(_args(tiny_models, demo_data, tmp_path / "c"), ray=ray_args))
            assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")
def test_a_worker_reads_ahead_and_writes_behind_at_a_lower_priority_than_its_forward(tiny_models, demo_data,
                                                                                   tmp_path, monkeypatch):
    import alignkd.cache.writer
    import alignkd.data.batching
    from alignkd.cache.store import init_cache
    from alignkd.extract import TeacherWorker, _cache_meta, plan_shards

    def nice():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen = {}
    write_shard, make_batch = alignkd.cache.writer.write_shard, alignkd.data.batching.make_batch

    def spy(name, f):
        def wrapped(*a, **kw):
            seen[name] = nice()
            return f(*a, **kw)
        return wrapped

    monkeypatch.setattr(alignkd.cache.writer, "write_shard", spy("write", write_shard))
    monkeypatch.setattr(alignkd.data.batching, "make_batch", spy("prefetch", make_batch))
    threads = torch.get_num_threads()
    try:
        args = _args(tiny_models, demo_data, tmp_path / "cache")
        worker = TeacherWorker(args)
        meta = _cache_meta(args, worker.describe())
        init_cache(args.cache.path, meta)
        shard, name = plan_shards(args.data.shards)[0]
        worker.process_shard(shard, name, meta)
    finally:
        torch.set_num_threads(threads)
    assert seen["write"] > nice() and seen["prefetch"] > nice()
    assert name in list_complete_shards(tmp_path / "cache")
