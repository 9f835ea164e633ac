"""Benchmark (issue 16 item 3): random reads of a paper-shaped cache, and their share of a
paper-sized student step.

A cache is written with the default codecs and the MobileVLM V2 7B teacher's shapes (32 heads,
hidden 4096, 144 vision tokens, vocabulary 32000, top-64, per-head layer-0 attention) for
samples about the typical pre-training length (PAPER_DATA["pretrain"] in _common.py: 250 text
rows after the image, 250 response rows, an assumption, not a measurement; each sample's drawn
uniformly within +-50% of it, since equal lengths would line every attention block up with
its chunks), in shards of `--samples-per-shard` (1000, as a paper-scale extraction writes).
Attention and features reach the writer quantised, as extraction hands them over. The signals
are random but shaped like real ones (softmax rows, heavy-tailed features), so the compressor
sees realistic entropy. Then, on this machine's CPU:

  cold      one reader, a random permutation of every sample, each `CacheReader.get` timed;
            the reader's chunk cache (256 MiB) holds a small part of the 2 GB cache, so most
            chunks are read for the first time: this is the chunk-cache-miss cost (read,
            crc32c, decompress, and for `get(key)` dequantise). Two readers (separate chunk
            caches) alternate sample by sample: `stored` = `get(key, dequantise=False)`, what
            train-student's DataLoader workers now read (attention and features stay codes +
            row scales), and `decoded` = `get(key)`, the numpy dequantise to float32 the
            workers did before;
  collate   the teacher half of `DistillDataset.collate` (padding and stacking the signals of a
            batch of 8) over stored and over decoded records, per sample;
  dequantise  `TeacherBatch.dequantised()` of a stored batch, per sample: in training this runs
            on the student's device after the batch is moved (timed here on 1 CPU thread, an
            upper bound; on a GPU it is a few elementwise kernels over ~2 M elements a sample);
  loader    stored records and collate through a torch DataLoader with `--workers` processes
            (each its own reader, as train-student's workers): samples/s of the whole pool.

The projection: a student step of the paper's 1.7B student on an H100 in bf16 takes
6 x params x tokens FLOPs per sample at an ASSUMED 40% of the 989 TFLOP/s dense peak; the
reading share is (stored cold ms + collate ms per sample) / (workers per GPU) / (step ms per
sample): the CPU work of the DataLoader workers, which run beside the GPU step. Target: at
most 5% with the DataLoader workers a GPU usually gets (`--project-workers`, default 8).

    python bench/cache_random_reads.py                      # bench/results/cache_random_reads.{json,md}
    python bench/cache_random_reads.py --unpacked --chunk-kib 1024 --tag unpacked   # the layout before
    python bench/cache_random_reads.py --samples 64 --samples-per-shard 32 --smoke
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

H100_BF16_FLOPS = 989e12
MFU = 0.40


def paper_sample(rng: np.random.Generator, key: str, meta, text_rows: int, response_rows: int):
    from alignkd.cache.records import SampleSignals
    from alignkd.cache_schemas import IMAGE_TOKEN

    nv, heads, d, k = meta.num_vision_tokens, meta.teacher.num_heads, meta.teacher.hidden_size, meta.topk
    t = 1 + nv + text_rows
    ids = rng.integers(3, meta.teacher.vocab_size, t).astype(np.int32)
    ids[1:1 + nv] = IMAGE_TOKEN
    scores = rng.standard_normal((heads, text_rows, nv), dtype=np.float32) * 2
    attention = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True) * 0.3  # rows need not sum to 1
    feats = (rng.standard_t(3, (nv, d)) * 0.5).astype(np.float32)
    focus = attention.mean(0).sum(0)
    lp = np.sort(np.log(rng.dirichlet(np.ones(k * 4), response_rows)[:, :k] + 1e-9), axis=1)[:, ::-1]
    return SampleSignals(
        key=key, fingerprint=hashlib.sha256(key.encode()).hexdigest(), input_ids=ids,
        response_positions=np.arange(t - response_rows, t, dtype=np.int32), vision_start=1, vision_length=nv,
        attention={0: _as_extracted(meta.codecs.attention, attention)},
        vision_features=_as_extracted(meta.codecs.features, feats), focus=focus,
        topk_ids=rng.integers(0, meta.teacher.vocab_size, (response_rows, k)).astype(np.int32),
        topk_logprobs=np.ascontiguousarray(lp, dtype=np.float32), tail_logmass=np.full(response_rows, -3.0, np.float32),
    )


def _as_extracted(codec: str, x: np.ndarray):
    """A float block as extraction hands it to the writer: quantised on the teacher's device
    (here the CPU) with its codec error; a thousand samples of codes fit in memory, of floats not."""
    import torch

    from alignkd.cache.codecs import Quantised, quantise, quantised_error

    t = torch.from_numpy(x)
    q = quantise(codec, t)
    return Quantised(codec, q.values.numpy(), q.scale.numpy(), q.length, quantised_error(t, q))


def write_cache(root: Path, samples: int, per_shard: int, text_rows: int, response_rows: int, seed: int,
                compressor: str = "zstd", level: int = 3) -> float:
    import shutil

    from alignkd.cache.store import init_cache
    from alignkd.cache.writer import write_shard

    shutil.rmtree(root, ignore_errors=True)
    meta = C.paper_meta(compressor, level, bench="cache_random_reads")
    init_cache(root, meta)
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    for s, lo in enumerate(range(0, samples, per_shard)):
        # Lengths vary around the typical one (uniform, +-50%), as real captions do: with one fixed
        # length every attention block would be the same size and line up with its chunks.
        scales = rng.uniform(0.5, 1.5, min(per_shard, samples - lo))
        batch = [paper_sample(rng, f"{lo + i:07d}", meta, round(text_rows * x), round(response_rows * x))
                 for i, x in enumerate(scales)]
        write_shard(root, f"train-{s:06d}", batch, [], meta=meta, input_shard=f"train-{s:06d}.tar", input_size=0)
    return time.perf_counter() - t


def _chunk_rows_before(spec, offsets, data) -> int:
    """The writer's chunk rows before chunks were sized to samples: about CHUNK_BYTES per chunk."""
    import math

    from alignkd.cache import writer

    row_bytes = max(1, math.prod(data.shape[1:]) * data.dtype.itemsize)
    return min(max(1, writer.CHUNK_BYTES // row_bytes), max(1, data.shape[0]))


class _Keys:
    """A map-style dataset of cache keys whose items are the records as DistillDataset reads them."""

    def __init__(self, path: Path, keys: list[str]):
        from alignkd.cache.reader import CacheReader

        self.reader, self.keys = CacheReader(path), keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        return self.reader.get(self.keys[i], dequantise=False)


def _collate(records) -> object:
    """The teacher half of DistillDataset.collate (the sequence length of the typical sample)."""
    from alignkd.data.distill import _teacher_batch

    return _teacher_batch(list(records), seq_len=max(len(r.input_ids) for r in records),
                          num_vision=records[0].vision_length)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000, help="~1 GB on disk per 1000")
    ap.add_argument("--samples-per-shard", type=int, default=1000, help="as a paper-scale extraction writes them")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader processes measured here")
    ap.add_argument("--project-workers", type=int, default=8, help="DataLoader processes per GPU in the projection")
    ap.add_argument("--work", default="/tmp/alignkd-bench/random-reads")
    ap.add_argument("--chunk-kib", type=int, default=0,
                    help="write with this chunk size instead of the writer's CHUNK_BYTES (a what-if; 0: as shipped)")
    ap.add_argument("--unpacked", action="store_true",
                    help="what-if: one file per chunk, as caches were written before (with --chunk-kib 1024: that layout)")
    ap.add_argument("--compressor", default="zstd", choices=["zstd", "blosc", "none"],
                    help="what-if: the chunks' compressor (the default codecs' is zstd)")
    ap.add_argument("--level", type=int, default=3, help="what-if: the compressor's level (the paper jobs' is 3)")
    ap.add_argument("--tag", default="", help="suffix of the result files, for variants")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    C.bench_env()
    import torch

    torch.set_num_threads(1)
    case = C.paper_cases()["pretrain/typical"]
    text_rows, response_rows = int(case["text_rows"]), int(case["response_rows"])
    root = Path(args.work) / "cache"
    from alignkd.cache import writer

    if args.chunk_kib:
        writer.CHUNK_BYTES = args.chunk_kib * 1024  # read by the writer at each array it creates
    if args.unpacked:  # the layout before: a file per chunk of CHUNK_BYTES, whatever the samples' parts
        writer.FILE_BYTES = None
        writer._chunk_rows = _chunk_rows_before
    write_s = write_cache(root, args.samples, args.samples_per_shard, text_rows, response_rows, args.seed,
                          args.compressor, args.level)

    from alignkd.cache.reader import _CHUNK_CACHE_BYTES, CacheReader
    from alignkd.cache.store import read_shard_meta

    stored_reader, decoded_reader = CacheReader(root), CacheReader(root)
    keys = stored_reader.keys()
    order = np.random.default_rng(args.seed + 1).permutation(len(keys)).tolist()
    stored = sum(sum(read_shard_meta(root, n).nbytes.values()) for n in stored_reader.shards)
    times: dict[str, list[float]] = {"stored": [], "decoded": []}
    cpu: dict[str, list[float]] = {"stored": [], "decoded": []}  # this process's CPU time: what load does not inflate
    records: dict[str, list] = {"stored": [], "decoded": []}
    for n, i in enumerate(order):  # alternate which reader goes first
        for what in (("stored", "decoded") if n % 2 == 0 else ("decoded", "stored")):
            reader = stored_reader if what == "stored" else decoded_reader
            t, c = time.perf_counter(), time.process_time()
            record = reader.get(keys[i], dequantise=what == "decoded")
            times[what].append(time.perf_counter() - t)
            cpu[what].append(time.process_time() - c)
            if len(records[what]) < 64:
                records[what].append(record)
    cold_ms = {what: 1000 * statistics.median(v) for what, v in times.items()}
    cold_cpu_ms = {what: 1000 * statistics.median(v) for what, v in cpu.items()}

    def per_sample_ms(fn, what: str, batch: int = 8, clock=time.perf_counter) -> float:
        """Median over the batches of the kept records, per sample."""
        spent = []
        for lo in range(0, len(records[what]) - batch + 1, batch):
            t = clock()
            fn(records[what][lo : lo + batch])
            spent.append((clock() - t) / batch)
        return 1000 * statistics.median(spent)

    collate_ms = {what: per_sample_ms(_collate, what) for what in records}
    collate_cpu_ms = {what: per_sample_ms(_collate, what, clock=time.process_time) for what in records}
    batches = [_collate(records["stored"][lo : lo + 8]) for lo in range(0, len(records["stored"]) - 7, 8)]
    spent = []
    for b in batches:
        t = time.perf_counter()
        b.dequantised()
        spent.append((time.perf_counter() - t) / 8)
    dequantise_ms = 1000 * statistics.median(spent)

    loader = torch.utils.data.DataLoader(_Keys(root, [keys[i] for i in order]), batch_size=8,
                                         num_workers=args.workers, shuffle=False, collate_fn=_collate)
    t = time.perf_counter()
    n = sum(b.image_mask.numel() for b in loader)
    loader_s = time.perf_counter() - t

    student = C.PRESETS["paper"].student
    tokens = C.paper_tokens(C.PAPER_DATA["pretrain"])
    params = C.decoder_params(student) + 2 * C.PAPER_VOCAB * student["hidden_size"]
    step_ms = 1000 * 6 * params * tokens / (H100_BF16_FLOPS * MFU)
    worker_ms = cold_ms["stored"] + collate_ms["stored"]  # a DataLoader worker's part of one sample
    before_ms = cold_ms["decoded"] + collate_ms["decoded"]
    share = worker_ms / args.project_workers / step_ms
    worker_cpu_ms = cold_cpu_ms["stored"] + collate_cpu_ms["stored"]
    share_cpu = worker_cpu_ms / args.project_workers / step_ms
    result = {
        "benchmark": "cache_random_reads (issue 16, item 3)",
        "samples": len(keys), "samples_per_shard": args.samples_per_shard, "chunk_bytes": writer.CHUNK_BYTES,
        "file_bytes": writer.FILE_BYTES,
        "text_rows": text_rows,
        "response_rows": response_rows, "codecs": C.paper_meta(args.compressor, args.level).codecs.to_dict(),
        "stored_bytes_per_sample": stored / len(keys), "write_s": write_s,
        "cold_ms_per_sample": {what: {"median": cold_ms[what], "mean": 1000 * statistics.fmean(v),
                                      "p90": 1000 * float(np.percentile(v, 90))} for what, v in times.items()},
        "collate_ms_per_sample": collate_ms,
        "cpu_ms_per_sample": {"cold_median": cold_cpu_ms, "collate": collate_cpu_ms, "worker_stored": worker_cpu_ms},
        "dequantise_ms_per_sample_cpu_1_thread": dequantise_ms,
        "worker_ms_per_sample": {"stored": worker_ms, "decoded": before_ms},
        "loader": {"workers": args.workers, "samples": n, "seconds": loader_s, "samples_s": n / loader_s},
        "projection": {"student_params": params, "tokens_per_sample": tokens, "assumed_mfu": MFU,
                       "h100_bf16_flops": H100_BF16_FLOPS, "step_ms_per_sample": step_ms,
                       "workers_per_gpu": args.project_workers, "read_share": share, "read_share_cpu_time": share_cpu,
                       "read_share_decoded_on_cpu": before_ms / args.project_workers / step_ms, "target": 0.05,
                       "target_met": share <= 0.05},
        "machine": C.machine("cpu", 1),
    }
    codecs = C.paper_meta(args.compressor, args.level).codecs
    md = [
        "# Random reads of a paper-shaped cache (issue 16, item 3)",
        "",
        f"{len(keys)} samples of the MobileVLM V2 7B teacher's shapes (32 heads x {text_rows} text rows x 144 vision "
        f"tokens of per-head attention, 144 x 4096 features, top-64 on {response_rows} response rows; text and "
        f"response lengths vary uniformly by +-50%), default codecs ({codecs.attention} / {codecs.features} / {codecs.logprobs}, {args.compressor}"
        f"{f' level {args.level}' if args.compressor != 'none' else ''}), "
        f"{args.samples_per_shard} samples per shard, "
        + (f"one file per chunk of {writer.CHUNK_BYTES // 1024} KiB uncompressed (the layout before packing)"
           if writer.FILE_BYTES is None else
           f"chunks of about one sample's part (at most {writer.CHUNK_BYTES // 1024} KiB, one sample's features "
           f"exactly) packed {writer.FILE_BYTES // 2**20} MiB to a file")
        + f": {stored / len(keys) / 2**20:.2f} MiB stored per sample. Random order, every sample once; a reader's "
        f"chunk cache ({_CHUNK_CACHE_BYTES >> 20} MiB of decoded chunks) holds under {_CHUNK_CACHE_BYTES / stored:.0%} "
        "of the cache.",
        "",
        C.md_table(["per sample, ms (median)", "read as stored (codes + scales): now", "dequantised on the CPU: before"], [
            ["`CacheReader.get`, cold chunks (mean; p90 in brackets)",
             *(f"{cold_ms[w]:.2f} ({result['cold_ms_per_sample'][w]['mean']:.2f}; "
               f"{result['cold_ms_per_sample'][w]['p90']:.2f})" for w in ("stored", "decoded"))],
            ["collate, teacher signals of a batch of 8", *(f"{collate_ms[w]:.2f}" for w in ("stored", "decoded"))],
            ["a DataLoader worker's part: read + collate", f"{worker_ms:.2f}", f"{before_ms:.2f}"],
            [f"share of the projected step with {args.project_workers} workers per GPU", f"{share:.1%}",
             f"{before_ms / args.project_workers / step_ms:.1%}"],
            ["the worker's part in CPU time (read; collate), not inflated by other jobs' load",
             f"{worker_cpu_ms:.2f} ({cold_cpu_ms['stored']:.2f}; {collate_cpu_ms['stored']:.2f}): {share_cpu:.1%}",
             f"{cold_cpu_ms['decoded'] + collate_cpu_ms['decoded']:.2f}: "
             f"{(cold_cpu_ms['decoded'] + collate_cpu_ms['decoded']) / args.project_workers / step_ms:.1%}"],
        ]),
        "",
        f"Dequantising a stored batch (`TeacherBatch.dequantised()`), which training now does on the student's "
        f"device after moving the batch: {dequantise_ms:.2f} ms per sample on 1 CPU thread here (not in the "
        "workers' part; on a GPU it is elementwise work over ~2 M elements a sample, not measured). "
        f"DataLoader, {args.workers} workers, stored records + collate: {n / loader_s:.1f} samples/s. Paper student "
        f"step (1.7B, bf16 H100 at an assumed 40% MFU): {step_ms:.2f} ms per sample.",
        "",
        f"Target: reading at most 5% of a student step: **{'met' if share <= 0.05 else 'missed'}** "
        f"({share:.1%} in wall time, {share_cpu:.1%} in CPU time). The step time is a FLOP projection (6 x "
        "parameters x tokens), not a GPU measurement; the read cost is this machine's CPU. Wall time is the "
        "target's measure; CPU time tells a loaded machine's numbers from a quiet one's.",
        "",
        C.machine_line(result["machine"]),
    ]
    C.write_results(C.results_dir(args), "cache_random_reads" + (f"_{args.tag}" if args.tag else ""), result, "\n".join(md))


if __name__ == "__main__":
    main()
