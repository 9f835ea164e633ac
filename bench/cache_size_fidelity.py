"""Benchmark 5 (issue 6): cache size per signal and codec, what each lossy codec changes in
every loss term, and (with --accuracy) in the demo's final accuracy.

Signals: the teacher's signals of one input shard are extracted once by `extract()` with
float32 and no compression (exact), read back, and written again with `write_shard` under
every codec level and lossless compressor:

    level            attention  features  logprobs      compressor: none (raw), zstd, blosc
    fp32             fp32       fp32      fp32
    fp16             fp16       fp16      fp16          ("raw fp16" = fp16 + none: the reference)
    default          uint4b     int8l44   fp16          (CodecSpec's default since issue 17, docs/codecs.md)
    8-bit            uint8      int8      fp16          (the default before it)
    4-bit            uint4      int4      fp16
    4-bit attention  uint4      int8      fp16

Sizes: bytes of each array's chunks on disk (zarr.json metadata apart; uncompressed arrays
at their own size, without Zarr's padding of a partial last chunk), per sample, grouped by
signal. Fidelity: the same student (the demo's trained Align-KD student with its trained
adapters when --demo is given) on the same batches, every loss term (L_logit, L_attn `mix`
and `mean`, L_V_all, L_V_focus, and L_sup as a control) with the decoded signals against
the float32 ones. Lossless compressors decode to the same values, so fidelity is per level.
Targets for the default: at least 4x smaller than raw fp16 in total, every term within 1%.

Projection (labelled so): bytes per sample at the paper's shapes (7B teacher: 32 heads,
D_T = 4096; 144 vision tokens; top-64; assumed lengths in bench/_common.py PAPER_DATA, and
the 2048 worst case) from the measured bytes per value and per scale row, times 1.246M
pre-training and 2M fine-tuning samples. Token ids and positions are projected at their raw
4 bytes (the demo's ~100-word vocabulary compresses far better than LLaMA's 32000 would).

--accuracy (minutes): the demo's full Align-KD student (jobs/demo/student_alignkd.toml, the
job's own settings, seeds 0 1 2) trained against a lossless cache (fp32 + zstd, extracted
here from the demo's teacher) and against the demo's default-codec cache, each evaluated on
the test split as `alignkd demo` does. Runs and the lossless cache are kept in --work and
reused when rerun.

    python bench/cache_size_fidelity.py --demo demo-out                 # sizes + fidelity
    python bench/cache_size_fidelity.py --demo demo-out --accuracy      # + demo accuracy (~6 min)
    python bench/cache_size_fidelity.py --smoke                          # random smoke models
    python bench/cache_size_fidelity.py --preset paper --teacher-layers 4 --device cuda --dtype bfloat16 --gpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LEVELS = {
    "fp32": dict(attention="fp32", features="fp32", logprobs="fp32"),
    "fp16": dict(attention="fp16", features="fp16", logprobs="fp16"),
    "default": dict(attention="uint4b", features="int8l44", logprobs="fp16"),
    "8-bit": dict(attention="uint8", features="int8", logprobs="fp16"),
    "4-bit": dict(attention="uint4", features="int4", logprobs="fp16"),
    "4-bit attention": dict(attention="uint4", features="int8", logprobs="fp16"),
}
DEFAULT = ("default", "zstd")
COMPRESSORS = ("none", "zstd", "blosc")
# Display groups of the schema's ArraySpec.signal names.
GROUPS = {"attn_L00": "attention", "vision_features": "features", "topk_logprobs": "logprobs",
          "tail_logmass": "logprobs", "topk_ids": "topk_ids", "input_ids": "tokens+index",
          "response_positions": "tokens+index", "index": "tokens+index", "focus": "focus"}
TERMS = ("logit", "attn_mix", "attn_mean", "v_all", "v_focus", "sup")


# --------------------------------------------------------------------------- sources


@dataclasses.dataclass
class Source:
    """Where the teacher, data and student come from."""

    teacher: Path
    student: Path
    shards: str  # all shards of the split (the cache holds the first one's samples)
    first_shard: str
    template: str
    max_length: int
    extract_job: Any  # ExtractArgs over first_shard
    run_dir: Path | None = None  # a trained student run (adapters), demo only


def demo_source(demo: Path, work: Path, device: str, dtype: str) -> Source:
    from alignkd.cache.reader import CacheReader
    from alignkd.config import load_job
    from alignkd.data.shards import expand_shards
    from alignkd.extract import ExtractArgs

    meta = CacheReader(demo / "cache").meta
    teacher = Path(meta.teacher.path)
    if not teacher.is_absolute() or not teacher.exists():
        teacher = demo / "teacher" / "export"
    first = expand_shards(str(demo / "data" / "train"))[0]
    job = load_job(ExtractArgs, C.REPO / "jobs" / "demo" / "extract.toml", [
        f"teacher.path={json.dumps(str(teacher))}", f"data.shards={json.dumps(first)}",
        f"teacher.device={json.dumps(device)}", f"teacher.dtype={json.dumps(dtype)}"])
    run = demo / "runs" / "alignkd-s0"
    return Source(teacher=teacher, student=run / "export" if (run / "export").is_dir() else demo / "models" / "student",
                  shards=str(demo / "data" / "train"), first_shard=first, template=meta.template,
                  max_length=meta.max_length, extract_job=job, run_dir=run if run.is_dir() else None)


def preset_source(args: argparse.Namespace) -> Source:
    work = C.workdir_from_args(args, samples_per_shard=args.samples)  # one shard
    job = C.extract_args(work, Path(args.work) / "unused", cpus_per_worker=args.threads,
                         num_cpus=None if args.device.startswith("cuda") else args.threads, dtype=args.dtype,
                         device=args.device)
    return Source(teacher=work.teacher, student=work.student, shards=str(work.train),
                  first_shard=C.first_shards(work, 1), template="plain", max_length=work.preset.max_length, extract_job=job)


# --------------------------------------------------------------------------- sizes


def write_variants(src: Source, work: Path) -> tuple[Any, list, dict[tuple[str, str], Path]]:
    """The exact signals (float32, uncompressed extraction), then one cache per (level, compressor)."""
    import shutil

    from alignkd.cache.reader import CacheReader
    from alignkd.cache.store import init_cache
    from alignkd.cache.writer import write_shard
    from alignkd.cache_schemas import CodecSpec

    exact = work / "exact"
    job = dataclasses.replace(src.extract_job, cache=dataclasses.replace(
        src.extract_job.cache, path=str(exact), codecs=CodecSpec(**LEVELS["fp32"], compressor="none")))
    C.timed_extract(job)
    reader = CacheReader(exact)
    records = [reader.get(k) for k in reader.keys()]
    (name,) = reader.shards
    skipped = [(k, r) for k, r, _ in reader.skipped()]
    caches = {}
    for level, codecs in LEVELS.items():
        for comp in COMPRESSORS:
            root = work / f"{level}-{comp}"
            shutil.rmtree(root, ignore_errors=True)
            meta = dataclasses.replace(reader.meta, codecs=CodecSpec(**codecs, compressor=comp))
            init_cache(root, meta)
            write_shard(root, name, records, skipped, meta=meta, input_shard=src.first_shard,
                        input_size=os.path.getsize(src.first_shard))
            caches[(level, comp)] = root
    return reader.meta, records, caches


def stored_bytes(cache: Path, compressed: bool) -> tuple[dict[str, int], int]:
    """Bytes per array name, and of the zarr.json metadata files. Compressed arrays: their chunk
    files on disk. Uncompressed ones: the array's own bytes, since Zarr stores a partial last
    chunk at full chunk size, padding that a small test shard would otherwise overstate (with a
    compressor, padding compresses to almost nothing)."""
    import zarr
    from alignkd.cache_schemas import SHARDS_GROUP

    arrays, meta = {}, 0
    for shard in (cache / SHARDS_GROUP).iterdir():
        if shard.name.startswith(".") or not shard.is_dir():
            continue
        meta += sum(p.stat().st_size for p in shard.rglob("zarr.json"))
        for folder in shard.iterdir():
            if not folder.is_dir():
                continue
            if compressed:
                size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json")
            else:
                size = zarr.open_array(str(folder), mode="r").nbytes
            arrays[folder.name] = arrays.get(folder.name, 0) + size
    return arrays, meta


def value_counts(records: list, meta: Any) -> dict[str, dict[str, int]]:
    """Values and scale rows of each float signal, over the samples."""
    att = [s.attention[meta.layers[0]] for s in records]
    r = sum(len(s.response_positions) for s in records)
    return {
        "attn_L00": {"values": sum(a.size for a in att), "rows": sum(a.size // a.shape[-1] for a in att if a.size)},
        "vision_features": {"values": sum(s.vision_features.size for s in records),
                            "rows": sum(s.vision_features.shape[0] for s in records)},
        "topk_logprobs": {"values": r * meta.topk, "rows": r},
        "tail_logmass": {"values": r, "rows": r},
    }


def sizes(meta: Any, records: list, caches: dict) -> dict[str, Any]:
    from alignkd.cache_schemas import SCALE_SUFFIX, shard_arrays

    specs = shard_arrays(meta)
    n = len(records)
    counts = value_counts(records, meta)
    out = {}
    for (level, comp), root in caches.items():
        arrays, metadata = stored_bytes(root, compressed=comp != "none")
        groups: dict[str, float] = {}
        per_value: dict[str, dict[str, float]] = {}
        for name, b in arrays.items():
            spec = specs.get(name)
            signal = spec.signal if spec else name
            groups[GROUPS.get(signal, signal)] = groups.get(GROUPS.get(signal, signal), 0) + b / n
            if signal in counts:
                entry = per_value.setdefault(signal, {"value_bytes": 0.0, "scale_bytes_per_row": 0.0})
                if name.endswith(SCALE_SUFFIX):
                    entry["scale_bytes_per_row"] = b / max(1, counts[signal]["rows"])
                else:
                    entry["value_bytes"] = b / max(1, counts[signal]["values"])
        out[f"{level}/{comp}"] = {"level": level, "compressor": comp, "per_sample": groups,
                                  "total_per_sample": sum(groups.values()), "metadata_bytes_per_shard": metadata,
                                  "bytes_per_value": per_value}
    raw = out["fp16/none"]["total_per_sample"]
    for v in out.values():
        v["smaller_than_raw_fp16"] = raw / v["total_per_sample"]
    return out


# --------------------------------------------------------------------------- fidelity


def student_and_adapters(src: Source, meta: Any, device: str):
    import torch
    from alignkd.checkpoint import checkpoint_dirs
    from alignkd.train import LossArgs, build_adapters
    from alignkd.models import load_vlm
    from safetensors.torch import load_file

    student = load_vlm(src.student, device=device).eval()
    torch.manual_seed(0)
    adapters = build_adapters(student, meta, LossArgs())  # every term on, the default placement and variant
    trained = "random (seed 0)"
    if src.run_dir is not None and checkpoint_dirs(src.run_dir):
        last = checkpoint_dirs(src.run_dir)[-1]
        adapters.load_state_dict(load_file(str(last / "adapters.safetensors")))
        trained = str(last)
    return student, adapters.to(device).eval(), trained


def loss_terms(src: Source, cache: Path, student, adapters, focus_k: int, batch_size: int, device: str) -> list[dict]:
    """Every term, per batch, in a fixed order (no shuffle)."""
    import torch
    from alignkd.cache.reader import CacheReader
    from alignkd.data.distill import DistillDataset, EpochSampler, StudentProcessor
    from alignkd.train import LossArgs, compute_losses
    from torch.utils.data import DataLoader

    ds = DistillDataset(shards=src.shards, cache=CacheReader(cache), processor=StudentProcessor.of(student),
                        template=src.template, max_length=src.max_length)
    loader = DataLoader(ds, batch_size=batch_size, sampler=EpochSampler(len(ds), seed=0, shuffle=False),
                        collate_fn=ds.collate)
    mix = LossArgs(focus_k=focus_k)
    mean = LossArgs(sup=0, logit=0, v_all=0, v_focus=0, attn_variant="mean")
    out = []
    with torch.no_grad():
        for batch, teacher in loader:
            batch, teacher = batch.to(device), teacher.to(device)
            terms = {k: float(v) for k, v in compute_losses(student, adapters, batch, teacher, mix).items()}
            terms["attn_mix"] = terms.pop("attn")
            terms["attn_mean"] = float(compute_losses(student, adapters, batch, teacher, mean)["attn"])
            out.append({k: terms[k] for k in TERMS})
    return out


def fidelity(src: Source, meta: Any, caches: dict, focus_k: int, batch_size: int, device: str) -> dict[str, Any]:
    student, adapters, trained = student_and_adapters(src, meta, device)
    per_level = {level: loss_terms(src, caches[(level, "zstd")], student, adapters, focus_k, batch_size, device)
                 for level in LEVELS}
    ref = per_level["fp32"]
    out = {"student": str(src.student), "adapters": trained, "batches": len(ref), "levels": {}}
    for level, batches in per_level.items():
        row = {}
        for term in TERMS:
            mean_ref = statistics.fmean(b[term] for b in ref)
            mean_lvl = statistics.fmean(b[term] for b in batches)
            per_batch = [abs(b[term] - r[term]) / abs(r[term])
                         for b, r in zip(batches, ref, strict=True) if r[term] != 0]
            row[term] = {"mean": mean_lvl, "reference": mean_ref,
                         "relative_change": abs(mean_lvl - mean_ref) / abs(mean_ref) if mean_ref else 0.0,
                         "max_batch_relative_change": max(per_batch, default=0.0)}
        out["levels"][level] = row
    return out


# --------------------------------------------------------------------------- projection


def projection(size: dict[str, Any]) -> dict[str, Any]:
    """Bytes per sample at the paper's shapes from the measured bytes per value and per row."""
    heads, d, nv, k = C.PAPER_TEACHER["num_attention_heads"], C.PAPER_TEACHER["hidden_size"], C.PAPER_NV, C.PAPER_TOPK

    def per_sample(variant: str, lq: float, r: float, tokens: float) -> dict[str, float]:
        bpv = size[variant]["bytes_per_value"]

        def signal(name: str, values: float, rows: float) -> float:
            return bpv[name]["value_bytes"] * values + bpv[name]["scale_bytes_per_row"] * rows

        return {"attention": signal("attn_L00", lq * heads * nv, lq * heads),
                "features": signal("vision_features", nv * d, nv),
                "logprobs": signal("topk_logprobs", r * k, r) + signal("tail_logmass", r, r),
                "topk_ids": 4 * r * k, "tokens+index": 4 * tokens + 4 * r + 40, "focus": 4 * nv}

    out = {}
    for case, c in C.paper_cases().items():
        variants = {v: per_sample(v, c["text_rows"], c["response_rows"], c["tokens"]) for v in size}
        out[case] = {
            **c,
            "default_estimate_bytes": sum(variants["/".join(DEFAULT)].values()),
            "default_breakdown": variants["/".join(DEFAULT)],
            "default_uncompressed_bytes": sum(variants[f"{DEFAULT[0]}/none"].values()),
            "raw_fp16_bytes": sum(variants["fp16/none"].values()),
            "lossless_fp16_zstd_bytes": sum(variants["fp16/zstd"].values()),
            "4bit_zstd_bytes": sum(variants["4-bit/zstd"].values()),
            "4bit_attention_zstd_bytes": sum(variants["4-bit attention/zstd"].values()),
            "tb": {v: sum(b.values()) * c["samples"] / 1e12 for v, b in variants.items()},
        }
    return out


# --------------------------------------------------------------------------- demo accuracy


def accuracy(args: argparse.Namespace, src: Source) -> dict[str, Any]:
    """The demo's Align-KD student, 3 seeds, on a lossless cache and on the default one."""
    from alignkd.cache_schemas import CodecSpec
    from alignkd.demo import run_students, split_eval
    from alignkd.extract import extract

    demo, work = Path(args.demo), Path(args.work) / "accuracy"
    lossless = work / "cache-lossless"
    job = dataclasses.replace(src.extract_job, data=dataclasses.replace(src.extract_job.data, shards=src.shards),
                              cache=dataclasses.replace(src.extract_job.cache, path=str(lossless),
                                                        codecs=CodecSpec(**LEVELS["fp32"], compressor="zstd")))
    extract(job, echo=print, progress=False)  # resumes: a finished cache is reused
    caches = {"lossless (fp32 + zstd)": lossless, "default (the demo's cache, its job's codecs)": demo / "cache"}
    runs: dict[str, list[Path]] = {}
    todo = []
    for label, cache in caches.items():
        tag = "lossless" if label.startswith("lossless") else "default"
        for seed in args.seeds:
            run_dir = work / f"{tag}-s{seed}"
            if tag == "default" and (demo / "runs" / f"alignkd-s{seed}" / "final.json").is_file():
                run_dir = demo / "runs" / f"alignkd-s{seed}"  # the demo's own run: same job, seed and cache
            runs.setdefault(label, []).append(run_dir)
            if not (run_dir / "final.json").is_file():
                todo.append(("student_alignkd", run_dir, [
                    f"student.path={json.dumps(str(demo / 'models' / 'student'))}", f"cache={json.dumps(str(cache))}",
                    f"data.shards={json.dumps(src.shards)}", f"eval.shards={json.dumps(str(demo / 'data' / 'val'))}",
                    f"run.dir={json.dumps(str(run_dir))}", f"run.seed={seed}"]))
    # As `alignkd demo` trains them: one torch thread each, one run per core.
    for _, run_dir in run_students(todo):
        print(f"trained {run_dir}", flush=True)
    out: dict[str, Any] = {}
    for label, dirs in runs.items():
        values = [split_eval(d / "export", demo, split="test")["accuracy"] for d in dirs]
        out[label] = {"seeds": args.seeds, "runs": [str(d) for d in dirs], "accuracy_by_seed": values,
                      "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


# --------------------------------------------------------------------------- report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", help="an `alignkd demo` folder (its teacher, data, cache and trained student)")
    ap.add_argument("--preset", choices=sorted(C.PRESETS), help="random models at a preset's shapes instead of --demo")
    ap.add_argument("--samples", type=int, default=32, help="--preset only: samples (one shard)")
    ap.add_argument("--teacher-layers", type=int)
    ap.add_argument("--student-layers", type=int, help="cut the preset's student to this many layers")
    ap.add_argument("--batch-size", type=int, default=16, help="batches of the fidelity pass")
    ap.add_argument("--accuracy", action="store_true", help="also train and evaluate demo students (minutes)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--work", default="/tmp/alignkd-bench")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.demo, args.samples, args.accuracy = "smoke", None, 8, False
    if not args.demo and not args.preset:
        ap.error("give --demo DIR (or --preset NAME for random models)")
    if args.accuracy and not args.demo:
        ap.error("--accuracy needs --demo")
    C.bench_env()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work) / ("size-demo" if args.demo else f"size-{args.preset}")
    src = demo_source(Path(args.demo), work, args.device, args.dtype) if args.demo else preset_source(args)
    meta, records, caches = write_variants(src, work)
    size = sizes(meta, records, caches)
    focus_k = min(4 if args.demo else C.PRESETS[args.preset].focus_k, meta.num_vision_tokens)
    fid = fidelity(src, meta, caches, focus_k, args.batch_size, args.device)
    proj = projection(size)
    acc = accuracy(args, src) if args.accuracy else None
    default = size["/".join(DEFAULT)]
    worst = max(fid["levels"][DEFAULT[0]][t]["relative_change"] for t in TERMS)
    m = C.machine(args.device, args.threads)
    result = {
        "benchmark": "cache_size_fidelity (issue 6, item 5)", "source": args.demo or f"preset {args.preset}",
        "teacher": str(src.teacher), "samples": len(records), "template": meta.template,
        "teacher_heads": meta.teacher.num_heads, "teacher_width": meta.teacher.hidden_size,
        "num_vision_tokens": meta.num_vision_tokens, "topk": meta.topk,
        "mean_text_rows": statistics.fmean(next(iter(s.attention.values())).shape[-2] for s in records),
        "mean_response_rows": statistics.fmean(len(s.response_positions) for s in records),
        "sizes": size, "fidelity": fid, "projection": proj, "accuracy": acc,
        "targets": {"default_smaller_than_raw_fp16": default["smaller_than_raw_fp16"], "size_target": 4.0,
                    "size_met": default["smaller_than_raw_fp16"] >= 4.0, "worst_term_change": worst,
                    "fidelity_target": 0.01, "fidelity_met": worst <= 0.01},
        "machine": m,
    }
    groups = ["attention", "features", "logprobs", "topk_ids", "tokens+index", "focus"]
    md = [
        "# Cache size and fidelity (item 5)",
        "",
        f"Source: {result['source']} (teacher {meta.teacher.num_layers} layers, {meta.teacher.num_heads} heads, "
        f"D_T = {meta.teacher.hidden_size}; {meta.num_vision_tokens} vision tokens; top-{meta.topk}); "
        f"{len(records)} samples of one shard, mean {result['mean_text_rows']:.1f} text rows and "
        f"{result['mean_response_rows']:.1f} response rows. Bytes per sample: compressed arrays as their chunks on "
        f"disk, uncompressed ones at their own size (zarr.json apart: {default['metadata_bytes_per_shard']} B "
        f"per shard).",
        "",
        C.md_table(["level", "compressor", *groups, "total", "vs raw fp16"], [
            [v["level"], v["compressor"], *(f"{v['per_sample'].get(g, 0):.0f}" for g in groups),
             f"{v['total_per_sample']:.0f}", f"{v['smaller_than_raw_fp16']:.2f}x"] for v in size.values()
        ]),
        "",
        f"Default ({' / '.join(LEVELS[DEFAULT[0]].values())} + zstd): **{default['smaller_than_raw_fp16']:.2f}x** "
        "smaller than raw fp16 "
        f"(target 4x: {'met' if result['targets']['size_met'] else 'missed'}).",
        "",
        f"Relative change of each loss term (mean over {fid['batches']} batches) with decoded signals against "
        f"float32 signals; student {fid['student']}, adapters {fid['adapters']}:",
        "",
        C.md_table(["level", *TERMS], [
            [level, *(f"{row[t]['relative_change']:.2e} (max {row[t]['max_batch_relative_change']:.1e})"
                      for t in TERMS)]
            for level, row in fid["levels"].items()
        ]),
        "",
        "Reference values (fp32): " + ", ".join(f"{t} {fid['levels']['fp32'][t]['reference']:.4g}" for t in TERMS)
        + f". Default codecs' worst term: {worst:.2e} "
        f"(target 1%: {'met' if result['targets']['fidelity_met'] else 'missed'}).",
        "",
        "## Projection to the paper's data (not measured: shapes of the 7B teacher, assumed lengths)",
        "",
        C.md_table(["data / lengths", "samples", "raw fp16 / sample", "fp16 + zstd", "default, uncompressed",
                    "default (estimate)", "4-bit attention + zstd", "TB raw fp16", "TB default",
                    "TB 4-bit attention"], [
            [k, f"{v['samples']:,}", f"{v['raw_fp16_bytes'] / 1e6:.2f} MB",
             f"{v['lossless_fp16_zstd_bytes'] / 1e6:.2f} MB",
             f"{v['default_uncompressed_bytes'] / 1e6:.2f} MB", f"{v['default_estimate_bytes'] / 1e6:.2f} MB",
             f"{v['4bit_attention_zstd_bytes'] / 1e6:.2f} MB", f"{v['tb']['fp16/none']:.2f}",
             f"{v['tb']['/'.join(DEFAULT)]:.2f}", f"{v['tb']['4-bit attention/zstd']:.2f}"]
            for k, v in proj.items()
        ]),
        "",
        "Compressed sizes use the bytes per value measured above, whose compressibility is this source's "
        f"({meta.num_vision_tokens} vision tokens); token ids and positions at 4 raw bytes.",
    ]
    if acc:
        md += ["", "## Demo accuracy (test split), full Align-KD student, lossless vs default cache", "",
               C.md_table(["cache", "accuracy (mean ± std)", "by seed"], [
                   [k, f"{v['mean']:.3f} ± {v['std']:.3f}", ", ".join(f"{x:.3f}" for x in v["accuracy_by_seed"])]
                   for k, v in acc.items()])]
    md += ["", C.machine_line(m)]
    C.write_results(C.results_dir(args), "cache_size_fidelity", result, "\n".join(md))


if __name__ == "__main__":
    main()
