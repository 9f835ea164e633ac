"""Benchmark 6 (issue 6): extraction throughput with 1 and 2 workers, and a cost model for
the paper's data on H100s (a projection, labelled as one).

Measured here: `extract()` end to end (local Ray, one teacher per actor, the `cpu` preset of
bench/_common.py) with each worker count in --workers, the same CPUs per worker (so two
workers have twice the machine), on the same shards. Like benchmark 1, each count also runs
over its first shards only (one per worker) so the steady-state rate
(N_all - N_first) / (t_all - t_first) is separated from the fixed start-up. Configurations
alternate within each repeat; medians with min and max.

Projected (not measured): samples/s per GPU, GPU-hours and TB written for MobileVLM V2 7B
over ShareGPT4V-PT (1.246M samples) and the 2M-sample fine-tuning set. The model:

  GPU time per sample   teacher forward FLOPs (2 x weights x tokens + attention + CLIP + LM
                        head and top-k on response rows) / (H100 bf16 dense peak x MFU); both
                        ASSUMED (--h100-tflops, --mfu) unless a GPU run of benchmark 1 measured
                        the forward's achieved FLOP/s, which is then used instead;
  CPU time per sample   from benchmark 1's stage profile (its JSON is read from the same results
                        folder): reading + decoding and tokenising + CLIP preprocessing as
                        measured (same 336 px images); the shard write (checks, compress,
                        store) per sample scaled by the number of signal values per sample,
                        plus its fixed per-shard cost spread over --shard-samples. The
                        `signals` and `quantise` stages are left out: on a GPU their work (LM
                        head, top-k, quantisation and its error stats) runs on the device, after
                        the forward, and is small beside the FLOPs above (not counted in them);
  per GPU               as TeacherWorker runs a shard (pipelined, issue 16): its prefetch thread
                        reads and preprocesses the next batches while the GPU runs the forward,
                        and a shard is written behind the next shard's forward by the actor's
                        pool of WRITERS threads (at most that many shards in flight): the
                        slowest of the three sets the pace, max(GPU, input, write / WRITERS).
                        Not modelled: the GIL the forward's kernel launches share with those
                        threads (zstd, numpy and PIL release it for their heavy parts). Beside
                        it, the stages one after another (the worker before issue 16);
  bytes                 per sample with the default codecs at each case's lengths, each array
                        compressed by the ratio benchmark 4 (codec_gradients) measured for it if
                        its JSON is there, else uncompressed (an upper bound).

    python bench/extract_scaling.py                       # bench/results/extract_scaling.{json,md}
    python bench/extract_scaling.py --repeats 5 --samples 96
    python bench/extract_scaling.py --projection-only --tag projection   # the projection alone, from benchmark 1
    python bench/extract_scaling.py --smoke
    python bench/extract_scaling.py --preset paper --teacher-layers 8 --workers 1 --cpus-per-worker 8 \\
        --device cuda --dtype bfloat16 --gpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def measure(args: argparse.Namespace, work: C.Workdir) -> dict[int, dict[str, Any]]:
    cuda = args.device.startswith("cuda")
    num_cpus = None if cuda else int(max(args.workers) * args.cpus_per_worker)
    jobs = {}
    for n in args.workers:
        common = dict(workers=n, cpus_per_worker=args.cpus_per_worker, num_cpus=num_cpus, dtype=args.dtype,
                      device=args.device)
        jobs[n] = {"all": C.extract_args(work, work.root / f"cache-w{n}-all", **common),
                   "first": C.extract_args(work, work.root / f"cache-w{n}-first", shards=C.first_shards(work, n),
                                           **common)}
    runs = {n: {"all": [], "first": []} for n in args.workers}
    samples = {n: {} for n in args.workers}
    for r in range(args.repeats):
        order = list(args.workers) if r % 2 == 0 else list(reversed(args.workers))
        for n in order:
            for part in ("all", "first"):
                wall, summary = C.timed_extract(jobs[n][part])
                runs[n][part].append(wall)
                samples[n][part] = summary.samples_written
                print(f"repeat {r}: {n} worker(s), {part:5s} {wall:7.2f} s ({summary.samples_written} samples)",
                      flush=True)
    out = {}
    for n in args.workers:
        n_all, n_first = samples[n]["all"], samples[n]["first"]
        e2e = [n_all / t for t in runs[n]["all"]]
        steady = [(n_all - n_first) / (a - f) for a, f in zip(runs[n]["all"], runs[n]["first"], strict=True) if a > f]
        out[n] = {"samples": n_all, "samples_first": n_first, "seconds_all": C.stats(runs[n]["all"]),
                  "seconds_first": C.stats(runs[n]["first"]), "end_to_end_samples_s": C.stats(e2e),
                  "steady_samples_s": C.stats(steady) if steady else None}
    return out


def signal_values(heads: int, nv: int, width: int, lq: float, r: float, k: int) -> float:
    """Float values a sample's cached signals hold: attention rows, features, top-k."""
    return lq * heads * nv + nv * width + r * (2 * k + 1)


def cost_model(args: argparse.Namespace, work: C.Workdir) -> dict[str, Any]:
    """Projection for the paper's teacher and data (see the module docstring)."""
    from alignkd.extract import SHARDS_IN_FLIGHT as WRITERS  # the actor's write threads

    eff = C.read_result(C.results_dir(args), "extract_efficiency")
    codec_study = C.read_result(C.results_dir(args), "codec_gradients")
    assumptions = {"h100_bf16_dense_tflops": args.h100_tflops, "mfu": args.mfu, "data": C.PAPER_DATA,
                   "paper_teacher": C.PAPER_TEACHER, "vision_tokens": C.PAPER_NV, "topk": C.PAPER_TOPK}
    gpu_flops = args.h100_tflops * 1e12 * args.mfu
    flops_source = f"ASSUMED: {args.h100_tflops:.0f} TFLOP/s bf16 peak x MFU {args.mfu}"
    if eff and str(eff.get("device", "")).startswith("cuda"):
        gpu_flops = eff["teacher_forward_gflop_per_sample"] * 1e9 * eff["bare_samples_s"]["median"]
        flops_source = f"MEASURED by benchmark 1 on {eff['machine'].get('gpu')}: bare forward achieved FLOP/s"
    cpu_stage = None
    if eff:
        prof, n = eff["stage_profile_s"], eff["stage_profile_samples"]
        t = eff["teacher"]
        here_lq = eff["mean_tokens_per_sample"] - 1 - eff["num_vision_tokens"]
        here = signal_values(t["num_attention_heads"], eff["num_vision_tokens"], t["hidden_size"], here_lq, here_lq,
                             work.preset.topk)
        write = prof["write"] - eff["stage_profile_shards"] * eff["write_fixed_s_per_shard"]
        cpu_stage = {"input_ms": 1000 * (prof["read_decode"] + prof["tokenise_preprocess"]) / n,
                     "write_ms": 1000 * write / n, "signal_values": here,
                     "shard_fixed_ms": 1000 * eff["write_fixed_s_per_shard"], "samples_per_shard": args.shard_samples,
                     "source": f"benchmark 1 stage profile ({eff['machine']['cpu']}, {eff['device']}, "
                               f"commit {eff['machine']['git_commit']})"}
    rows = {}
    heads, width = C.PAPER_TEACHER["num_attention_heads"], C.PAPER_TEACHER["hidden_size"]
    for case, c in C.paper_cases().items():
        lq, r = c["text_rows"], c["response_rows"]
        flops = C.forward_flops(C.PAPER_TEACHER, c["tokens"], C.PAPER_VISION, logit_rows=r, vocab=C.PAPER_VOCAB)
        gpu_s = flops / gpu_flops
        input_s = write_s = 0.0
        if cpu_stage:
            values = signal_values(heads, C.PAPER_NV, width, lq, r, C.PAPER_TOPK)
            input_s = cpu_stage["input_ms"] / 1000
            write_s = (cpu_stage["write_ms"] * values / cpu_stage["signal_values"]
                       + cpu_stage["shard_fixed_ms"] / args.shard_samples) / 1000
        cpu_s = input_s + write_s
        bytes_per_sample, bytes_source = _bytes(codec_study, c)
        seq = 1 / (gpu_s + cpu_s)
        overlap = 1 / max(gpu_s, input_s, write_s / WRITERS)  # input and write are 0 without a profile
        rows[case] = {
            **c, "teacher_tflop_per_sample": flops / 1e12, "gpu_ms_per_sample": 1000 * gpu_s,
            "cpu_ms_per_sample": 1000 * cpu_s, "input_ms_per_sample": 1000 * input_s,
            "write_ms_per_sample": 1000 * write_s, "writer_threads": WRITERS,
            "samples_s_per_gpu_sequential": seq, "samples_s_per_gpu_pipelined": overlap,
            "gpu_hours_sequential": c["samples"] / seq / 3600, "gpu_hours_pipelined": c["samples"] / overlap / 3600,
            "bytes_per_sample": bytes_per_sample, "bytes_source": bytes_source,
            "tb_written": bytes_per_sample * c["samples"] / 1e12,
        }
    return {"assumptions": assumptions, "writer_threads": WRITERS, "forward_flops_per_s": gpu_flops,
            "forward_flops_source": flops_source, "cpu_stages": cpu_stage, "rows": rows}


def _bytes(codec_study: dict | None, c: dict[str, float]) -> tuple[float, str]:
    """Bytes of one sample of paper case `c` with the default codecs: each array's stored size
    (`sample_nbytes` at the case's lengths) times the compression ratio benchmark 4
    (codec_gradients) measured for that array under the same codecs, or uncompressed where that
    benchmark has not run (an upper bound)."""
    from alignkd.cache_schemas import sample_nbytes

    meta = C.paper_meta()
    codecs = meta.codecs
    plain = sample_nbytes(meta, tokens=int(c["tokens"]), responses=round(c["response_rows"]),
                          rows=round(c["text_rows"]), vision=C.PAPER_NV)
    name = f"{codecs.attention}/{codecs.features}/{codecs.logprobs}"
    measured = ((codec_study or {}).get("projection") or {}).get(name)
    if not measured:
        return float(sum(plain.values())), f"default codecs ({name}), uncompressed (upper bound)"
    ratios = {a: v["ratio"] for a, v in measured["per_array"].items()}
    return (float(sum(b * ratios.get(a, 1.0) for a, b in plain.items())),
            f"default codecs ({name}) with benchmark 4's measured compression per array "
            f"(codec_gradients, commit {codec_study['machine']['git_commit']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=sorted(C.PRESETS))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--samples-per-shard", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--teacher-layers", type=int)
    ap.add_argument("--student-layers", type=int, help="cut the preset's student to this many layers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--h100-tflops", type=float, default=989.0, help="ASSUMED bf16 dense peak of one H100 SXM")
    ap.add_argument("--mfu", type=float, default=0.4, help="ASSUMED fraction of peak the teacher forward reaches")
    ap.add_argument("--shard-samples", type=int, default=1000, help="samples per input shard of the paper's data "
                    "(make-shards' usual size): spreads a shard's fixed write cost")
    ap.add_argument("--work", default="/tmp/alignkd-bench")
    ap.add_argument("--gpu", action="store_true",
                    help="write to bench/results/gpu/ (and read benchmarks 1 and 5 from there)")
    ap.add_argument("--projection-only", action="store_true",
                    help="skip the measurement (a one-GPU run: benchmark 1 measured the one worker there)")
    ap.add_argument("--tag", default="", help="suffix of the result files (extract_scaling_TAG), for variants")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.samples, args.samples_per_shard, args.repeats = "smoke", 8, 2, 1
    C.bench_env()
    work = C.workdir_from_args(args)
    preset = work.preset
    measured = {} if args.projection_only else measure(args, work)
    projection = cost_model(args, work)
    m = C.machine(args.device, int(args.cpus_per_worker))
    base = min(args.workers)
    result = {"benchmark": "extract_scaling (issue 6, item 6)", "preset": preset.name, "teacher": preset.teacher,
              "device": args.device, "dtype": args.dtype, "cpus_per_worker": args.cpus_per_worker,
              "repeats": args.repeats, "measured": measured, "projection": projection, "machine": m}

    def speedup(n: int, key: str) -> str:
        a, b = measured[n][key], measured[base][key]
        return f"{a['median'] / b['median']:.2f}" if a and b else "n/a"

    p = preset
    stages = projection["cpu_stages"]
    cpu_source = stages["source"] if stages else "not known (run benchmark 1 first): 0 assumed"
    md = [
        "# Extraction scaling (item 6): workers here, and a projection for the paper's data on H100s",
        "",
        f"Measured: `extract()` end to end, {p.name} preset (teacher {p.teacher['num_hidden_layers']} x "
        f"{p.teacher['hidden_size']}, {p.grid**2} vision tokens), {args.samples} samples in shards of "
        f"{args.samples_per_shard}, {args.cpus_per_worker:g} CPU(s) and torch thread(s) per worker, "
        f"{args.dtype} on {args.device}; {args.repeats} interleaved repeats, median (min-max).",
        "",
        "Not measured in this run (--projection-only)." if not measured else
        C.md_table(["workers", "seconds, all shards", "samples/s end to end", "samples/s steady state",
                    f"steady speed-up vs {base}"], [
            [n, C.fmt_range(v["seconds_all"], 1), C.fmt_range(v["end_to_end_samples_s"]),
             C.fmt_range(v["steady_samples_s"]) if v["steady_samples_s"] else "n/a", speedup(n, "steady_samples_s")]
            for n, v in measured.items()
        ]),
        "",
        "## Projection (not a measurement): MobileVLM V2 7B teacher over the paper's data, one H100 per worker",
        "",
        f"Forward throughput: {projection['forward_flops_per_s'] / 1e12:.0f} TFLOP/s "
        f"({projection['forward_flops_source']}). CPU stages: {cpu_source}. "
        f"ASSUMED sequence lengths (prefix + 144 vision + text; response rows): "
        + "; ".join(f"{k} {C.paper_tokens(v)} tokens, {v['response_tokens']} response rows"
                    for k, v in C.PAPER_DATA.items())
        + "; and the max_length 2048 worst case.",
        "",
        C.md_table(["data / lengths", "samples", "TFLOP/sample", "GPU ms", "CPU ms: input + write",
                    f"samples/s/GPU, pipelined (max of GPU, input, write / {projection['writer_threads']})", "GPU-hours, pipelined",
                    "samples/s/GPU, stages in sequence", "GPU-hours, in sequence", "bytes/sample", "TB written"], [
            [k, f"{v['samples']:,}", f"{v['teacher_tflop_per_sample']:.2f}", f"{v['gpu_ms_per_sample']:.1f}",
             f"{v['input_ms_per_sample']:.1f} + {v['write_ms_per_sample']:.1f}",
             f"{v['samples_s_per_gpu_pipelined']:.1f}", f"{v['gpu_hours_pipelined']:.1f}",
             f"{v['samples_s_per_gpu_sequential']:.1f}", f"{v['gpu_hours_sequential']:.1f}",
             f"{v['bytes_per_sample'] / 1e6:.2f} MB", f"{v['tb_written']:.2f}"]
            for k, v in projection["rows"].items()
        ]),
        "",
        "Bytes: " + "; ".join(sorted({v["bytes_source"] for v in projection["rows"].values()})) + ".",
        "",
        C.machine_line(m),
    ]
    C.write_results(C.results_dir(args), f"extract_scaling_{args.tag}" if args.tag else "extract_scaling", result,
                    "\n".join(md))


if __name__ == "__main__":
    main()
