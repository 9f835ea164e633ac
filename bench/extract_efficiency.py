"""Benchmark 1 (issue 6): how close `extract-teacher` comes to the teacher's bare forward.

The same random-initialised teacher (preset `cpu`: a 6-layer, 768-wide decoder with 144
vision tokens from a 336 px CLIP tower; see bench/_common.py), the same samples, in one run:

  bare      the teacher forward extraction cannot do without: the tapped forward (SDPA +
            layer-0 q/k capture) and the LM head on the response rows, under no_grad, over
            batches built beforehand and held in memory: the floor;
  extract   `extract()` end to end, as `alignkd extract-teacher` runs it: local Ray started and
            stopped, one actor loading the teacher, shards read, images decoded and
            CLIP-preprocessed, text tokenised, the tapped forward, signals (top-k, focus),
            quantisation, zstd, the atomic Zarr shard writes;
  one       the same over the first shard(s) only, once per worker: its time is mostly the
            fixed start-up (Ray, the actor, loading the teacher), so
            (N_all - N_one) / (t_all - t_one) is the steady-state samples/s of a long job.

The steady state is a difference of two walls, each carrying the start-up's jitter (here about
+-1 s of 8-15 s: Ray, the actor, the teacher load), so its error is that jitter over
t_all - t_one. 64 samples in 16-sample shards leave 48 marginal samples (~10 s on 2 CPU cores,
a +-10% spread between repeats); the default, 256 samples, leaves 240 (~50 s, about +-2%).

Threads: the Ray actor reserves `--threads` CPUs; the teacher's forward runs on
`--forward-threads` torch threads (default: all of them), in the worker (`ray.forward_threads`)
and in the bare forward alike, so the ratio always compares the same forward. With
`--forward-threads` one below `--threads`, the worker's prefetch and write threads get a core
of their own, as they have beside a GPU: the question is then whether the pipeline hides every
other stage behind a forward of that many threads, not how fast the machine's cores can run it.

The three alternate within every repeat (order reversed on odd repeats), and each repeat's
ratio is taken side by side; the report gives medians with min and max. The target is a
steady-state ratio of at least 0.97 (issue 16: the worker is pipelined, TeacherWorker.process_shard). A single in-process pass with a timer per stage (read,
batch, forward, signals, write), using the same library functions as the worker, says where
the rest of the time goes; writing an empty shard gives the part of `write` that is per shard
(array creation, fsyncs) rather than per sample. Benchmark 6's cost model reads this profile.

    python bench/extract_efficiency.py                          # bench/results/extract_efficiency.{json,md}
    python bench/extract_efficiency.py --repeats 5
    python bench/extract_efficiency.py --samples 2000 --samples-per-shard 1000 --repeats 2 --tag shard1000
    python bench/extract_efficiency.py --samples 128 --samples-per-shard 64 --tag shard64   # bigger shards
    python bench/extract_efficiency.py --forward-threads 1 --tag fwd1     # a core left to the pipeline
    python bench/extract_efficiency.py --smoke                  # seconds; checks the script only
    python bench/extract_efficiency.py --preset paper --teacher-layers 8 --device cuda --dtype bfloat16 --gpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


TARGET = 0.97
# Where each profiled stage runs in TeacherWorker.process_shard.
CRITICAL = {"read_decode": "prefetch thread", "tokenise_preprocess": "prefetch thread", "forward": "critical path",
            "signals": "critical path",
            "quantise": "behind the next shard's forward (on a GPU: on the device, after the forward)",
            "write": "behind the next shard's forward"}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prebuilt_batches(vlm, work: C.Workdir, device: str, dtype) -> tuple[list, int]:
    """Every usable sample of the work folder as model-ready batches (on the device)."""
    from alignkd.data.batching import make_batch
    from alignkd.data.shards import read_samples

    samples, _ = read_samples(str(work.train), work.samples)
    bs = work.preset.batch_size
    batches, n = [], 0
    for lo in range(0, len(samples), bs):
        batch, _ = make_batch(vlm, samples[lo : lo + bs], template="plain", max_length=work.preset.max_length)
        batches.append(batch.to(vlm.device, dtype=dtype))
        n += len(batch.keys)
    return batches, n


def _response_rows(batch):
    """(batch index, position) of the hidden states whose logits predict the response tokens,
    as `alignkd.signals.teacher_signals` selects them."""
    resp = batch.response_mask.clone()
    resp[:, 0] = False
    b_idx, t_idx = resp.nonzero(as_tuple=True)
    return b_idx, t_idx - 1


def bare_forward(vlm, batches: list, device: str) -> float:
    """The teacher forward distillation needs, and nothing else: the tapped decoder forward
    and the LM head on the response rows (VLM.forward stops at the hidden states; any teacher
    that supplies logit targets must run its LM head on at least those rows)."""
    import torch

    _sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            out = vlm(batch, tap_layers=(0,))
            vlm.logits(out.hidden[_response_rows(batch)])
    _sync(device)
    return time.perf_counter() - t


def _quantised(record, codecs):
    """A float record with its attention and features quantised by the torch quantiser, as a
    GPU worker does on the device (alignkd.signals); here on this machine's CPU."""
    import dataclasses

    import torch
    from alignkd.signals import _to_host

    attention = {k: _to_host(torch.from_numpy(v), codecs.attention) for k, v in record.attention.items()}
    features = _to_host(torch.from_numpy(record.vision_features), codecs.features) if record.vision_length else \
        record.vision_features
    return dataclasses.replace(record, attention=attention, vision_features=features)


def stage_profile(vlm, work: C.Workdir, meta_cache: Path, out_cache: Path, device: str) -> dict[str, float]:
    """One in-process pass over every shard, what TeacherWorker.process_shard does, with a
    timer per stage. Writes into a fresh cache made with the extraction cache's metadata.
    `quantise` (codes, scales and codec error of attention and features) is timed apart from
    `write` (the rest of write_shard: checks, compression, zarr, fsync, publish): a CPU
    worker's writer does both behind the next forward; a GPU worker quantises on the device."""
    import os
    import shutil

    import torch
    from alignkd.cache.store import init_cache, read_cache_meta
    from alignkd.cache.writer import write_shard
    from alignkd.data.batching import make_batch
    from alignkd.data.shards import decode_sample, expand_shards, iter_raw_samples
    from alignkd.signals import teacher_signals

    meta = read_cache_meta(meta_cache)
    shutil.rmtree(out_cache, ignore_errors=True)
    init_cache(out_cache, meta)
    times = dict.fromkeys(("read_decode", "tokenise_preprocess", "forward", "signals", "quantise", "write"), 0.0)
    p = work.preset

    def clock(stage: str, t0: float) -> float:
        now = time.perf_counter()
        times[stage] += now - t0
        return now

    for shard in expand_shards(str(work.train)):
        t = time.perf_counter()
        samples = [decode_sample(raw) for raw in iter_raw_samples(shard)]
        t = clock("read_decode", t)
        records = []
        for lo in range(0, len(samples), p.batch_size):
            chunk = samples[lo : lo + p.batch_size]
            batch, _ = make_batch(vlm, chunk, template="plain", max_length=p.max_length)
            batch = batch.to(vlm.device, dtype=vlm.dtype)
            t = clock("tokenise_preprocess", t)
            with torch.no_grad():
                out = vlm(batch, tap_layers=(0,))
            _sync(device)
            t = clock("forward", t)
            records += teacher_signals(vlm, batch, out, chunk, layers=[0], topk=p.topk)
            t = clock("signals", t)
        records = [_quantised(r, meta.codecs) for r in records]
        t = clock("quantise", t)
        write_shard(out_cache, Path(shard).name.removesuffix(".tar"), records, [], meta=meta, input_shard=shard,
                    input_size=os.path.getsize(shard))
        clock("write", t)
    # What a shard costs whatever its size (creating ~15 arrays, fsyncing them): an empty shard.
    fixed = []
    for i in range(3):
        t = time.perf_counter()
        write_shard(out_cache, f"empty-{i}", [], [], meta=meta, input_shard=shard, input_size=0)
        fixed.append(time.perf_counter() - t)
    return times, statistics.median(fixed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=sorted(C.PRESETS))
    ap.add_argument("--samples", type=int, default=256,
                    help="samples extracted (the first shard's are subtracted: see the start-up jitter above)")
    ap.add_argument("--samples-per-shard", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2,
                    help="CPUs of the Ray actor")
    ap.add_argument("--forward-threads", type=int, default=0,
                    help="torch threads of the teacher forward, in the worker and the bare forward (0: --threads)")
    ap.add_argument("--teacher-layers", type=int, help="cut the preset's teacher to this many layers")
    ap.add_argument("--student-layers", type=int, help="cut the preset's student to this many layers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--work", default="/tmp/alignkd-bench", help="models, data and caches are written here")
    ap.add_argument("--gpu", action="store_true", help="write results to bench/results/gpu/")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks that the script runs")
    ap.add_argument("--tag", default="", help="suffix of the result files (extract_efficiency_TAG), for variants")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.samples, args.samples_per_shard, args.repeats = "smoke", 8, 4, 1
    C.bench_env()
    import torch
    from alignkd.models import load_vlm

    forward_threads = args.forward_threads or args.threads
    torch.set_num_threads(forward_threads)
    work = C.workdir_from_args(args)
    preset = work.preset
    n_shards = -(-args.samples // args.samples_per_shard)
    cuda = args.device.startswith("cuda")
    num_cpus = None if cuda else args.threads  # a GPU machine's Ray sees all its CPUs
    full = C.extract_args(work, work.root / "cache-full", cpus_per_worker=args.threads, num_cpus=num_cpus,
                          dtype=args.dtype, device=args.device)
    one = C.extract_args(work, work.root / "cache-one", shards=C.first_shards(work, 1), cpus_per_worker=args.threads,
                         num_cpus=num_cpus, dtype=args.dtype, device=args.device)
    full.ray.forward_threads = one.ray.forward_threads = forward_threads

    dtype = getattr(torch, args.dtype)
    teacher = load_vlm(work.teacher, dtype=dtype, device=args.device)
    batches, n_bare = prebuilt_batches(teacher, work, args.device, dtype)
    bare_forward(teacher, batches[:1], args.device)  # warm-up (allocator, kernels)

    runs: dict[str, list[float]] = {"bare": [], "extract": [], "one": []}
    samples = {}
    for r in range(args.repeats):
        order = ["bare", "extract", "one"] if r % 2 == 0 else ["one", "extract", "bare"]
        for what in order:
            if what == "bare":
                runs["bare"].append(bare_forward(teacher, batches, args.device))
                samples["bare"] = n_bare
            else:
                wall, summary = C.timed_extract(full if what == "extract" else one)
                runs[what].append(wall)
                samples[what] = summary.samples_written
            print(f"repeat {r}: {what:8s} {runs[what][-1]:7.2f} s  ({samples[what]} samples)", flush=True)

    profile, write_fixed = stage_profile(teacher, work, Path(full.cache.path), work.root / "cache-profile",
                                         args.device)
    n_all, n_one = samples["extract"], samples["one"]
    per_repeat = []
    for b, e, o in zip(runs["bare"], runs["extract"], runs["one"], strict=True):
        bare_rate = n_bare / b
        per_repeat.append({
            "bare_samples_s": bare_rate,
            "extract_samples_s": n_all / e,
            "steady_samples_s": (n_all - n_one) / (e - o) if e > o else float("nan"),
            "fixed_s": e - (e - o) * n_all / (n_all - n_one) if e > o else float("nan"),
        })
        per_repeat[-1]["ratio_end_to_end"] = per_repeat[-1]["extract_samples_s"] / bare_rate
        per_repeat[-1]["ratio_steady"] = per_repeat[-1]["steady_samples_s"] / bare_rate

    def col(name: str) -> dict:
        return C.stats([x[name] for x in per_repeat])

    p = preset
    tokens = statistics.fmean(int(b.attention_mask.sum()) / b.attention_mask.shape[0] for b in batches)
    rows = statistics.fmean(_response_rows(b)[0].numel() / b.attention_mask.shape[0] for b in batches)
    flops = C.forward_flops(p.teacher, tokens, p.vision, logit_rows=rows, vocab=p.vocab_size)
    m = C.machine(args.device, forward_threads)
    result = {
        "benchmark": "extract_efficiency (issue 6, item 1)",
        "preset": p.name, "teacher": p.teacher, "vision": p.vision, "num_vision_tokens": p.grid**2,
        "samples": n_all, "shards": n_shards, "samples_first_shard": n_one, "batch_size": p.batch_size,
        "mean_tokens_per_sample": tokens, "mean_response_rows_per_sample": rows,
        "teacher_forward_gflop_per_sample": flops / 1e9,
        "device": args.device, "dtype": args.dtype, "repeats": args.repeats,
        "ray": {"num_workers": 1, "cpus_per_worker": args.threads, "num_cpus": num_cpus,
                "forward_threads": forward_threads},
        "bare_forward_threads": forward_threads,
        "codecs": full.cache.codecs.to_dict(),
        "seconds": {k: C.stats(v) for k, v in runs.items()},
        "per_repeat": per_repeat,
        "bare_samples_s": col("bare_samples_s"), "extract_samples_s": col("extract_samples_s"),
        "steady_samples_s": col("steady_samples_s"), "fixed_startup_s": col("fixed_s"),
        "ratio_end_to_end": col("ratio_end_to_end"), "ratio_steady": col("ratio_steady"),
        "target_ratio": TARGET, "target_met": col("ratio_steady")["median"] >= TARGET,
        "critical_path": CRITICAL,
        "stage_profile_s": profile, "stage_profile_samples": n_all, "stage_profile_shards": n_shards,
        "write_fixed_s_per_shard": write_fixed,
        "machine": m,
    }
    total = sum(profile.values())
    critical = sum(v for k, v in profile.items() if CRITICAL[k] == "critical path")
    result["critical_path_ms_per_sample"] = 1000 * critical / n_all
    result["off_critical_path_ms_per_sample"] = 1000 * (total - critical) / n_all
    md = [
        "# Extraction efficiency (item 1): `extract-teacher` end to end against the bare teacher forward",
        "",
        f"Teacher: random {p.teacher['num_hidden_layers']}-layer, {p.teacher['hidden_size']}-wide decoder "
        f"({p.teacher['num_attention_heads']} heads), CLIP {p.vision['num_hidden_layers']} x "
        f"{p.vision['hidden_size']} at {p.vision['image_size']} px, {p.grid**2} vision tokens; {n_all} samples "
        f"in {n_shards} shards, mean {tokens:.0f} tokens, batch {p.batch_size}, {args.dtype} on {args.device}; "
        f"{flops / 1e9:.1f} GFLOP per sample forward (LM head on {rows:.0f} response rows included). One Ray actor "
        f"with {args.threads} CPUs whose teacher forward runs on {forward_threads} torch thread(s); the bare forward "
        f"is the same tapped forward and LM head on the response rows under no_grad, on batches built beforehand, "
        f"on the same {forward_threads} thread(s)"
        + (f" (the worker's other {args.threads - forward_threads} CPU(s) are left to its prefetch and write "
           "threads, as beside a GPU)" if forward_threads < args.threads else "") + ". "
        f"{args.repeats} interleaved repeats, median (min-max).",
        "",
        C.md_table(["", "seconds", "samples/s", "ratio to bare forward"], [
            ["bare forward (tapped, LM head on response rows), batches in memory", C.fmt_range(result["seconds"]["bare"], 2),
             f"{col('bare_samples_s')['median']:.3f}", "1"],
            [f"extract-teacher end to end, {n_all} samples", C.fmt_range(result["seconds"]["extract"], 2),
             f"{col('extract_samples_s')['median']:.3f}", C.fmt_range(col("ratio_end_to_end"))],
            [f"extract-teacher, first shard only ({n_one} samples)", C.fmt_range(result["seconds"]["one"], 2),
             "", ""],
            ["extract-teacher steady state (marginal over the other shards)", "",
             f"{col('steady_samples_s')['median']:.3f}", C.fmt_range(col("ratio_steady"))],
        ]),
        "",
        f"Fixed start-up per job (Ray, actor, teacher load; from the two sizes): "
        f"{C.fmt_range(col('fixed_s'), 1)} s. Target: steady-state ratio >= {TARGET}: "
        f"**{'met' if result['target_met'] else 'missed'}** (median {col('ratio_steady')['median']:.3f}).",
        "",
        f"Where the time goes, one in-process pass over the same {n_all} samples (the worker's steps, no Ray; `signals` "
        "includes the LM head on the response rows, then top-k, focus and the move to numpy):",
        "",
        C.md_table(["stage", "seconds", "ms per sample", "share", "in the worker"], [
            [k, f"{v:.2f}", f"{1000 * v / n_all:.1f}", f"{v / total:.1%}", CRITICAL[k]] for k, v in profile.items()
        ] + [["total", f"{total:.2f}", f"{1000 * total / n_all:.1f}", "100%", ""]]),
        "",
        f"On the critical path: {1000 * critical / n_all:.1f} ms per sample of the {1000 * total / n_all:.1f}; the "
        "rest runs beside the forward (a prefetch thread reads and preprocesses the next batches, a shard is encoded "
        "and written while the next shard's forward runs), so a worker is bound by the forward once those fit in "
        "its other cores.",
        "",
        f"Of `write`, {1000 * write_fixed:.0f} ms per shard is fixed (an empty shard's arrays and fsyncs), so "
        f"{1000 * (profile['write'] - n_shards * write_fixed) / n_all:.1f} ms per sample at any shard size.",
        "",
        C.machine_line(m),
    ]
    name = f"extract_efficiency_{args.tag}" if args.tag else "extract_efficiency"  # benchmark 6 reads the untagged one
    C.write_results(C.results_dir(args), name, result, "\n".join(md))


if __name__ == "__main__":
    main()
