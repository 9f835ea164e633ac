"""`alignkd compare RUN_DIR ...`: final metrics of several student runs side by side.

    alignkd compare demo-out/runs/*            # markdown table
    alignkd compare demo-out/runs/* --json

Each run directory holds config.json (the resolved job), final.json (the last logged step
with its evaluation) and, for distilled runs, cache.json (the cache path and fingerprint).
Runs trained against different caches are flagged, since their numbers are not comparable.
Benchmark scores sit beside the training metrics: each RUN_DIR/benchmarks/<name>/ that
`alignkd evaluate --model RUN_DIR/export --benchmark <name>` wrote (its default --out) adds a
column; scores of one benchmark whose records differ in prompt, generation settings, data
files or harness are flagged as not comparable, naming what differs.
Beside the losses, the last evaluation's diagnostics (alignkd.diagnostics): each distillation
term's share of the student's gradient and the across-image spread of the vision tokens, so
a term that is on but does nothing, or a collapsing projector, shows in the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["collect_runs", "format_markdown", "BENCHMARK_DIR"]

BENCHMARK_DIR = "benchmarks"  # RUN_DIR/benchmarks/<name>/{scores,record}.json
_RECORD_PARTS = ("prompt", "generation", "data", "harness")  # what must agree for scores to compare

_COLUMNS = ("val_accuracy", "val_loss", "sup", "logit", "attn", "v_all", "v_focus",
            "grad_share_logit", "grad_share_attn", "grad_share_v_all", "grad_share_v_focus",
            "spread_student", "spread_target", "step")


def _terms(config: dict[str, Any]) -> str:
    loss = config.get("loss", {})
    on = [t for t in ("sup", "logit", "attn", "v_all", "v_focus") if loss.get(t, 0) > 0]
    extra = []
    if "attn" in on:
        variant = loss.get("attn_variant")
        frozen = variant != "mean" and loss.get("head_mixer") == "frozen"
        extra.append(f"attn={variant}" + (" frozen mixer" if frozen else ""))
    if "v_all" in on or "v_focus" in on:
        extra.append(f"V adapter={loss.get('vision_adapter')}" + (" norm" if loss.get("vision_target_norm") else ""))
    if "v_focus" in on:
        extra.append(f"k={loss.get('focus_k')}")
    if "logit" in on and loss.get("logit_direction") == "reverse":
        extra.append("RKL")
    return "+".join(on) + (f" ({', '.join(extra)})" if extra else "")


def collect_runs(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    rows = []
    for d in map(Path, run_dirs):
        final_file = d / "final.json"
        if not final_file.is_file():
            raise FileNotFoundError(f"{d}: no final.json (not a finished run directory)")
        config = json.loads((d / "config.json").read_text())
        cache = json.loads((d / "cache.json").read_text()) if (d / "cache.json").is_file() else {}
        rows.append({"run": d.name, "path": str(d), "terms": _terms(config),
                     "seed": config.get("run", {}).get("seed"), "cache_fingerprint": cache.get("fingerprint"),
                     **json.loads(final_file.read_text()), "benchmarks": _benchmarks(d)})
    return rows


def _benchmarks(run_dir: Path) -> dict[str, dict[str, Any]]:
    """name -> {"score", "scores", "record"} for each benchmark evaluation stored in the run."""
    out = {}
    for scores_file in sorted((run_dir / BENCHMARK_DIR).glob("*/scores.json")):
        record_file = scores_file.with_name("record.json")
        scores = json.loads(scores_file.read_text())
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
        out[scores_file.parent.name] = {"score": scores.get("score"), "scores": scores, "record": record}
    return out


def _comparable(record: dict[str, Any], part: str) -> Any:
    value = record.get(part)
    if part == "data" and isinstance(value, dict):  # the same files elsewhere are the same data
        value = {k: v for k, v in value.items() if k != "root"}
    return value


def _record_differences(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    names = dict.fromkeys(n for r in rows for n in r.get("benchmarks", {}))
    for name in names:
        records = [r["benchmarks"][name]["record"] for r in rows if name in r.get("benchmarks", {})]
        differ = [part for part in _RECORD_PARTS
                  if len({json.dumps(_comparable(rec, part), sort_keys=True) for rec in records}) > 1]
        if differ:
            lines.append(f"warning: the {name} scores were made with different {', '.join(differ)}; "
                         "they are not comparable (see each record.json)")
    return lines


def format_markdown(rows: list[dict[str, Any]]) -> str:
    from alignkd.benchmarks.formats import BENCHMARKS

    cols = [c for c in _COLUMNS if any(c in r for r in rows)]
    present = {n for r in rows for n in r.get("benchmarks", {})}
    benches = [n for n in BENCHMARKS if n in present] + sorted(present - set(BENCHMARKS))
    lines = ["| run | terms | seed | " + " | ".join(benches + cols) + " |", "|" + "---|" * (3 + len(benches) + len(cols))]
    for r in rows:
        scores = [r.get("benchmarks", {}).get(n, {}).get("score") for n in benches]
        cells = [f"{v:.2f}" if isinstance(v, (int, float)) else "" for v in scores]
        cells += [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append(f"| {r['run']} | {r['terms']} | {r['seed']} | " + " | ".join(cells) + " |")
    warnings = []
    caches = {r["cache_fingerprint"] for r in rows if r["cache_fingerprint"]}
    if len(caches) > 1:
        warnings.append(f"warning: these runs used {len(caches)} different caches; their numbers are not comparable")
    warnings += _record_differences(rows)
    if warnings:
        lines += ["", *warnings]
    return "\n".join(lines)
