"""`alignkd compare RUN_DIR ...`: final metrics of several student runs side by side.

    alignkd compare demo-out/runs/*            # markdown table
    alignkd compare demo-out/runs/* --json

Each run directory holds config.json (the resolved job), final.json (the last logged step
with its evaluation) and, for distilled runs, cache.json (the cache path and fingerprint).
Runs trained against different caches are flagged, since their numbers are not comparable.
Beside the losses, the last evaluation's diagnostics (alignkd.diagnostics): each distillation
term's share of the student's gradient and the across-image spread of the vision tokens, so
a term that is on but does nothing, or a collapsing projector, shows in the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["collect_runs", "format_markdown"]

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
                     **json.loads(final_file.read_text())})
    return rows


def format_markdown(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in _COLUMNS if any(c in r for r in rows)]
    lines = ["| run | terms | seed | " + " | ".join(cols) + " |", "|" + "---|" * (3 + len(cols))]
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append(f"| {r['run']} | {r['terms']} | {r['seed']} | " + " | ".join(cells) + " |")
    caches = {r["cache_fingerprint"] for r in rows if r["cache_fingerprint"]}
    if len(caches) > 1:
        lines.append("")
        lines.append(f"warning: these runs used {len(caches)} different caches; their numbers are not comparable")
    return "\n".join(lines)
