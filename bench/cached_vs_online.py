"""Benchmark 2 (issue 6): distillation against the teacher cache vs with the teacher online.

The same student, the same batches (one DistillDataset order), the same Align-KD terms (all
five, weights 1, `mix` attention, focus top-16, the cache's top-64 logits), the same optimiser,
two ways:

  cached   what `train-student` does: each batch's teacher signals read from the Zarr cache
           (dequantised default codecs: uint8 attention, int8 features, fp16 log-probs);
  online   what the authors' code does: the teacher loaded beside the student and run on
           every batch (its tapped forward under no_grad, top-k and focus computed from it,
           no quantisation), then the same loss.

Each mode runs in its own process (so its peak resident memory, and GPU memory where there is
a GPU, is its own), the two alternating over --repeats; the step-time ratio is taken per
repeat, side by side. Beside it: the FLOP ratio the model sizes predict (2 x weights x tokens
per forward, a student step = 3 forwards; the frozen CLIP tower forward only), for these models
and for the paper's 7B teacher / 1.7B student.

Then the cost of N ablation runs (1 epoch each over the same samples) each way: one extraction
plus N cached runs against N online runs, for N = 1, 5, 10, from this run's measurements:
extraction at its steady-state rate (the fixed start-up, also measured, is amortised by any
real data set) and at its end-to-end rate over these few samples.

    python bench/cached_vs_online.py                     # bench/results/cached_vs_online.{json,md}
    python bench/cached_vs_online.py --repeats 5 --samples 96
    python bench/cached_vs_online.py --smoke
    python bench/cached_vs_online.py --preset paper --teacher-layers 8 --student-layers 6 \\
        --device cuda --dtype bfloat16 --loader-workers 4 --gpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NS = (1, 5, 10)


# --------------------------------------------------------------------------- one mode, in a child process


def online_signals(teacher, batch, topk: int):
    """The teacher's signals for this batch, straight from its forward (no cache, no codec)."""
    import torch
    from alignkd.data.distill import TeacherBatch
    from alignkd.signals import topk_with_tail

    with torch.no_grad():
        out = teacher(batch.to(teacher.device, dtype=teacher.dtype), tap_layers=(0,))
        block = out.blocks[0]
        resp = batch.response_mask.clone()
        resp[:, 0] = False
        b, t = resp.nonzero(as_tuple=True)
        ids, lp, tail = topk_with_tail(teacher.logits(out.hidden[b, t - 1]), topk)
        image = batch.vision_start >= 0
        feats = torch.zeros(len(batch.keys), batch.num_vision_tokens, teacher.hidden_size, device=teacher.device)
        feats[image] = out.vision_features.float()
        probs = block.probs.float()
        return TeacherBatch(attention={0: probs}, query_mask=block.query_mask, vision_features=feats,
                            focus=probs.mean(dim=1).sum(dim=1), image_mask=image, topk_ids=ids, topk_logprobs=lp,
                            tail_logmass=tail,
                            vision_mask=image[:, None].expand(-1, batch.num_vision_tokens))  # one fixed grid


def _vm_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace, work: C.Workdir, mode: str) -> dict:
    import torch
    from alignkd.cache.reader import CacheReader
    from alignkd.data.distill import DistillDataset, EpochSampler, StudentProcessor
    from alignkd.models import load_vlm
    from alignkd.train import LossArgs, build_adapters, compute_losses
    from torch.utils.data import DataLoader

    torch.set_num_threads(args.threads)
    rss_after_imports = _vm_rss_mib()
    device, p = args.device, work.preset
    student = load_vlm(work.student, dtype=torch.float32, device=device)  # master weights, as train.py
    student.train()
    teacher = load_vlm(work.teacher, dtype=getattr(torch, args.dtype), device=device) if mode == "online" else None
    cache = CacheReader(args.cache_dir)
    meta = cache.meta
    dataset = DistillDataset(shards=str(work.train), cache=cache if mode == "cached" else None,
                             processor=StudentProcessor.of(student), template="plain", max_length=p.max_length)
    loss = LossArgs(focus_k=p.focus_k)
    adapters = build_adapters(student, meta, loss).to(device)
    params = [q for q in student.parameters() if q.requires_grad] + adapters.trainable()
    opt = torch.optim.AdamW(params, lr=1e-5)
    bf16 = args.dtype == "bfloat16"
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else nullcontext()
    loader = DataLoader(dataset, batch_size=p.batch_size, sampler=EpochSampler(len(dataset), seed=0),
                        collate_fn=dataset.collate, num_workers=args.loader_workers, drop_last=True)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, it = [], iter(loader)
    while True:
        t = time.perf_counter()
        try:
            batch, teacher_batch = next(it)  # reading (and, cached, the cache) is part of the step
        except StopIteration:
            break
        batch = batch.to(device)
        teacher_batch = online_signals(teacher, batch, meta.topk) if mode == "online" else teacher_batch.to(device)
        opt.zero_grad(set_to_none=True)
        with autocast:
            total = compute_losses(student, adapters, batch, teacher_batch, loss)["total"]
        total.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    timed = times[args.warmup :]
    out = {"mode": mode, "steps": len(times), "timed_steps": len(timed), "median_step_s": statistics.median(timed),
           "step_s": timed, "peak_rss_mib": C.peak_rss_mib(), "rss_after_imports_mib": rss_after_imports}
    if cuda:
        out["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


# --------------------------------------------------------------------------- the parent: cache, alternation, report


def predicted_ratio(teacher: dict, student: dict, vision: dict, tokens: float, rows: float, vocab: int) -> dict:
    """FLOPs per sample of a cached step (student forward + backward = 3 forwards of the
    decoder and LM head, CLIP forward only: it is frozen) and of an online one (plus a teacher
    forward, its own CLIP pass included)."""
    s = 3 * C.forward_flops(student, tokens, None, rows, vocab) + C.clip_flops(vision)
    t = C.forward_flops(teacher, tokens, vision, rows, vocab)
    return {"student_step_gflop": s / 1e9, "teacher_forward_gflop": t / 1e9, "ratio": (s + t) / s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=sorted(C.PRESETS))
    ap.add_argument("--samples", type=int, default=64, help="samples per run (steps = samples / batch)")
    ap.add_argument("--samples-per-shard", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="first steps of each run left out of the timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loader-workers", type=int, default=0)
    ap.add_argument("--teacher-layers", type=int)
    ap.add_argument("--student-layers", type=int)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="teacher weights; bfloat16 also turns on bf16 autocast for the student (fp32 master)")
    ap.add_argument("--work", default="/tmp/alignkd-bench")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--child", choices=["cached", "online"], help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.samples, args.samples_per_shard, args.repeats = "smoke", 16, 8, 1
    C.bench_env()
    work = C.workdir_from_args(args)
    preset = work.preset
    if args.child:
        print(json.dumps(child(args, work, args.child)))
        return

    # One extraction builds the cache (and is timed: the cached side pays for it), plus one over
    # the first shard to separate the fixed start-up from the per-sample rate.
    cuda = args.device.startswith("cuda")
    common = dict(cpus_per_worker=args.threads, num_cpus=None if cuda else args.threads, dtype=args.dtype,
                  device=args.device)
    cache = work.root / "cache-online-bench"
    ext_all, summary = C.timed_extract(C.extract_args(work, cache, **common))
    ext_one, one = C.timed_extract(C.extract_args(work, work.root / "cache-online-bench-one",
                                                  shards=C.first_shards(work, 1), **common))
    n = summary.samples_written
    steady = (n - one.samples_written) / (ext_all - ext_one) if ext_all > ext_one else n / ext_all
    print(f"extraction: {n} samples in {ext_all:.1f} s (first shard {ext_one:.1f} s), steady {steady:.3f} samples/s")

    runs: dict[str, list[dict]] = {"cached": [], "online": []}
    for r in range(args.repeats):
        for mode in (("cached", "online") if r % 2 == 0 else ("online", "cached")):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", mode, "--cache-dir", str(cache)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
            runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            x = runs[mode][-1]
            print(f"repeat {r}: {mode:6s} median step {x['median_step_s']:.3f} s, peak RSS {x['peak_rss_mib']:.0f} MiB",
                  flush=True)

    def col(mode: str, key: str) -> dict:
        return C.stats([x[key] for x in runs[mode]])

    pairs = zip(runs["cached"], runs["online"], strict=True)  # repeat by repeat
    ratios = C.stats([o["median_step_s"] / c["median_step_s"] for c, o in pairs])
    bs, p = preset.batch_size, preset
    # Token counts of these samples, from the cache (real tokens and response rows per sample).
    from alignkd.cache.reader import CacheReader

    reader = CacheReader(cache)
    recs = [reader.get(k) for k in reader.keys()]
    tokens = statistics.fmean(len(s.input_ids) for s in recs)
    rows = statistics.fmean(len(s.response_positions) for s in recs)
    here = predicted_ratio(p.teacher, p.student, p.vision, tokens, rows, p.vocab_size)
    paper = C.PAPER_DATA["pretrain"]
    paper_pred = predicted_ratio(C.PAPER_TEACHER, C.PRESETS["paper"].student, C.PAPER_VISION, C.paper_tokens(paper),
                                 paper["response_tokens"], C.PAPER_VOCAB)

    # Cost of N one-epoch runs over these samples, seconds per 1000 samples.
    c_s = col("cached", "median_step_s")["median"] / bs * 1000
    o_s = col("online", "median_step_s")["median"] / bs * 1000
    costs = []
    for label, ext in (("steady-state extraction", 1000 / steady), (f"end-to-end extraction of {n} samples",
                                                                       ext_all / n * 1000)):
        for k in NS:
            cached_total, online_total = ext + k * c_s, k * o_s
            costs.append({"extraction": label, "runs": k, "cached_s_per_1000": cached_total,
                          "online_s_per_1000": online_total, "online_over_cached": online_total / cached_total})
    m = C.machine(args.device, args.threads)
    result = {
        "benchmark": "cached_vs_online (issue 6, item 2)", "preset": p.name, "teacher": p.teacher,
        "student": p.student, "vision": p.vision, "samples": n, "batch_size": bs, "repeats": args.repeats,
        "warmup_steps": args.warmup, "loader_workers": args.loader_workers, "device": args.device, "dtype": args.dtype,
        "mean_tokens": tokens, "mean_response_rows": rows, "codecs": reader.meta.codecs.to_dict(),
        "extraction": {"seconds_all": ext_all, "seconds_first_shard": ext_one, "samples": n,
                       "samples_first_shard": one.samples_written, "steady_samples_s": steady},
        "runs": runs, "step_ratio_online_over_cached": ratios,
        "step_s": {mode: col(mode, "median_step_s") for mode in runs},
        "peak_rss_mib": {mode: col(mode, "peak_rss_mib") for mode in runs},
        "rss_after_imports_mib": {mode: col(mode, "rss_after_imports_mib") for mode in runs},
        "predicted_flop_ratio": here, "predicted_flop_ratio_paper": paper_pred, "ablation_costs": costs,
        "machine": m,
    }
    gpu_rows = []
    if cuda:
        gpu = result["gpu_peak_allocated_gib"] = {mode: col(mode, "gpu_peak_allocated_gib") for mode in runs}
        gpu_rows = [["peak GPU memory allocated (GiB)", C.fmt_range(gpu["cached"], 2), C.fmt_range(gpu["online"], 2),
                     f"{gpu['online']['median'] / gpu['cached']['median']:.2f}"]]
    rss = result["peak_rss_mib"]
    md = [
        "# Cached against online distillation (item 2)",
        "",
        f"Student {p.student['num_hidden_layers']} x {p.student['hidden_size']}, teacher "
        f"{p.teacher['num_hidden_layers']} x {p.teacher['hidden_size']} (random weights, {p.grid**2} vision tokens, "
        f"CLIP {p.vision['num_hidden_layers']} x {p.vision['hidden_size']} at {p.vision['image_size']} px); "
        f"{n} samples "
        f"(mean {tokens:.0f} tokens, {rows:.0f} response rows), batch {bs}, all five Align-KD terms, AdamW; "
        f"teacher {args.dtype}, student fp32{' + bf16 autocast' if args.dtype == 'bfloat16' else ''} on {args.device}, "
        f"{args.threads} threads, DataLoader workers {args.loader_workers}. Each mode in its own process, "
        f"{args.repeats} alternating repeats, first {args.warmup} step(s) of each left out; median (min-max).",
        "",
        C.md_table(["", "cached", "online", "online / cached"], [
            ["step time (s)", C.fmt_range(result["step_s"]["cached"]), C.fmt_range(result["step_s"]["online"]),
             C.fmt_range(ratios, 2)],
            ["peak RSS (MiB)", C.fmt_range(rss["cached"], 0), C.fmt_range(rss["online"], 0),
             f"{rss['online']['median'] / rss['cached']['median']:.2f}"],
            *gpu_rows,
            ["FLOPs per sample predicted by model sizes (GFLOP)", f"{here['student_step_gflop']:.1f}",
             f"{here['student_step_gflop'] + here['teacher_forward_gflop']:.1f}", f"{here['ratio']:.2f}"],
        ]),
        "",
        f"RSS right after imports, before any model: {result['rss_after_imports_mib']['cached']['median']:.0f} MiB. "
        f"The same FLOP prediction at the paper's sizes (7B teacher, 1.7B student, {C.paper_tokens(paper)} tokens, "
        f"{paper['response_tokens']} response rows): online / cached = **{paper_pred['ratio']:.2f}**.",
        "",
        f"Extraction in this run: {n} samples in {ext_all:.1f} s end to end (first shard alone {ext_one:.1f} s), "
        f"steady state {steady:.3f} samples/s. Total cost of N one-epoch runs over the same data, seconds per "
        f"1000 samples (cached = one extraction + N cached runs; online = N online runs):",
        "",
        C.md_table(["extraction counted at", "N", "cached", "online", "online / cached"], [
            [c["extraction"], c["runs"], f"{c['cached_s_per_1000']:.0f}", f"{c['online_s_per_1000']:.0f}",
             f"{c['online_over_cached']:.2f}"] for c in costs
        ]),
        "",
        C.machine_line(m),
    ]
    C.write_results(C.results_dir(args), "cached_vs_online", result, "\n".join(md))


if __name__ == "__main__":
    main()
