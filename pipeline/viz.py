"""Pictures: layer-0 text-to-vision attention over the image, and training curves.

    alignkd show-cache demo-out/cache test-000003 --out sample.png      # what the cache holds
    attention_figure(image, [("teacher", map_t), ("student", map_s)], out="attention.png")
    curves_figure({"alignkd": [run_dir, ...], "ce": [...]}, out="curves.png")

An attention map here is one (N_v,) row set of the layer-0 block: the head-mean attention
from the question's key word (its tokens' rows, averaged) to each vision token, drawn on the
token grid over the image as the model saw it (padded to square).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["attention_map", "attention_figure", "curves_figure", "show_cache"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def attention_map(block: np.ndarray, rows: list[int]) -> np.ndarray:
    """(H, Lq, Nv) or (Lq, Nv) block -> (Nv,): head mean, mean over `rows` (all rows if empty)."""
    a = block.mean(axis=0) if block.ndim == 3 else block
    picked = a[rows] if rows else a
    return picked.mean(axis=0) if len(picked) else np.zeros(a.shape[-1])


def _square(image: Image.Image) -> Image.Image:
    w, h = image.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (128, 128, 128))
    canvas.paste(image.convert("RGB"), ((side - w) // 2, (side - h) // 2))
    return canvas


def attention_figure(rows: list[tuple[Image.Image, str, list[tuple[str, np.ndarray]]]], out: str | Path,
                     *, marks: dict[tuple[int, str], list[int]] | None = None) -> Path:
    """One figure row per sample: the image, then one panel per (title, (Nv,) map) overlaid.
    `marks[(row, title)]` lists vision tokens to outline (e.g. the focus top-k)."""
    plt = _plt()
    ncols = 1 + max(len(maps) for _, _, maps in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.6 * ncols, 2.8 * len(rows)), squeeze=False)
    for r, (image, caption, maps) in enumerate(rows):
        img = np.asarray(_square(image))
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(caption, fontsize=8)
        for c, (title, amap) in enumerate(maps, start=1):
            grid = int(math.isqrt(amap.size))
            heat = np.asarray(amap[: grid * grid], dtype=np.float64).reshape(grid, grid)
            ax = axes[r, c]
            ax.imshow(img)
            ax.imshow(heat, cmap="magma", alpha=0.6, extent=(0, img.shape[1], img.shape[0], 0),
                      interpolation="nearest")
            ax.set_title(f"{title}\nmax {heat.max():.3f}", fontsize=8)
            cell = img.shape[0] / grid
            for j in (marks or {}).get((r, title), []):
                y, x = divmod(j, grid)
                ax.add_patch(plt.Rectangle((x * cell, y * cell), cell, cell, fill=False, edgecolor="cyan", lw=1.5))
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def curves_figure(runs: dict[str, list[str | Path]], out: str | Path) -> Path:
    """Each loss term, validation accuracy, each distillation term's share of the student's
    gradient and the spread of the student's vision tokens over steps (alignkd.diagnostics);
    one line per variant (seed mean)."""
    from alignkd.diagnostics import MIN_SHARE

    plt = _plt()
    metrics = ("sup", "logit", "attn", "v_all", "v_focus", "val_accuracy",
               "grad_share_logit", "grad_share_attn", "grad_share_v_all", "spread_student")
    fig, axes = plt.subplots(2, 5, figsize=(21, 7))
    for ax, metric in zip(axes.flat, metrics):
        for index, (variant, dirs) in enumerate(runs.items()):  # one colour per variant in every panel
            series: dict[int, list[float]] = {}
            for d in dirs:
                for line in (Path(d) / "metrics.jsonl").read_text().splitlines():
                    rec = json.loads(line)
                    if metric in rec:
                        series.setdefault(rec["step"], []).append(rec[metric])
            if series:
                steps = sorted(series)
                ax.plot(steps, [np.mean(series[s]) for s in steps], label=variant, color=f"C{index % 10}",
                        marker="o" if metric.startswith(("val_", "grad_share_", "spread_")) else None, ms=3)
        ax.set_title(metric)
        ax.set_xlabel("step")
        if metric in ("sup", "logit", "attn", "v_all", "v_focus"):
            ax.set_yscale("log")
        elif metric.startswith("grad_share_"):
            ax.axhline(MIN_SHARE, color="grey", lw=0.8, ls="--")  # under this a term is as good as off
            ax.set_ylim(0, 1)
    axes.flat[5].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def show_cache(cache_path: str | Path, key: str, out: str | Path, *, data: str | None = None, k: int = 4) -> Path:
    """Render a cached sample: the image, the teacher's layer-0 attention from the question's key
    word (or from all text when the record has none), and its focus with the top-k outlined."""
    from alignkd.cache.reader import CacheReader
    from alignkd.data.random_access import ShardReader
    from alignkd.data.shards import decode_sample, expand_shards

    cache = CacheReader(cache_path)
    if key not in cache:
        raise KeyError(f"{cache_path}: no sample {key!r} in the cache")
    meta = cache.meta
    shards = data or meta.job["data"]["shards"]
    sample = decode_sample(ShardReader(expand_shards(shards)).raw(key))
    if sample.image is None:
        raise ValueError(f"sample {key} has no image to draw on")
    sig = cache.get(key)
    layer = meta.layers[0]
    from alignkd.data.batching import keyword_rows
    from alignkd.models import describe_checkpoint

    # The keyword's token ids need the teacher's tokenizer; without it, fall back to all text rows.
    tokenizer = describe_checkpoint(meta.teacher.path).tokenizer if Path(meta.teacher.path).is_dir() else None
    rows = keyword_rows(sig.input_ids, sig.vision_start + sig.vision_length, sample.meta.get("keyword"), tokenizer) \
        if tokenizer is not None else []
    k = min(k, sig.focus.size)
    top = np.argsort(-sig.focus)[:k].tolist()
    word = sample.meta.get("keyword") if rows else "all text"
    maps = [(f"teacher L{layer} <- {word!r}", attention_map(sig.attention[layer], rows)),
            (f"focus (top-{k} outlined)", sig.focus)]
    question = sample.conversations[0]["value"].replace("<image>", "").strip()
    return attention_figure([(sample.image, f"{key}: {question[:40]}", maps)], out,
                            marks={(0, maps[1][0]): top})
