"""What a cache holds and what it costs, from its metadata alone (no signal array is read).

    report = inspect_cache("demo-out/cache")    # a JSON-ready dict
    print(format_table(report))                 # `alignkd inspect-cache PATH [--json]`

Per signal (ArraySpec.signal: a float signal counts its scale array with it; "index" is the
offsets and vision spans) the report gives the stored bytes per sample, what plain fp16 would
have taken (float signals only), their ratio (fp16 bytes / stored bytes: how many times smaller
than fp16), the codec and its error. Errors are aggregated over shards from ShardMeta: the max
of the per-shard maxima, and the mean weighted by each shard's element count (its fp16 bytes / 2).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from alignkd.cache.reader import CacheReader
from alignkd.cache.teacher_slice import read_slice_meta, slice_nbytes
from alignkd.cache_schemas import sample_nbytes, shard_arrays

__all__ = ["inspect_cache", "format_table"]


def inspect_cache(path: str | os.PathLike) -> dict[str, Any]:
    reader = CacheReader(path)
    meta = reader.meta
    specs = shard_arrays(meta)
    shards = [reader.shard_meta(name) for name in reader.shards]
    samples = sum(s.num_samples for s in shards)

    signals: dict[str, dict[str, Any]] = {}
    for spec in specs.values():  # schema order; the first array of a signal names its codec
        row = signals.setdefault(spec.signal, {"codec": spec.codec or spec.dtype, "bytes": 0, "raw_fp16_bytes": None})
        row["bytes"] += sum(s.nbytes.get(spec.name, 0) for s in shards)
    for name, row in signals.items():
        is_float = any(name in s.raw_fp16_bytes for s in shards)
        raw = sum(s.raw_fp16_bytes.get(name, 0) for s in shards) if is_float else None
        row["raw_fp16_bytes"] = raw
        row["bytes_per_sample"] = row["bytes"] / samples if samples else None
        row["raw_fp16_bytes_per_sample"] = raw / samples if samples and raw is not None else None
        row["ratio"] = raw / row["bytes"] if raw is not None and row["bytes"] else None
        errors = [(s.codec_error[name], s.raw_fp16_bytes.get(name, 0) // 2) for s in shards if name in s.codec_error]
        n = sum(count for _, count in errors)
        row["max_error"] = max((e["max"] for e, _ in errors), default=None)
        row["mean_error"] = sum(e["mean"] * count for e, count in errors) / n if n else None

    total = sum(row["bytes"] for row in signals.values())
    modes = _modes(reader, shards, samples) if samples else {}
    float_signals = [row for row in signals.values() if row["raw_fp16_bytes"] is not None]
    float_bytes = sum(row["bytes"] for row in float_signals)
    float_raw = sum(row["raw_fp16_bytes"] for row in float_signals)
    return {
        "path": str(reader.path),
        "schema_version": meta.schema_version,
        "mode": meta.signals,  # cache.signals: "cached" or "recompute"
        "teacher": {"family": meta.teacher.family, "path": meta.teacher.path, "config_hash": meta.teacher.config_hash},
        "template": meta.template,
        "layers": list(meta.layers),
        "attention_heads": meta.attention_heads,
        "topk": meta.topk,
        "num_vision_tokens": meta.num_vision_tokens,
        "compressor": "none" if meta.codecs.compressor == "none" else f"{meta.codecs.compressor}-{meta.codecs.level}",
        "created": meta.created,
        "samples": samples,
        "shards": len(shards),
        "skipped": sum(len(s.skipped) for s in shards),
        "signals": signals,
        "total": {
            "bytes": total,
            "bytes_per_sample": total / samples if samples else None,
            "float_bytes": float_bytes,
            "float_raw_fp16_bytes": float_raw,
            "float_ratio": float_raw / float_bytes if float_bytes else None,
        },
        "modes": modes,
    }


_SAMPLED_SHARDS = 16  # shards whose index arrays are read to size the mode this cache is not in


def _modes(reader: CacheReader, shards: list[Any], samples: int) -> dict[str, dict[str, Any]]:
    """Both modes' bytes for this cache's samples (issue 17 item 4): the arrays both modes
    store are measured here (same arrays, same codecs); what only the cached mode stores
    (attention, P^T, focus) is measured in a cached cache and, in a recompute one, sized by the
    schema before compression from the per-sample counts of up to 16 shards' index arrays;
    the teacher slice is measured in a recompute cache and, in a cached one, estimated from
    the teacher checkpoint's config when its folder is still at meta.teacher.path."""
    meta = reader.meta
    cached_meta = dataclasses.replace(meta, signals="cached")
    recompute_meta = dataclasses.replace(meta, signals="recompute", layers=(0,))
    both = set(shard_arrays(recompute_meta))
    measured = {name: sum(s.nbytes.get(name, 0) for s in shards) / samples for name in shard_arrays(meta)}
    shared = sum(b for name, b in measured.items() if name in both)
    if meta.signals == "cached":
        cached, cached_how = sum(measured.values()), "measured"
        slice_bytes, slice_how = _slice_estimate(meta), "estimated from the teacher's config"
    else:
        cached_how = "stored arrays measured, attention, P^T and focus as the schema sizes them before compression"
        cached = shared + _cached_only_bytes(reader, cached_meta, both)
        slice_bytes, slice_how = slice_nbytes(reader.path), "measured"
        if slice_bytes is not None:  # whether students with another tower can use it (SliceMeta.tower)
            slice_how += ", with the teacher's vision tower" if read_slice_meta(reader.path).tower else ", no vision tower"
    return {
        "cached": {"bytes_per_sample": cached, "how": cached_how},
        "recompute": {"bytes_per_sample": shared, "how": "measured: the arrays both modes store",
                      "slice_bytes": slice_bytes, "slice_how": slice_how if slice_bytes is not None else "unknown",
                      "total_bytes": shared * samples + slice_bytes if slice_bytes is not None else None},
    }


def _cached_only_bytes(reader: CacheReader, cached_meta: Any, both: set[str]) -> float:
    """Mean bytes per sample of the arrays only a cached cache stores, before compression."""
    from alignkd.cache.reader import open_shard

    names = reader.shards
    picked = names[:: max(1, len(names) // _SAMPLED_SHARDS)][:_SAMPLED_SHARDS]
    total, count = 0, 0
    for name in picked:
        shard = open_shard(reader.path, reader.meta, reader.shard_meta(name))
        ids, resp = shard.offsets["ids_offsets"], shard.offsets["resp_offsets"]
        for i in range(len(ids) - 1):
            t, start, nv = int(ids[i + 1] - ids[i]), int(shard.vision_start[i]), int(shard.vision_length[i])
            sizes = sample_nbytes(cached_meta, tokens=t, responses=int(resp[i + 1] - resp[i]),
                                  rows=t - (start + nv) if start >= 0 else 0, vision=nv)
            total += sum(b for name, b in sizes.items() if name not in both)
            count += 1
    return total / count if count else 0.0


def _slice_estimate(meta: Any) -> int | None:
    """The teacher slice a recompute cache of this teacher would hold (with its tower, the
    default, unless the job left it out), if its folder is readable."""
    from alignkd.extract import _slice_bytes
    from alignkd.models import describe_checkpoint

    try:
        ckpt = describe_checkpoint(meta.teacher.path)
    except (OSError, ValueError):
        return None
    return _slice_bytes(ckpt, meta.job.get("teacher", {}).get("dtype", "float32"),
                        meta.job.get("cache", {}).get("slice_tower", True))


def format_table(report: dict[str, Any]) -> str:
    """A plain-text summary and one line per signal."""
    t = report["teacher"]
    lines = [
        f"cache     {report['path']} (schema v{report['schema_version']}, created {report['created']})",
        f"teacher   {t['family']} {t['path']} (config {t['config_hash'][:12]})",
        f"layout    template {report['template']}, layers {report['layers']}, attention {report['attention_heads']}, "
        f"top-{report['topk']}, {report['num_vision_tokens'] or 'per-image counts of'} vision tokens, "
        f"{report['compressor']}",
        f"samples   {report['samples']} in {report['shards']} shards, {report['skipped']} skipped",
        "",
    ]
    header = ("signal", "codec", "stored/sample", "fp16/sample", "x smaller", "max error", "mean error")
    rows = [header]
    for name, r in report["signals"].items():
        rows.append((
            name, r["codec"], _bytes(r["bytes_per_sample"]), _bytes(r["raw_fp16_bytes_per_sample"]),
            _num(r["ratio"], ".2f"), _num(r["max_error"], ".3g"), _num(r["mean_error"], ".3g"),
        ))
    total = report["total"]
    rows.append(("total", "", _bytes(total["bytes_per_sample"]), "", "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]  # names left
        lines.append("  ".join(cells).rstrip())
    if total["float_ratio"] is not None:
        lines.append(f"float signals: {_bytes(total['float_bytes'])} stored vs {_bytes(total['float_raw_fp16_bytes'])} "
                     f"as fp16 ({total['float_ratio']:.2f}x smaller)")
    modes = report.get("modes")
    if modes:
        c, r = modes["cached"], modes["recompute"]
        lines += ["", f"both modes (cache.signals; this cache: {report['mode']}):",
                  f"  cached     {_bytes(c['bytes_per_sample'])}/sample ({c['how']})",
                  f"  recompute  {_bytes(r['bytes_per_sample'])}/sample ({r['how']}) + teacher slice "
                  f"{_bytes(r['slice_bytes'])} once ({r['slice_how']})"]
    return "\n".join(lines)


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)
