"""Extraction on an existing multi-node Ray cluster: `alignkd extract-teacher --address` joins a
cluster this test starts on loopback (`ray start --head` plus a second node, one CPU each), the
teacher actors land one on each node, and the cache they write to the path both nodes share
equals the one the same worker code writes in-process.

The cluster is this test's own, and so is its teardown, whether the test passed or not: each
`ray start --block` runs in a new session (process group), and the teardown SIGKILLs those
groups and every process below the two `ray start`s by id (Ray's workers start sessions of
their own) -- what `ray stop --force` does, without touching any other Ray on the machine. Skipped, with the reason, where `ray start` cannot bring a
cluster up here.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from alignkd.cache.reader import CacheReader

RAY = Path(sys.executable).parent / "ray"
ALIGNKD = Path(sys.executable).parent / "alignkd"
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ready, what: str, node: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if node.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text()[-1500:] if log.exists() else ""
            pytest.skip(f"ray start could not bring up {what} here: {tail}")
        time.sleep(0.5)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster():
    """A 2-node Ray cluster on loopback, 1 CPU per node; yields its address."""
    if not RAY.is_file():
        pytest.skip(f"no ray command next to {sys.executable}")
    # A short root: Ray's unix socket paths under it must stay below 108 characters.
    temp = Path(tempfile.mkdtemp(prefix="akd-ray-", dir="/tmp"))
    port = _free_port()
    nodes: list[subprocess.Popen] = []

    def start(name: str, *flags: str) -> tuple[subprocess.Popen, Path]:
        # Every per-node port that has a fixed default is given a free one: two nodes share this host.
        log = temp / f"{name}.log"
        node = subprocess.Popen(
            [str(RAY), "start", "--block", "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp}",
             f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}", *flags],
            env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        nodes.append(node)
        return node, log

    try:
        head, log = start("head", "--head", f"--port={port}", "--include-dashboard=false")
        _wait(lambda: _port_open(port), "the head node", head, log)
        second, log = start("second", f"--address=127.0.0.1:{port}")
        _wait(lambda: _alive_nodes(port) == 2, "the second node", second, log)
        yield f"127.0.0.1:{port}"
    finally:
        started = [pid for node in nodes for pid in _descendants(node.pid)]  # before any is re-parented
        for node in nodes:
            try:
                os.killpg(node.pid, signal.SIGKILL)  # the `ray start`, GCS, raylet, agents
            except ProcessLookupError:
                pass
        for pid in started:  # workers, in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for node in nodes:
            node.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    """Every process below pid, from /proc (Linux; elsewhere only the process groups are killed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def _alive_nodes(port: int) -> int:
    """Nodes the cluster's GCS counts alive, asked from a separate driver process."""
    code = f"import ray; ray.init(address='127.0.0.1:{port}', log_to_driver=False); " \
           "print(sum(n['Alive'] for n in ray.nodes()))"
    done = subprocess.run([sys.executable, "-c", code], env=ENV, check=False, capture_output=True, text=True, timeout=60)
    return int(done.stdout.split()[-1]) if done.returncode == 0 and done.stdout.split() else 0


def _teacher_actors(address: str) -> list[dict]:
    """The cluster's TeacherWorker actors, finished ones included, from the GCS actor table."""
    code = f"import json, ray; ray.init(address='{address}', log_to_driver=False); " \
           "print(json.dumps([{k: a[k] for k in ('Address', 'State', 'NumRestarts', 'Pid')} " \
           "for a in ray._private.state.actors().values() if a['ActorClassName'] == 'TeacherWorker']))"
    done = subprocess.run([sys.executable, "-c", code], env=ENV, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_extraction_on_a_two_node_cluster_spreads_the_actors_and_writes_the_local_cache(
        cluster, tiny_models, demo_data, tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    # The settings of conftest.build_cache (the in-process reference), on the cluster: 2 actors
    # of 1 CPU each on nodes of 1 CPU each, so Ray must place one on each node.
    overrides = {
        "teacher.path": str(tiny_models["mobilevlm"]["teacher"]), "teacher.device": "cpu",
        "data.shards": str(demo_data / "train"), "data.template": "v1", "data.max_length": 256,
        "data.batch_size": 8, "cache.path": str(cache), "cache.layers": [0], "cache.topk": 8,
        "cache.attention_heads": "per_head", "cache.codecs.attention": "fp32", "cache.codecs.features": "fp32",
        "cache.codecs.logprobs": "fp32", "ray.num_workers": 2, "ray.cpus_per_worker": 1.0,
    }
    command = [str(ALIGNKD), "extract-teacher", "--address", cluster, "--no-progress"]
    command += [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    done = subprocess.run(command, env=ENV, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "wrote 3 shards" in done.stdout

    # Both nodes worked: the two actors ran on two different nodes. The driver hands the first
    # two of the 3 shards to the two idle actors at once, so each wrote at least one shard.
    # (The shard metadata does not record which worker or node wrote a shard.)
    actors = _teacher_actors(cluster)
    assert len(actors) == 2, actors
    assert len({a["Address"]["NodeID"] for a in actors}) == 2
    assert all(a["NumRestarts"] == 0 for a in actors)

    # The cache equals the in-process one: the same samples, every array equal.
    got, want = CacheReader(cache), CacheReader(tiny_cache)
    assert sorted(got.keys()) == sorted(want.keys()) and len(got) == 48
    assert got.meta.teacher == want.meta.teacher and got.meta.codecs == want.meta.codecs
    for key in want.keys():
        a, b = got.get(key), want.get(key)
        assert a.fingerprint == b.fingerprint
        for name in ("input_ids", "response_positions", "vision_features", "focus", "topk_ids", "topk_logprobs",
                     "tail_logmass"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"{key} {name}")
        assert a.attention.keys() == b.attention.keys()
        for layer in a.attention:
            np.testing.assert_array_equal(a.attention[layer], b.attention[layer], err_msg=f"{key} attention")
