"""Faults injected for real into the two stages, on tiny models, CPU, local Ray: whatever
happens, the cache and the run end up as an uninterrupted job would leave them, or the job
stops with a one-line error and nothing half-written is ever taken as done.

  * `extract-teacher` SIGKILLed (`kill -9` of the command; its local Ray goes with it) while a
    shard is half on disk, then the same command again;
  * a full disk (ENOSPC) while a shard is written, in a Ray job; a permission error (EACCES)
    while a shard is written and while it is published (rename); then the job again;
  * `train-student` SIGKILLed at a random step, then the same command again;
  * training against a cache with a truncated, an altered or a lost file.

Killed processes are found again by a marker in their environment and SIGKILLed by pid, so no
Ray process of a killed run outlives its test.

    pytest tests/test_faults.py        # about a minute on 2 cores
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from alignkd.cache import writer
from alignkd.cache.reader import CacheReader
from alignkd.cache.store import init_cache, list_complete_shards, read_cache_meta, read_shard_meta
from alignkd.cli import main
from alignkd.config import load_job
from alignkd.extract import ExtractArgs, TeacherWorker, _cache_meta, plan_shards
from alignkd.faults import WRITE_ENV
from reliability_report import injected

CLI = [sys.executable, "-c", "from alignkd.cli import main; main()"]
_MARK = "ALIGNKD_TEST_PROCESS"
needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").is_file(),
                                reason="finds the processes of a killed run through /proc")


# ---------------------------------------------------------------------------- processes


def _spawn(argv: list[str], log: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """Start the alignkd command line; the marker in its environment is inherited by every
    process it starts (Ray's included), which is how _kill_all finds them."""
    marker = uuid.uuid4().hex
    full_env = {**os.environ, _MARK: marker, "OMP_NUM_THREADS": "2", **env}
    with open(log, "wb") as out:
        proc = subprocess.Popen([*CLI, *argv], env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, marker


def _marked(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if f"{_MARK}={marker}".encode() in Path(f"/proc/{entry}/environ").read_bytes():
                    pids.append(int(entry))
            except OSError:  # gone meanwhile, or not ours to read
                pass
    return pids


def _kill_all(marker: str, timeout: float = 60) -> None:
    """SIGKILL every process carrying `marker`, by pid, until none is left."""
    deadline = time.monotonic() + timeout
    while pids := _marked(marker):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} of a killed run survive")
        time.sleep(0.1)


def _wait_for(done: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (status {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)


# ---------------------------------------------------------------------------- extraction


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Three input shards of four samples."""
    from alignkd.data.synthetic import make_demo_data

    root = tmp_path_factory.mktemp("fault-data")
    make_demo_data(root, seed=1, n_train=12, n_val=4, n_test=4, samples_per_shard=4)
    return root / "train"


def _extract_job(path: Path, tiny_models, data: Path, cache: Path) -> Path:
    """One Ray worker, so shards go in order: shard-000001 starts after shard-000000 is done."""
    path.write_text(f"""
[teacher]
path = "{tiny_models['mobilevlm']['teacher']}"
device = "cpu"
[data]
shards = "{data}"
template = "v1"
max_length = 256
batch_size = 4
[cache]
path = "{cache}"
layers = [0]
topk = 8
[ray]
num_workers = 1
cpus_per_worker = 1.0
num_cpus = 2
""")
    return path


@pytest.fixture(scope="module")
def reference_cache(tiny_models, small_data, tmp_path_factory):
    """The job run uninterrupted, by the worker code in this process (the same thread count
    as a Ray worker's: one)."""
    root = tmp_path_factory.mktemp("fault-reference")
    args = load_job(ExtractArgs, _extract_job(root / "job.toml", tiny_models, small_data, root / "cache"))
    threads = torch.get_num_threads()
    try:
        worker = TeacherWorker(args)
        meta = _cache_meta(args, worker.describe())
        init_cache(root / "cache", meta)
        for shard, name in plan_shards(args.data.shards):
            worker.process_shard(shard, name, meta)
    finally:
        torch.set_num_threads(threads)
    return root / "cache"


def _assert_same_cache(cache: Path, reference: Path) -> None:
    """Same settings, same shards with the same metadata (keys, fingerprints, skipped samples,
    codec errors, and the size and sha256 of every file), and every sample's signals equal."""
    assert read_cache_meta(cache).differences(read_cache_meta(reference)) == []
    assert list_complete_shards(cache) == list_complete_shards(reference)
    assert sorted(p.name for p in (cache / "shards").iterdir()) == sorted(p.name for p in (reference / "shards").iterdir())
    for name in list_complete_shards(reference):
        assert read_shard_meta(cache, name) == read_shard_meta(reference, name)
    got, want = CacheReader(cache), CacheReader(reference)
    assert got.keys() == want.keys()
    for key in want:
        a, b = got.get(key), want.get(key)
        for field in dataclasses.fields(b):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if isinstance(y, dict):
                assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in y), (key, field.name)
            else:
                assert np.array_equal(x, y), (key, field.name)


def _extract(job: Path) -> str:
    result = CliRunner().invoke(main, ["extract-teacher", "--job", str(job), "--no-progress"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.fault
@needs_proc
def test_a_full_disk_then_a_sigkill_of_the_whole_extract_job_then_a_rerun_give_the_uninterrupted_cache(
        tiny_models, small_data, reference_cache, tmp_path, monkeypatch):
    """Three runs of one job (one Ray worker: shards in order). 1: the disk fills up while
    shard-000001 is written: the job stops with a one-line error, no half shard left. 2: the
    same command redoes shard-000001, and is SIGKILLed, whole, while shard-000002 is half on
    disk. 3: the same command removes that half shard and finishes: the uninterrupted cache."""
    cache = tmp_path / "cache"
    job = _extract_job(tmp_path / "job.toml", tiny_models, small_data, cache)
    shards = cache / "shards"

    # 1. ENOSPC, set before the job starts its local Ray, whose workers inherit it
    monkeypatch.setenv(WRITE_ENV, "shard-000001:enospc")
    injected("disk full (ENOSPC) while a shard is written")
    result = CliRunner().invoke(main, ["extract-teacher", "--job", str(job), "--no-progress"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "shard shard-000001 failed" in errors[0] and "No space left on device" in errors[0]
    assert sorted(p.name for p in shards.iterdir()) == ["shard-000000", "zarr.json"]  # no half shard
    monkeypatch.delenv(WRITE_ENV)

    # 2. the worker stalls once shard-000002's first arrays are on disk; then kill -9 the command
    log = tmp_path / "killed.log"
    proc, marker = _spawn(["extract-teacher", "--job", str(job), "--no-progress"], log,
                          **{WRITE_ENV: "shard-000002:stall"})

    def half_written() -> list[Path]:
        return [p for p in shards.iterdir() if p.name.startswith(".shard-000002.tmp-")]

    try:
        _wait_for(lambda: list_complete_shards(cache) == ["shard-000000", "shard-000001"] and half_written()
                  and len(list(half_written()[0].iterdir())) >= 3, proc, log, "a half-written shard-000002")
        os.kill(proc.pid, signal.SIGKILL)  # the alignkd process itself, as `kill -9` or an OOM kill would
        injected("SIGKILL of the whole extract-teacher process mid-write")
        proc.wait(timeout=60)
    finally:
        _kill_all(marker)  # its Ray processes die with it (fate sharing); make sure of it
    assert proc.returncode == -signal.SIGKILL
    # The half shard is never read. Whether it is still on disk depends on timing: a worker torn
    # down after its driver died may get to remove its own temporary folder first (seen on a
    # loaded machine), otherwise the rerun removes it.
    left_behind = len(half_written())
    assert CacheReader(cache).shards == ["shard-000000", "shard-000001"]

    # 3. the same command again
    output = _extract(job)
    assert "wrote 1 shards (2 already done)" in output
    assert ("removed 1 partial shard" in output) == (left_behind == 1)
    _assert_same_cache(cache, reference_cache)


@pytest.mark.fault
@pytest.mark.parametrize("when", ["while writing", "while publishing"])
def test_a_permission_error_while_a_shard_is_written_leaves_no_half_shard_and_a_retry_completes_it(
        tiny_models, small_data, reference_cache, tmp_path, monkeypatch, when):
    """The worker code in this process: EACCES after the shard's first arrays, or on the
    rename that publishes it (both injected: the tests run as root, which no mode bit stops)."""
    args = load_job(ExtractArgs, _extract_job(tmp_path / "job.toml", tiny_models, small_data, tmp_path / "cache"))
    threads = torch.get_num_threads()
    try:
        worker = TeacherWorker(args)
        meta = _cache_meta(args, worker.describe())
        init_cache(tmp_path / "cache", meta)
        plan = plan_shards(args.data.shards)
        worker.process_shard(*plan[0], meta)
        if when == "while writing":
            monkeypatch.setenv(WRITE_ENV, "shard-000001:eacces")
        else:
            rename = os.rename

            def refuse(src, dst):
                if Path(dst).name == "shard-000001":
                    raise PermissionError(errno.EACCES, "Permission denied (injected)", str(dst))
                return rename(src, dst)

            monkeypatch.setattr(writer.os, "rename", refuse)
        injected(f"permission denied (EACCES) {when} a shard")
        with pytest.raises(PermissionError if when == "while publishing" else OSError, match="ermission denied"):
            worker.process_shard(*plan[1], meta)
        assert sorted(p.name for p in (tmp_path / "cache" / "shards").iterdir()) == ["shard-000000", "zarr.json"]
        monkeypatch.undo()
        for shard, name in plan[1:]:
            worker.process_shard(shard, name, meta)
    finally:
        torch.set_num_threads(threads)
    _assert_same_cache(tmp_path / "cache", reference_cache)


# ---------------------------------------------------------------------------- training


def _train_job(path: Path, tiny_models, demo_data, cache) -> Path:
    path.write_text(f"""
cache = "{cache}"
[student]
path = "{tiny_models['mobilevlm']['student']}"
device = "cpu"
[data]
shards = "{demo_data / 'train'}"
template = "v1"
max_length = 256
batch_size = 4
[optim]
lr = 1e-3
projector_lr = 1e-3
adapter_lr = 1e-2
[loss]
focus_k = 4
[run]
max_steps = 8
save_every = 2
keep_last = 2
log_every = 1
""")
    return path


def _train(job: Path, run_dir: Path) -> str:
    result = CliRunner().invoke(main, ["train-student", "--job", str(job), "--set", f"run.dir={run_dir}",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    return result.output


def _steps_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


@pytest.mark.fault
@needs_proc
def test_killing_train_student_at_a_random_step_then_rerunning_gives_the_uninterrupted_weights(
        tiny_models, demo_data, tiny_cache, tmp_path):
    job = _train_job(tmp_path / "job.toml", tiny_models, demo_data, tiny_cache)
    _train(job, tmp_path / "straight")

    kill_at = random.SystemRandom().randint(1, 4)  # of 8 steps, checkpoints every 2: room to kill before the end
    run_dir, log = tmp_path / "killed", tmp_path / "killed.log"
    proc, marker = _spawn(["train-student", "--job", str(job), "--set", f"run.dir={run_dir}", "--no-progress"], log)
    try:
        _wait_for(lambda: _steps_logged(run_dir) >= kill_at, proc, log, f"step {kill_at}")
        os.kill(proc.pid, signal.SIGKILL)
        injected("SIGKILL of train-student at a random step")
        proc.wait(timeout=60)
    finally:
        _kill_all(marker)
    killed_after = _steps_logged(run_dir)
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself before the kill at step {kill_at}"
    assert not (run_dir / "final.json").exists()

    assert "finished at step 8" in _train(job, run_dir)  # the same command again
    straight = load_file(str(tmp_path / "straight" / "export" / "model.safetensors"))
    resumed = load_file(str(run_dir / "export" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, f"killed after step {killed_after}: {len(different)} tensors differ, e.g. {different[0]}"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    # every step once (0: the diagnostics before training), those after the checkpoint redone
    assert [r["step"] for r in logged] == list(range(0, 9))
    assert [r.get("total") for r in logged] == [r.get("total") for r in reference]


def _damage(cache: Path, how: str) -> None:
    shard = cache / "shards" / list_complete_shards(cache)[1]
    chunk = sorted(p for p in (shard / "attn_L00" / "c").rglob("*") if p.is_file())[0]
    if how == "truncated chunk file":
        chunk.write_bytes(chunk.read_bytes()[:-10])
    elif how == "altered chunk file (same size)":
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x01
        chunk.write_bytes(bytes(data))
    elif how == "deleted shard attributes":
        (shard / "zarr.json").unlink()
    injected(how)


@pytest.mark.fault
@pytest.mark.parametrize("how, error", [
    ("truncated chunk file", "damaged shard shard-000001: file attn_L00/c/0 is"),
    ("altered chunk file (same size)", "shard-000001 is damaged: file attn_L00/c/0 has changed"),
    ("deleted shard attributes", "damaged shard shard-000001: zarr.json is missing"),
])
def test_training_refuses_a_damaged_cache_before_its_first_step(tiny_models, demo_data, tiny_cache, tmp_path,
                                                                how, error):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    _damage(cache, how)
    job = _train_job(tmp_path / "job.toml", tiny_models, demo_data, cache)
    result = CliRunner().invoke(main, ["train-student", "--job", str(job), "--set", f"run.dir={tmp_path / 'run'}",
                                       "--no-progress"])
    assert result.exit_code == 2, result.output
    assert error in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
