"""A cache at an fsspec URL: the same layout as on disk, a shard complete only once its marker
is written, partial uploads never read and removed on the next run, damage found in objects.

`memory://` stands in for object storage in-process (writer, reader, verify); Ray workers are
other processes, so extraction and training go through a `file://` URL, which takes the same
code path (no rename, marker last) on a local folder. No test here reaches a real bucket.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from test_writer_reader import LOSSLESS, make_meta, make_samples

from alignkd.cache import remote
from alignkd.cache.reader import CacheReader
from alignkd.cache.verify import verify_cache
from alignkd.cache.store import init_cache, list_complete_shards, read_cache_meta, read_shard_meta, remove_partial, remove_partial_shard
from alignkd.cache.writer import write_shard
from alignkd.cache_schemas import CacheSchemaError, CodecSpec
from reliability_report import injected

# No compressor: nothing but the file list stands between an altered byte and a wrong value.
PLAIN = CodecSpec(attention="fp32", features="fp32", logprobs="fp32", compressor="none")


@pytest.fixture
def url():
    """A fresh memory:// cache location, emptied afterwards (memory:// is one per process)."""
    top = uuid.uuid4().hex
    yield f"memory://{top}/cache"
    MemoryFileSystem().rm(f"/{top}", recursive=True)


def _objects(url: str) -> dict[str, bytes]:
    fs, root = remote.filesystem(url)
    return {rel: fs.cat_file(f"{root}/{rel}") for rel in remote.list_files(fs, root)}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write(root, meta, sizes, seed=0, **kw):
    """One shard per entry of `sizes`, as test_writer_reader.make_cache writes them."""
    rng = np.random.default_rng(seed)
    written = {}
    for j, n in enumerate(sizes):
        samples = make_samples(rng, meta, n, prefix=f"s{j}-")
        write_shard(root, f"shard-{j:02d}", samples, [(f"s{j}-bad", "image does not decode")], meta=meta,
                    input_shard=f"/data/shard-{j:02d}.tar", input_size=1000 + j, **kw)
        written.update({s.key: s for s in samples})
    return written


def _assert_same_sample(got, want):
    assert got.key == want.key and got.fingerprint == want.fingerprint
    assert (got.vision_start, got.vision_length) == (want.vision_start, want.vision_length)
    for field in ("input_ids", "response_positions", "topk_ids", "topk_logprobs", "tail_logmass",
                  "vision_features", "focus"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=f"{got.key} {field}")
    assert sorted(got.attention) == sorted(want.attention)
    for layer in want.attention:
        np.testing.assert_array_equal(got.attention[layer], want.attention[layer], err_msg=f"{got.key} L{layer}")


# ---------------------------------------------------------------------------- in-process, memory://


def test_a_cache_at_a_url_holds_exactly_the_objects_a_local_cache_holds_as_files(url, tmp_path):
    meta = make_meta(codecs=LOSSLESS)
    init_cache(url, meta)
    init_cache(tmp_path / "local", meta)
    written = _write(url, meta, sizes=(5, 4, 0))
    _write(tmp_path / "local", meta, sizes=(5, 4, 0))
    # The local writer is the reference: object for file, byte for byte (so a bucket copied to
    # a disk, or back, is a valid cache).
    assert _objects(url) == _files(tmp_path / "local")
    assert list_complete_shards(url) == ["shard-00", "shard-01", "shard-02"]
    assert read_shard_meta(url, "shard-01") == read_shard_meta(tmp_path / "local", "shard-01")
    assert read_cache_meta(url) == read_cache_meta(tmp_path / "local")

    reader = CacheReader(url)
    assert reader.keys() == CacheReader(tmp_path / "local").keys()
    for key, want in written.items():
        _assert_same_sample(reader.get(key), want)
    assert reader.fingerprint() == CacheReader(tmp_path / "local").fingerprint()
    assert reader.skipped() == CacheReader(tmp_path / "local").skipped()
    report = verify_cache(url)
    assert report.ok and report.shards == 3 and not report.partial
    assert (report.files, report.bytes) == (verify_cache(tmp_path / "local").files,
                                            verify_cache(tmp_path / "local").bytes)


def test_a_shard_for_a_url_is_built_in_the_scratch_folder_and_nothing_is_left_there(url, tmp_path):
    meta = make_meta(codecs=LOSSLESS)
    init_cache(url, meta)
    scratch = tmp_path / "scratch" / "not-made-yet"
    seen = []
    _write(url, meta, sizes=(2,), scratch=scratch,
           after_array=lambda _: seen.append([p.name for p in scratch.iterdir()]))
    assert seen and all(len(names) == 1 and names[0].startswith("alignkd-shard-") for names in seen)
    assert list(scratch.iterdir()) == []
    assert list_complete_shards(url) == ["shard-00"] and verify_cache(url).ok


@pytest.mark.fault
@pytest.mark.parametrize("when", ["after every file", "half way through the files"])
def test_an_upload_cut_before_the_marker_leaves_a_partial_shard_that_the_next_run_removes(url, when, monkeypatch):
    meta = make_meta(codecs=LOSSLESS)
    init_cache(url, meta)
    _write(url, meta, sizes=(3,))
    rng = np.random.default_rng(1)
    samples = make_samples(rng, meta, 4, prefix="v-")

    def died():
        raise OSError("connection reset (injected)")

    kw = {}
    if when == "after every file":
        kw["before_publish"] = died
        injected("upload cut after the files, before the marker")
    else:
        put = MemoryFileSystem.put

        def half(self, lpaths, rpaths, **k):
            put(self, lpaths[: len(lpaths) // 2], rpaths[: len(rpaths) // 2], **k)
            died()

        monkeypatch.setattr(MemoryFileSystem, "put", half)
        injected("upload cut half way through a shard's files")
    with pytest.raises(OSError, match="injected"):
        write_shard(url, "victim", samples, [], meta=meta, input_shard="/data/victim.tar", input_size=1, **kw)
    monkeypatch.undo()

    objects = [rel for rel in _objects(url) if rel.startswith("shards/victim/")]
    assert objects and "shards/victim/zarr.json" not in objects  # uploaded, never published
    # Not a shard to anyone: not listed, not read, not damage (verify calls it partial).
    assert list_complete_shards(url) == ["shard-00"]
    reader = CacheReader(url)
    assert reader.shards == ["shard-00"] and not any(k.startswith("v-") for k in reader.keys())
    with pytest.raises(CacheSchemaError, match="no such complete shard"):
        read_shard_meta(url, "victim")
    report = verify_cache(url)
    assert report.ok and report.partial == ["victim"]

    # The next run's job start removes it; what was complete stays untouched.
    before = {k: v for k, v in _objects(url).items() if k.startswith("shards/shard-00/")}
    assert remove_partial(url) == ["victim"]
    assert not any(rel.startswith("shards/victim/") for rel in _objects(url))
    assert {k: v for k, v in _objects(url).items() if k.startswith("shards/shard-00/")} == before
    assert remove_partial(url) == []
    write_shard(url, "victim", samples, [], meta=meta, input_shard="/data/victim.tar", input_size=1)
    reader = CacheReader(url)
    assert reader.shards == ["shard-00", "victim"]
    for s in samples:
        _assert_same_sample(reader.get(s.key), s)
    assert verify_cache(url).ok


@pytest.mark.fault
def test_a_retried_shard_removes_only_its_own_leftovers(url):
    meta = make_meta(codecs=LOSSLESS)
    init_cache(url, meta)
    _write(url, meta, sizes=(2, 2))
    samples = make_samples(np.random.default_rng(2), meta, 3, prefix="r-")

    def died():
        raise OSError("worker lost (injected)")

    injected("upload cut after the files, before the marker")
    with pytest.raises(OSError):
        write_shard(url, "retried", samples, [], meta=meta, input_shard="/d/r.tar", input_size=1, before_publish=died)
    assert remove_partial_shard(url, "shard-00") == []  # complete: not touched
    assert remove_partial_shard(url, "retried") == ["retried"]
    assert remove_partial_shard(url, "retried") == []
    assert list_complete_shards(url) == ["shard-00", "shard-01"] and verify_cache(url).ok


@pytest.mark.fault
def test_rewriting_a_shard_unpublishes_the_old_one_first_and_leaves_no_stale_object(url):
    meta = make_meta(codecs=LOSSLESS)
    init_cache(url, meta)
    old = make_samples(np.random.default_rng(3), meta, 6, prefix="o-")
    new = make_samples(np.random.default_rng(4), meta, 2, prefix="n-")
    write_shard(url, "s", old, [], meta=meta, input_shard="/d/s.tar", input_size=1)

    def died():
        raise OSError("injected")

    injected("rewrite of a complete shard cut before its marker")
    with pytest.raises(OSError):
        write_shard(url, "s", new, [], meta=meta, input_shard="/d/s.tar", input_size=1, before_publish=died)
    # Never a mix of old and new: the old version stopped being a shard before any object changed.
    assert list_complete_shards(url) == []
    write_shard(url, "s", new, [], meta=meta, input_shard="/d/s.tar", input_size=1)
    shard = read_shard_meta(url, "s")
    assert set(_objects(url)) == {"zarr.json", "shards/zarr.json", "shards/s/zarr.json",
                                  *(f"shards/s/{rel}" for rel in shard.files)}
    assert CacheReader(url).keys() == [s.key for s in new] and verify_cache(url).ok


@pytest.mark.fault
def test_damaged_objects_are_named_by_verify_and_refused_by_the_reader(url):
    meta = make_meta(codecs=PLAIN)
    init_cache(url, meta)
    written = _write(url, meta, sizes=(3, 3, 3, 3))
    fs, root = remote.filesystem(url)

    def chunk(shard, array):
        return f"{root}/shards/{shard}/" + sorted(r for r in remote.list_files(fs, f"{root}/shards/{shard}")
                                                 if r.startswith(f"{array}/c/"))[0]

    altered = chunk("shard-00", "vision_features")
    data = bytearray(fs.cat_file(altered))
    data[len(data) // 2] ^= 0x40  # one bit of one float: same size, another value
    fs.pipe_file(altered, bytes(data))
    injected("altered object (same size)")
    fs.pipe_file(chunk("shard-01", "attn_L00"), b"short")
    injected("truncated object")
    fs.rm_file(chunk("shard-02", "input_ids"))
    injected("deleted object")
    fs.pipe_file(f"{root}/shards/shard-03/stray", b"x")
    injected("stray object")

    quick, full = verify_cache(url, hashes=False), verify_cache(url)
    assert sorted(full.damaged) == ["shard-00", "shard-01", "shard-02", "shard-03"]
    assert "has changed" in full.damaged["shard-00"][0] and "shard-00" not in quick.damaged  # only a hash sees it
    assert "5 bytes" in full.damaged["shard-01"][0]
    assert "is missing" in full.damaged["shard-02"][0]
    assert "not in the shard's file list" in full.damaged["shard-03"][0]

    # The reader: the altered chunk is caught as it is downloaded, before any value is returned.
    reader = CacheReader(url)
    with pytest.raises(CacheSchemaError, match="shard-00 is damaged: file vision_features/c/.* has changed"):
        for key in sorted(written):
            if key.startswith("s0-"):
                reader.get(key)
    with pytest.raises(CacheSchemaError, match="shard-02 is damaged: file input_ids/c/.* is missing"):
        reader.get("s2-000")


@pytest.mark.fault
def test_a_cache_root_is_made_marker_last_and_a_half_made_one_is_finished(url):
    meta = make_meta()
    fs, root = remote.filesystem(url)
    with pytest.raises(CacheSchemaError, match="not an alignkd cache"):
        read_cache_meta(url)
    fs.pipe_file(f"{root}/shards/zarr.json", b'{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    injected("cache creation cut before the root's marker")
    with pytest.raises(CacheSchemaError, match="not an alignkd cache"):
        CacheReader(url)
    init_cache(url, meta)
    assert read_cache_meta(url) == meta and list_complete_shards(url) == []
    with pytest.raises(CacheSchemaError, match="topk"):
        init_cache(url, dataclasses.replace(meta, topk=4))  # refuses to mix, as on disk

    other = url.replace("/cache", "/other")
    fs.pipe_file(f"{remote.filesystem(other)[1]}/data.csv", b"1,2")
    with pytest.raises(CacheSchemaError, match="is not an alignkd cache; refusing"):
        init_cache(other, meta)


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_a_url_whose_client_is_not_installed_is_one_line_naming_the_extra():
    from alignkd.config import ConfigError, check_input_paths
    from alignkd.train import TrainArgs

    with pytest.raises(ValueError, match=r"^s3://bucket/cache: s3:// needs s3fs: pip install 'alignkd\[s3\]'$"):
        CacheReader("s3://bucket/cache")
    with pytest.raises(ValueError, match=r"pip install 'alignkd\[s3\]'"):
        init_cache("s3://bucket/cache", make_meta())
    with pytest.raises(ConfigError, match=r"^cache: s3://bucket/cache: s3:// needs s3fs"):
        check_input_paths(TrainArgs(cache="s3://bucket/cache"))
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(ValueError, match=r"pip install 'alignkd\[gcs\]'"):
            verify_cache("gs://bucket/cache")


# ---------------------------------------------------------------------------- Ray workers, file://


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _extract_args(tiny_models, demo_data, cache: str, **ray):
    """conftest.build_cache's settings (so the result must equal `tiny_cache`), on Ray."""
    from alignkd.data import DataArgs
    from alignkd.extract import CacheArgs, ExtractArgs, RayArgs
    from alignkd.models import ModelArgs

    return ExtractArgs(
        teacher=ModelArgs(path=str(tiny_models["mobilevlm"]["teacher"]), device="cpu"),
        data=DataArgs(shards=str(demo_data / "train"), template="v1", max_length=256, batch_size=8),
        cache=CacheArgs(path=cache, layers=[0], topk=8, codecs=CodecSpec(attention="fp32", features="fp32",
                                                                          logprobs="fp32")),
        ray=RayArgs(num_workers=1, cpus_per_worker=2, **ray),
    )


def _extract(args):
    from alignkd.extract import extract

    return extract(args, echo=lambda _: None, progress=False)


@pytest.fixture(scope="module")
def url_cache(ray_session, tiny_models, demo_data, tmp_path_factory):
    """The tiny teacher's cache extracted by a Ray worker to a file:// URL."""
    url = f"file://{tmp_path_factory.mktemp('url-cache')}/cache"
    summary = _extract(_extract_args(tiny_models, demo_data, url))
    assert summary.shards_total == 3 and len(summary.shards_written) == 3 and summary.cache == url
    return url


def test_extraction_to_a_url_equals_the_local_cache_sample_by_sample(url_cache, tiny_cache):
    here, there = CacheReader(url_cache), CacheReader(tiny_cache)
    assert here.shards == there.shards and here.keys() == there.keys()
    assert here.skipped() == there.skipped()
    for key in there.keys():
        _assert_same_sample(here.get(key), there.get(key))
    for name in there.shards:  # the same file list: names, sizes and hashes of every chunk
        assert here.shard_meta(name).files == there.shard_meta(name).files
    assert verify_cache(url_cache).ok
    assert verify_cache(url_cache.removeprefix("file://")).ok  # and the folder is a local cache as it is


def test_a_second_run_at_a_url_is_a_no_op(url_cache, tiny_models, demo_data):
    before = _objects(url_cache)
    summary = _extract(_extract_args(tiny_models, demo_data, url_cache))
    assert summary.shards_written == [] and summary.shards_done_before == 3 and summary.removed_partial == []
    assert _objects(url_cache) == before


def test_train_student_reads_a_cache_at_a_url_as_it_reads_the_folder(url_cache, tiny_cache, tiny_models, demo_data,
                                                                     tmp_path):
    import json

    from alignkd.config import check_input_paths
    from alignkd.data import DataArgs
    from alignkd.models import ModelArgs
    from alignkd.train import LossArgs, OptimArgs, RunArgs, TrainArgs, train

    def run(cache, run_dir):
        args = TrainArgs(
            student=ModelArgs(path=str(tiny_models["mobilevlm"]["student"]), device="cpu"),
            data=DataArgs(shards=str(demo_data / "train"), template="v1", max_length=256, batch_size=4),
            cache=cache,
            optim=OptimArgs(lr=1e-3, projector_lr=1e-3, adapter_lr=1e-2, grad_accum=2),
            loss=LossArgs(focus_k=4),
            run=RunArgs(dir=str(run_dir), max_steps=6, stop_after=3, num_workers=2),  # forked loader workers
        )
        check_input_paths(args)
        result = train(args, echo=lambda _: None, progress=False)
        assert result.steps == 3
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    at_url, in_folder = run(url_cache, tmp_path / "url"), run(str(tiny_cache), tmp_path / "folder")
    assert [r["step"] for r in at_url] == [0, 1, 2, 3]  # 0: the diagnostics before training
    assert [r.get("total") for r in at_url] == [r.get("total") for r in in_folder]
    assert json.loads((tmp_path / "url" / "cache.json").read_text())["path"] == url_cache


def test_extraction_refuses_a_memory_url_that_its_workers_cannot_see(tiny_models, demo_data):
    with pytest.raises(ValueError, match="memory:// lives in one process"):
        _extract(_extract_args(tiny_models, demo_data, "memory://cache"))


@pytest.mark.fault
def test_a_worker_killed_between_upload_and_marker_leaves_a_partial_shard_that_the_rerun_redoes(
        url_cache, tiny_models, demo_data, tmp_path, monkeypatch):
    from alignkd.faults import PUBLISH_ENV

    url = f"file://{tmp_path}/cache"
    victim = list_complete_shards(url_cache)[1]
    monkeypatch.setenv(PUBLISH_ENV, victim)  # reaches the workers through their runtime_env (faults.worker_env)
    injected("SIGKILL of a Ray worker between a shard's upload and its marker")
    with pytest.raises(RuntimeError, match=f"shard (\\S+ or )?{victim}( or \\S+)? failed"):  # and its other shard
        _extract(_extract_args(tiny_models, demo_data, url, max_restarts=0))  # no retry: the job stops
    assert (tmp_path / "cache" / f".fault-{victim}").exists()  # it really died, at that point

    # Every file of the shard is there, and still it is not a shard.
    uploaded = {rel.split("/", 2)[2] for rel in _objects(url) if rel.startswith(f"shards/{victim}/")}
    assert uploaded == set(read_shard_meta(url_cache, victim).files)
    assert victim not in list_complete_shards(url) and victim not in CacheReader(url).shards
    assert verify_cache(url).partial == [victim]
    # The worker holds two shards at once, so whether shard 0 finished before the kill depends on
    # timing; whatever was complete then must be kept, untouched, by the rerun.
    kept = list_complete_shards(url)

    summary = _extract(_extract_args(tiny_models, demo_data, url))
    assert summary.removed_partial == [victim] and victim in summary.shards_written
    assert summary.shards_done_before == len(kept) and not set(kept) & set(summary.shards_written)
    ours = {k: v for k, v in _objects(url).items() if k.startswith("shards/")}
    theirs = {k: v for k, v in _objects(url_cache).items() if k.startswith("shards/")}
    assert ours == theirs  # byte for byte what the uninterrupted run wrote
    shutil.rmtree(tmp_path / "cache")
