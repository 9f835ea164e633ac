"""Stage 1, `alignkd extract-teacher`: run the teacher once over webdataset shards and write
its Align-KD signals to a versioned Zarr cache, one cache shard per input shard.

    alignkd extract-teacher --job jobs/demo/extract.toml
    alignkd extract-teacher --job jobs/mobilevlm_v2/extract_finetune.toml --address auto

Read top to bottom:
  1. plan      input shards -> cache shard names (one each; the unit of work and of resume);
  2. workers   Ray actors each load the teacher once (a GPU each where there are GPUs,
               fractional CPUs otherwise); the first describes it, and the cache's root
               metadata is created or, if the cache exists, must match (no mixing);
  3. resume    leftover temporary shards are removed, finished shards are skipped;
  4. run       each remaining shard goes to an idle worker, which batches, runs the tapped
               forward (fused attention), and writes the shard under a temporary name,
               renamed only when complete (for a cache at a URL: built in local scratch space,
               uploaded, and marked complete last, alignkd.cache.remote). A worker that dies
               is restarted by Ray and its shard redone from scratch, so nothing is lost or
               duplicated;
  5. summary   shards, samples, skipped samples (with reasons, per shard), bytes, time.

`cache.path` is a folder every node can reach, or an fsspec URL of object storage
(`s3://bucket/caches/x` with `pip install 'alignkd[s3]'`, `gs://...` with `alignkd[gcs]`).

`--dry-run` stops after the plan and prints the estimated cache size from the schema and a
sample of the data, without loading any teacher weights.
"""

from __future__ import annotations

import datetime as _dt
import os
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from alignkd import __version__, faults
from alignkd.cache_schemas import SCHEMA_VERSION, CacheMeta, CodecSpec, ShardMeta, TeacherInfo, sample_nbytes, shard_arrays
from alignkd.config import ConfigError, check_input_paths, to_dict
from alignkd.data import DataArgs
from alignkd.data.shards import expand_shards
from alignkd.data.templates import ConversationTemplate, TemplateError, encode
from alignkd.models import ModelArgs, checkpoint_family, describe_checkpoint
from alignkd.progress import progress_bar

__all__ = ["CacheArgs", "RayArgs", "ExtractArgs", "ExtractSummary", "ShardDone", "extract", "estimate_size",
           "placeable_workers", "plan_shards"]



@dataclass
class CacheArgs:
    path: str = ""  # a folder, or an fsspec URL: "s3://bucket/cache", "gs://..." (alignkd.cache.remote)
    layers: list[int] = field(default_factory=lambda: [0])  # "shallow layer(s)"; focus uses the first
    attention_heads: Literal["per_head", "mean"] = "per_head"  # "mean" serves only L_attn's `mean` variant
    # "recompute": store no attention, P^T or focus per sample, but a slice of the teacher once
    # (teacher_slice/), from which train-student rebuilds them (alignkd.recompute; layer 0 only)
    signals: Literal["cached", "recompute"] = "cached"
    # recompute only: the slice also holds the teacher's vision tower and its image settings, so
    # that a student with another tower (or another resolution, or training its own) can use the
    # cache (+0.61 GB for CLIP ViT-L/336; docs/recompute.md). false: only students sharing the
    # teacher's frozen tower and preprocessing can.
    slice_tower: bool = True
    topk: int = 64  # teacher next-token candidates kept per response position (plus one tail bin)
    codecs: CodecSpec = field(default_factory=CodecSpec)
    scratch: str = ""  # cache at a URL: local folder where a worker builds each shard before upload ("": $TMPDIR)

    def validate(self) -> None:
        if not self.layers or any(layer < 0 for layer in self.layers):
            raise ValueError("layers must be a non-empty list of layer indices >= 0")
        if self.topk < 1:
            raise ValueError("topk must be at least 1")
        if self.signals == "recompute" and self.layers != [0]:
            raise ValueError(f"cache.signals 'recompute' rebuilds layer 0 only (deeper layers need the whole decoder "
                             f"below them): set cache.layers = [0], not {self.layers}")


@dataclass
class RayArgs:
    address: str | None = None  # None: start a local Ray; "auto" or host:port: join a cluster
    num_workers: int = 1  # teacher actors
    cpus_per_worker: float = 1.0  # fractional on small CPU machines (read tasks need CPUs too)
    gpus_per_worker: float = 1.0  # used only where the cluster has GPUs
    num_cpus: int | None = None  # CPUs of a local Ray (None: all)
    # torch threads of the teacher's forward in each worker; 0: cpus_per_worker (rounded, at least 1).
    # On a CPU teacher, cpus_per_worker - 1 leaves one core to the worker's prefetch and write threads.
    forward_threads: int = 0
    max_restarts: int = 3  # a dead worker is restarted this often; its shard is redone


@dataclass
class ExtractArgs:
    # Checked to exist before Ray starts (alignkd.config.check_input_paths); not a field.
    INPUT_PATHS = ("teacher.path", "teacher.vision_tower", "data.shards")

    teacher: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    cache: CacheArgs = field(default_factory=CacheArgs)
    ray: RayArgs = field(default_factory=RayArgs)
    dry_run_samples: int = 64  # samples read to estimate the cache size


@dataclass
class ExtractSummary:
    cache: str
    shards_total: int
    shards_done_before: int
    shards_written: list[str]
    samples_written: int
    samples_skipped: int
    skipped_by_reason: dict[str, int]
    bytes_written: int
    seconds: float
    removed_partial: list[str]
    images_mislabelled: int = 0  # stored images whose bytes are not in their extension's format (kept)


@dataclass(frozen=True)
class ShardDone:
    """What a worker hands back for one cache shard: its metadata, and how many of its images
    were decoded by content because their extension named another format."""

    meta: ShardMeta
    images_mislabelled: int


# --- 1. plan ------------------------------------------------------------------------------
def plan_shards(spec: str) -> list[tuple[str, str]]:
    """(input shard path, cache shard name) pairs; names come from the input file names."""
    inputs = expand_shards(spec)
    names = [Path(p).name.removesuffix(".tar") for p in inputs]
    seen: dict[str, str] = {}
    for p, n in zip(inputs, names):
        if n in seen:
            raise ValueError(f"input shards {seen[n]} and {p} would share cache shard name {n!r}")
        seen[n] = p
    return list(zip(inputs, names))


# --- 2. workers ----------------------------------------------------------------------------
class TeacherWorker:
    """One teacher replica. Runs inside a Ray actor; also usable in-process (tests, bench)."""

    def __init__(self, args: ExtractArgs, worker_index: int = 0):
        import torch

        from alignkd.models import load_model

        threads = args.ray.forward_threads or max(1, int(round(args.ray.cpus_per_worker)))
        torch.set_num_threads(threads)
        self.args = args
        self.index = worker_index
        self.vlm = load_model(args.teacher)
        self._forward = threading.Lock()  # one shard at a time runs the teacher (process_shard)
        # Shards are encoded and written here, at a lower priority than the forward, one thread
        # per process_shard call the actor runs at once.
        self._writer = ThreadPoolExecutor(SHARDS_IN_FLIGHT, thread_name_prefix="alignkd-write",
                                          initializer=_behind_forward)

    def describe(self) -> dict[str, Any]:
        """The teacher-dependent part of the cache's root metadata."""
        from alignkd.signals import image_preprocessing, tokenizer_hash

        vlm, ident = self.vlm, self.vlm.identity()
        cfg = vlm.text_config
        return {
            "teacher": TeacherInfo(
                family=ident["family"],
                path=str(self.args.teacher.path),
                config_hash=ident["config_hash"],
                weights_fingerprint=ident["weights_fingerprint"],
                vision_tower=ident.get("vision_tower"),
                num_layers=cfg.num_hidden_layers,
                num_heads=cfg.num_attention_heads,
                hidden_size=cfg.hidden_size,
                vocab_size=cfg.vocab_size,
            ),
            "tokenizer_hash": tokenizer_hash(vlm.tokenizer),
            "num_vision_tokens": vlm.num_vision_tokens,
            "image_preprocessing": image_preprocessing(vlm),
        }

    def write_teacher_slice(self) -> int:
        """A recompute cache's teacher slice (alignkd.recompute), written once at the cache root
        before any shard; returns its tensors' bytes."""
        from alignkd.cache.teacher_slice import write_teacher_slice
        from alignkd.recompute import slice_fields, slice_tensors

        tower = self.args.cache.slice_tower
        written = write_teacher_slice(_cache_root(self.args.cache.path), slice_tensors(self.vlm, tower=tower),
                                      slice_fields(self.vlm, tower=tower))
        return written.tensors.size

    def process_shard(self, input_shard: str, shard_name: str, meta: CacheMeta) -> ShardDone:
        """Teacher signals of every usable sample of one input shard -> one cache shard.

        Three stages overlap: a thread reads, decodes, tokenizes and preprocesses the next
        batches (at most `_PREFETCH` ahead), this thread runs the teacher on each batch as soon
        as it is ready, and the shard's encoding, compression and write run after the forward
        phase has let go of the teacher (`_forward`), so that in a Ray actor running two calls at
        once (`SHARDS_IN_FLIGHT`, see _spawn_workers) the next shard's forward runs meanwhile.
        The prefetch and write threads run at a lower priority than the forward
        (`_behind_forward`): where they share cores with it, the forward goes first.
        Batches, their order and every record are those of the sequential loop: the cache bytes
        do not depend on the overlap.

        On a GPU the attention and features are quantised there, right after the forward, and
        only their codes and scales are copied to the host (alignkd.signals, the same bytes as
        the writer's numpy quantiser); on a CPU teacher there is no copy to save, and the writer
        quantises them behind the next shard's forward instead of on the forward's path."""
        import torch

        from alignkd.cache.store import remove_partial_shard
        from alignkd.cache.writer import write_shard
        from alignkd.signals import teacher_signals

        args, vlm = self.args, self.vlm
        cache_root = _cache_root(args.cache.path)
        remove_partial_shard(cache_root, shard_name)  # an earlier, killed attempt at this shard
        fault = faults.kill_armed(cache_root, shard_name)
        records: list[Any] = []
        # a recompute cache stores no attention or P^T: nothing to quantise for it
        on_device = args.cache.codecs if vlm.device.type != "cpu" and args.cache.signals == "cached" else None
        batches = _Prefetch(self._batches(input_shard), _PREFETCH)
        try:
            with self._forward:
                for batch, samples, full in batches:
                    if batch is not None:
                        with torch.no_grad():
                            out = vlm(batch, tap_layers=tuple(args.cache.layers))
                        records.extend(teacher_signals(vlm, batch, out, samples, layers=args.cache.layers,
                                                       topk=args.cache.topk, attention_heads=args.cache.attention_heads,
                                                       codecs=on_device))
                    if fault and full:  # tests: die for real, mid-shard, once
                        faults.kill_once(cache_root, shard_name)
        finally:
            batches.close()
        written = self._writer.submit(
            write_shard, cache_root, shard_name, records, batches.skipped, meta=meta, input_shard=input_shard,
            input_size=os.path.getsize(input_shard), after_array=faults.write_fault(shard_name),
            before_publish=faults.publish_fault(cache_root, shard_name), scratch=args.cache.scratch or None).result()
        return ShardDone(written, batches.mislabelled)

    def _batches(self, input_shard: str) -> Iterator[tuple[Any, list[Any], bool, list[tuple[str, str]], int]]:
        """(batch on the teacher's device or None, its samples, whether it was a full batch,
        the samples skipped since the previous one, images decoded by content among them) for
        every batch of the shard, in order."""
        from alignkd.data.batching import make_batch
        from alignkd.data.shards import BadSample, decode_sample, iter_raw_samples

        args, vlm = self.args, self.vlm
        pending, skipped, mislabelled = [], [], 0

        def batch(full: bool):
            made, not_encoded = make_batch(vlm, pending, template=args.data.template, max_length=args.data.max_length)
            if made is not None:
                made = made.to(vlm.device, dtype=vlm.dtype)
            out = (made, list(pending), full, [*skipped, *not_encoded], mislabelled)
            pending.clear()
            skipped.clear()
            return out

        for raw in iter_raw_samples(input_shard):
            try:
                sample = decode_sample(raw)
            except BadSample as e:
                skipped.append((e.key, e.reason))
                continue
            pending.append(sample)
            mislabelled += sample.image_mislabelled
            if len(pending) == args.data.batch_size:
                yield batch(full=True)
                mislabelled = 0
        if pending or skipped:
            yield batch(full=False)


_PREFETCH = 2
"""Batches read and preprocessed ahead of the teacher's forward, per shard being worked on."""

SHARDS_IN_FLIGHT = 2
"""process_shard calls an actor runs at once: one in the forward, the one before it writing (a
slow write holds up the next shard's start once this many are in flight: back-pressure)."""

BEHIND_FORWARD_NICE = 10
"""How much lower (in nice steps) the prefetch and write threads run than the forward's."""


def _behind_forward() -> None:
    """Lower the calling thread's scheduling priority (Linux: a thread has its own nice value).

    Reading ahead and writing behind fit in the time the forward leaves, but when they share
    cores with it (a CPU teacher on every core, or the one thread that launches a GPU's kernels)
    the scheduler would otherwise preempt the forward's threads for them, and every torch
    thread then waits at the next barrier for the one preempted. Elsewhere: left as it is."""
    if sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BEHIND_FORWARD_NICE))
    except OSError:
        pass


class _Prefetch:
    """Iterate (batch, samples, full) over a `_batches` generator run in a background thread,
    at most `depth` batches ahead; skipped samples and the mislabelled count are gathered in
    order. An exception in the thread is raised here, at the batch where it happened; `close`
    stops the thread (it is a daemon: a killed worker does not wait for it)."""

    _END = object()

    def __init__(self, source: Iterator, depth: int):
        self.skipped: list[tuple[str, str]] = []
        self.mislabelled = 0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True, name="alignkd-prefetch")
        self._thread.start()

    def _run(self, source: Iterator) -> None:
        _behind_forward()
        try:
            for item in source:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._queue.put(e)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            batch, samples, full, skipped, mislabelled = item
            self.skipped.extend(skipped)
            self.mislabelled += mislabelled
            yield batch, samples, full

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()


def _cache_root(path: str) -> Path | str:
    """A local cache as a Path; a URL stays a string (Path would fold its "//")."""
    return path.rstrip("/") if "://" in path else Path(path)


def _start_ray(args: RayArgs) -> bool:
    """Join or start Ray; returns True if this call started it (and should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if args.address:
        ray.init(address=args.address, **kwargs)
    else:
        ray.init(address="local", num_cpus=args.num_cpus, **kwargs)
    return True


def placeable_workers(nodes: list[dict[str, Any]], cpus: float, gpus: float) -> int:
    """How many actors asking for `cpus` CPUs and `gpus` GPUs each the alive nodes of
    `ray.nodes()` can hold at once (an actor sits on one node)."""
    fits = 0
    for node in nodes:
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        per = [have.get(name, 0.0) / want for name, want in (("CPU", cpus), ("GPU", gpus)) if want > 0]
        fits += int(min(per, default=0) + 1e-9)  # no request at all places nothing: refused earlier
    return fits


def _node_resources(nodes: list[dict[str, Any]]) -> str:
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    return "; ".join(f"{r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU" for r in alive) or "no alive node"


def _spawn_workers(args: ExtractArgs, echo: Callable[[str], None] = print) -> list[Any]:
    """The teacher actors, as many of ray.num_workers as the cluster can place: none is a
    one-line error, fewer a warning (an actor that cannot be placed would wait forever)."""
    import ray

    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    cpus, gpus = args.ray.cpus_per_worker, args.ray.gpus_per_worker if use_gpu else 0
    if cpus <= 0 and gpus <= 0:
        raise ValueError("ray.cpus_per_worker is 0 and the cluster has no GPU: a worker must ask for something")
    nodes = ray.nodes()
    fits = placeable_workers(nodes, cpus, gpus)
    asks = f"{cpus:g} CPU" + (f" and {gpus:g} GPU" if gpus else "")
    if fits == 0:
        raise RuntimeError(f"the Ray cluster cannot place a teacher worker asking for {asks} (its nodes: "
                           f"{_node_resources(nodes)}): lower ray.cpus_per_worker / ray.gpus_per_worker or add a node")
    count = min(fits, args.ray.num_workers)
    if count < args.ray.num_workers:
        echo(f"warning: the Ray cluster holds {count} of the {args.ray.num_workers} teacher workers asked for "
             f"({asks} each; its nodes: {_node_resources(nodes)}); going on with {count}")
    actor = ray.remote(
        num_cpus=cpus,
        num_gpus=gpus,
        max_concurrency=SHARDS_IN_FLIGHT,  # a shard's write overlaps the next one's forward (process_shard)
        max_restarts=args.ray.max_restarts,
        max_task_retries=args.ray.max_restarts,
        runtime_env=faults.worker_env(),  # None in real runs
    )(TeacherWorker)
    return [actor.remote(args, i) for i in range(count)]


def _template(args: ExtractArgs) -> ConversationTemplate:
    """data.template of the teacher's family, from its config.json alone, so that a name the
    family does not have is a ConfigError naming the key before Ray starts or a model loads."""
    try:
        return checkpoint_family(args.teacher.path).template(args.data.template)
    except TemplateError as e:
        raise ConfigError(f"data.template: {e}") from None


def _cache_meta(args: ExtractArgs, described: dict[str, Any]) -> CacheMeta:
    return CacheMeta(
        schema_version=SCHEMA_VERSION,
        teacher=described["teacher"],
        tokenizer_hash=described["tokenizer_hash"],
        template=args.data.template,
        max_length=args.data.max_length,
        num_vision_tokens=described["num_vision_tokens"],
        image_preprocessing=described["image_preprocessing"],
        layers=tuple(args.cache.layers),
        attention_heads=args.cache.attention_heads,
        signals=args.cache.signals,
        topk=args.cache.topk,
        codecs=args.cache.codecs,
        job=to_dict(args),
        alignkd_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


# --- the stage -------------------------------------------------------------------------------
def extract(args: ExtractArgs, *, echo: Callable[[str], None] = print, progress: bool = True) -> ExtractSummary:
    import ray

    from alignkd.cache.store import init_cache, list_complete_shards, read_shard_meta, remove_partial

    if not args.cache.path:
        raise ValueError("cache.path is not set: where should the cache go?")
    check_input_paths(args)
    if "://" in args.cache.path:
        from alignkd.cache.remote import filesystem

        if args.cache.path.startswith("memory://"):
            raise ValueError(f"cache.path {args.cache.path}: memory:// lives in one process, the Ray workers "
                             "cannot write to it; use a folder or a shared URL")
        filesystem(args.cache.path)  # a missing client (s3fs, gcsfs) fails now, not once the teacher is loaded
    _template(args)
    if args.cache.signals == "recompute" and describe_checkpoint(args.teacher.path).projector_spec is None:
        family = checkpoint_family(args.teacher.path).family
        raise ConfigError(f"cache.signals: 'recompute' is not available for a {family} teacher (its slice would need "
                          f"its own vision tower and decoder code; see alignkd.recompute): use 'cached'")
    started = time.monotonic()
    plan = plan_shards(args.data.shards)
    cache_root = _cache_root(args.cache.path)

    owns_ray = _start_ray(args.ray)
    workers = []
    try:
        workers = _spawn_workers(args, echo)
        try:
            described = ray.get(workers[0].describe.remote())
        except ray.exceptions.RayError as e:  # e.g. the teacher does not load: the actor died in __init__
            raise RuntimeError(f"teacher worker failed to start: {_one_line(e)}") from None
        meta = _cache_meta(args, described)
        init_cache(cache_root, meta)  # refuses a cache built by another teacher / tokenizer / config
        removed = remove_partial(cache_root)
        if meta.signals == "recompute":  # (again on a rerun: the same teacher gives the same slice)
            try:
                ray.get(workers[0].write_teacher_slice.remote())
            except ray.exceptions.RayTaskError as e:  # e.g. a family that cannot be sliced
                raise ValueError(f"teacher slice: {_one_line(e)}") from None

        done = set(list_complete_shards(cache_root))
        for input_shard, name in plan:
            if name in done:
                _check_same_input(read_shard_meta(cache_root, name), input_shard, cache_root)
        todo = deque((p, n) for p, n in plan if n not in done)
        done_before = len(plan) - len(todo)
        echo(f"{len(plan)} shards: {done_before} done before, {len(todo)} to extract -> {cache_root}")

        written, n_samples, n_skipped, nbytes, mislabelled = [], 0, 0, 0, 0
        by_reason: dict[str, int] = {}
        idle, pending = deque(workers * 2), {}  # two shards in flight per worker: one computed, one written
        bar = progress_bar(enabled=progress, total=len(plan), initial=len(plan) - len(todo), unit="shard")
        try:
            failure: RuntimeError | None = None  # the first; the other shards in flight still finish
            while pending or (todo and failure is None):
                while todo and idle and failure is None:
                    worker = idle.popleft()
                    input_shard, name = todo.popleft()
                    pending[worker.process_shard.remote(input_shard, name, meta)] = (worker, name)
                ready, _ = ray.wait(list(pending), num_returns=1)
                worker, name = pending.pop(ready[0])
                try:
                    done_shard: ShardDone = ray.get(ready[0])
                except Exception as e:  # noqa: BLE001 - any worker failure stops the job, cleanly
                    failure = failure or _shard_failure(e, name, [n for w, n in pending.values() if w is worker],
                                                        args.ray.max_restarts)
                    continue
                idle.append(worker)
                shard = done_shard.meta
                mislabelled += done_shard.images_mislabelled
                written.append(name)
                n_samples += shard.num_samples
                n_skipped += len(shard.skipped)
                for s in shard.skipped:
                    reason = s["reason"].split(":")[0]
                    by_reason[reason] = by_reason.get(reason, 0) + 1
                nbytes += sum(shard.nbytes.values())
                elapsed = time.monotonic() - started
                bar.set_postfix(samples_s=f"{n_samples / elapsed:.1f}", written=_human(nbytes), refresh=False)
                bar.update(1)
        finally:
            bar.close()
        if failure is not None:
            raise failure
    finally:
        for w in workers:
            ray.kill(w)
        if owns_ray:
            ray.shutdown()
    return ExtractSummary(
        cache=str(cache_root), shards_total=len(plan), shards_done_before=done_before,
        shards_written=written, samples_written=n_samples, samples_skipped=n_skipped, skipped_by_reason=by_reason,
        bytes_written=nbytes, seconds=time.monotonic() - started, removed_partial=removed,
        images_mislabelled=mislabelled,
    )


def _shard_failure(e: Exception, name: str, same_worker: list[str], max_restarts: int) -> RuntimeError:
    """The one-line error of a failed shard. A dead worker takes the other shard it held with
    it (either may have been the one running), so both are named."""
    import ray

    if not isinstance(e, ray.exceptions.RayActorError):  # an error raised by the shard's code
        return RuntimeError(f"shard {name} failed: {_one_line(e)}")
    names = sorted([name, *same_worker])
    return RuntimeError(f"shard {' or '.join(names)} failed (its worker died, restarts used up: "
                        f"ray.max_restarts = {max_restarts}): {_one_line(e)}")


def _check_same_input(shard: ShardMeta, input_shard: str, cache_root: Path | str) -> None:
    if Path(shard.input_shard).name != Path(input_shard).name or shard.input_size != os.path.getsize(input_shard):
        raise ValueError(
            f"cache shard {cache_root}/shards/{shard.name} was built from {shard.input_shard} "
            f"({shard.input_size} bytes), not {input_shard} ({os.path.getsize(input_shard)} bytes): "
            "refusing to mix data sets in one cache"
        )


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --- dry run ------------------------------------------------------------------------------
def estimate_size(args: ExtractArgs) -> dict[str, Any]:
    """Estimated cache size per signal and in total, from the schema and a sample of the data.

    Reads the teacher's config and tokenizer only (no weights). Sizes are after quantisation
    and before lossless compression, so with a compressor on they are an upper bound."""
    from alignkd.data.random_access import ShardReader
    from alignkd.data.shards import BadSample, decode_sample

    plan = plan_shards(args.data.shards)
    template = _template(args)
    ckpt = describe_checkpoint(args.teacher.path)
    nv = ckpt.num_vision_tokens  # None: each image's own count, from the family's processor settings
    if nv is None and ckpt.images is None:
        raise ValueError(f"{args.teacher.path}: the teacher's vision-token count depends on each image and its "
                         "family gives no way to count it from the config; --dry-run cannot estimate the size")
    # The schema's own byte count per array, for a cache of this teacher and job.
    meta = _cache_meta(args, {
        "teacher": TeacherInfo(family=ckpt.family, path=str(args.teacher.path), config_hash="-", weights_fingerprint="-",
                               vision_tower=None, num_layers=ckpt.num_layers, num_heads=ckpt.num_heads,
                               hidden_size=ckpt.hidden_size, vocab_size=ckpt.vocab_size),
        "tokenizer_hash": "-", "num_vision_tokens": nv, "image_preprocessing": {},
    })
    signal_of = {name: spec.signal for name, spec in shard_arrays(meta).items()}
    per_signal: dict[str, list[float]] = {}
    # Both modes for the same job, whichever it asks for (issue 17 item 4): per sample, and once.
    mode_metas = {"cached": replace(meta, signals="cached"), "recompute": replace(meta, signals="recompute", layers=(0,))}
    per_mode: dict[str, list[int]] = {mode: [] for mode in mode_metas}
    # Every k-th sample over all shards (a header-only pass counts them), not the first n,
    # which may not be typical of the whole set.
    reader = ShardReader([p for p, _ in plan])
    keys = reader.keys()
    total_samples = len(keys)
    seen = tried = 0
    for key in keys[:: max(1, total_samples // max(1, args.dry_run_samples))]:
        tried += 1
        try:
            s = decode_sample(reader.raw(key))
            count = (nv if nv is not None else ckpt.images.count(s.image)) if s.image is not None else 0
            enc = encode(s.conversations, template=template, tokenizer=ckpt.tokenizer,
                         num_vision_tokens=count, max_length=args.data.max_length,
                         has_image=s.image is not None, key=s.key)
        except (BadSample, TemplateError):
            continue
        seen += 1
        t, image = len(enc.input_ids), enc.vision_start >= 0
        counts = dict(tokens=t, responses=sum(enc.response_mask[1:]),
                      rows=t - (enc.vision_start + count) if image else 0, vision=count if image else 0)
        by_mode = {mode: sample_nbytes(m, **counts) for mode, m in mode_metas.items()}
        for mode, nbytes in by_mode.items():
            per_mode[mode].append(sum(nbytes.values()))
        arrays = by_mode[meta.signals]  # mode_metas holds the job's own meta under its mode
        sizes: dict[str, int] = {}
        for name, b in arrays.items():
            sizes[signal_of[name]] = sizes.get(signal_of[name], 0) + b
        for name, b in sizes.items():
            per_signal.setdefault(name, []).append(b)
    if not seen:
        raise ValueError(f"none of the {tried} samples read from {args.data.shards} is usable")
    mean = {name: float(np.mean(v)) for name, v in per_signal.items()}
    # Each array of each shard also has a zarr.json (writer.ARRAY_METADATA_BYTES).
    from alignkd.cache.writer import ARRAY_METADATA_BYTES

    usable = total_samples * seen / tried  # skipped samples store nothing
    modes: dict[str, dict[str, Any]] = {}
    for mode, per_sample in per_mode.items():
        once = 0 if mode == "cached" else _slice_bytes(ckpt, args.teacher.dtype, args.cache.slice_tower)
        per = float(np.mean(per_sample))
        arrays_meta = len(plan) * len(shard_arrays(mode_metas[mode])) * ARRAY_METADATA_BYTES
        modes[mode] = {"bytes_per_sample": per, "once_bytes": once, "metadata_bytes": arrays_meta,
                       "total": None if once is None else per * usable + once + arrays_meta}
        if mode == "recompute":  # whether once_bytes holds the teacher's tower (cache.slice_tower)
            modes[mode]["slice_tower"] = ("left out" if not args.cache.slice_tower else "included"
                                          if ckpt.vision_config is not None else "not counted (its config is not local)")
    metadata = modes[meta.signals]["metadata_bytes"]  # mode_metas holds the job's own meta under its mode
    return {
        "samples": total_samples,
        "sampled": seen,
        "bytes_per_sample": mean,
        "total_bytes": {name: m * usable for name, m in mean.items()},
        "metadata_bytes": metadata,
        "total": sum(mean.values()) * usable + metadata,
        "compressor": args.cache.codecs.compressor,
        "signals": args.cache.signals,
        "modes": modes,  # "once_bytes": the teacher slice of a recompute cache (None: the family has none)
    }


def _slice_bytes(ckpt: Any, dtype: str, tower: bool) -> int | None:
    """A recompute cache's teacher slice for this checkpoint, in the dtype the teacher runs in,
    with its vision tower when the job keeps it (cache.slice_tower) and the config says its shape
    (a MobileVLM checkpoint naming a hub CLIP does not: the tower's bytes are then left out)."""
    from alignkd.recompute import estimate_slice_bytes

    if ckpt.projector_spec is None or ckpt.text_config is None:
        return None
    try:
        return estimate_slice_bytes(ckpt.family, ckpt.text_config, ckpt.projector_spec, dtype,
                                    ckpt.vision_config if tower else None)
    except ValueError:  # not a Llama decoder
        return None
