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

import os
from typing import Any

from alignkd.cache.reader import CacheReader
from alignkd.cache_schemas import shard_arrays

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
    float_signals = [row for row in signals.values() if row["raw_fp16_bytes"] is not None]
    float_bytes = sum(row["bytes"] for row in float_signals)
    float_raw = sum(row["raw_fp16_bytes"] for row in float_signals)
    return {
        "path": str(reader.path),
        "schema_version": meta.schema_version,
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
    }


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
