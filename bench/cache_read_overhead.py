"""Benchmark 3 (issue 6): what reading the teacher cache costs a student step.

The same student, the same batches, the same loss terms, the same data pipeline (images
decoded and preprocessed, text tokenised per step), two ways: (a) each sample's teacher
signals read from the Zarr cache (what train-student does), (b) the very same signals read
beforehand and held in memory. The ratio of median step times is the cache's overhead
(target: at most 1.05). The rounds alternate the two, and each cache round starts with a cold
chunk cache and freshly opened shards, as a new run would.

Beside the ratio, the time spent inside `CacheReader.get` is measured per step, so the
overhead can be told from noise, and the whole step is split into its parts (reading, the
rest of the data pipeline, forward + backward + AdamW).

Run after `alignkd demo` (it uses the demo's cache, data and student), or point it elsewhere:

    python bench/cache_read_overhead.py [--out demo-out] [--steps 60] [--rounds 3] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


class _Timed:
    """A signal source whose `get` calls are timed (seconds added to `self.spent`)."""

    def __init__(self, source) -> None:
        self.source, self.spent = source, 0.0

    def keys(self) -> list[str]:
        return self.source.keys()

    def get(self, key: str, dequantise: bool = True):
        t = time.perf_counter()
        try:
            return self.source.get(key, dequantise=dequantise)
        finally:
            self.spent += time.perf_counter() - t


class _Preloaded:
    """Every record of a cache, read once into memory; the interface DistillDataset uses."""

    def __init__(self, cache) -> None:
        self.records = {key: cache.get(key, dequantise=False) for key in cache.keys()}  # as DistillDataset reads

    def keys(self) -> list[str]:
        return list(self.records)

    def get(self, key: str, dequantise: bool = False):
        return self.records[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo-out", help="an `alignkd demo` output folder")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    C.bench_env()

    import torch
    from torch.utils.data import DataLoader

    from alignkd.cache.reader import CacheReader
    from alignkd.data.distill import DistillDataset, EpochSampler, StudentProcessor
    from alignkd.models import load_vlm
    from alignkd.train import LossArgs, build_adapters, compute_losses

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    student = load_vlm(out / "models" / "student")
    meta = CacheReader(out / "cache").meta
    memory = _Timed(_Preloaded(CacheReader(out / "cache")))
    loss = LossArgs(focus_k=min(4, meta.num_vision_tokens))
    adapters = build_adapters(student, meta, loss)
    opt = torch.optim.AdamW(list(student.parameters()) + adapters.trainable(), lr=1e-4)

    def dataset(source) -> DistillDataset:
        return DistillDataset(shards=str(out / "data" / "train"), cache=source, processor=StudentProcessor.of(student),
                              template=meta.template, max_length=meta.max_length)

    def timed(source: _Timed, epoch: int) -> dict[str, list[float]]:
        ds = dataset(source)
        batches = iter(DataLoader(ds, batch_size=args.batch_size, sampler=EpochSampler(len(ds), seed=0, epoch=epoch),
                                  collate_fn=ds.collate, drop_last=True))
        parts: dict[str, list[float]] = {"step": [], "read": [], "data": [], "compute": []}
        for _ in range(args.steps):
            source.spent = 0.0
            t0 = time.perf_counter()
            batch, teacher = next(batches)  # reading is part of the step
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            compute_losses(student, adapters, batch, teacher, loss)["total"].backward()
            opt.step()
            t2 = time.perf_counter()
            parts["step"].append(t2 - t0)
            parts["read"].append(source.spent)
            parts["data"].append(t1 - t0 - source.spent)
            parts["compute"].append(t2 - t1)
        return parts

    runs: dict[str, dict[str, list[float]]] = {"cache": {}, "memory": {}}
    ratios = []
    for r in range(args.rounds):  # interleaved, so drift in machine load hits both alike
        got = {"memory": timed(memory, r), "cache": timed(_Timed(CacheReader(out / "cache")), r)}
        ratios.append(statistics.median(got["cache"]["step"]) / statistics.median(got["memory"]["step"]))
        for mode, parts in got.items():
            for part, xs in parts.items():
                runs[mode].setdefault(part, []).extend(xs)

    ratio = statistics.median(runs["cache"]["step"]) / statistics.median(runs["memory"]["step"])
    result = {
        "benchmark": "cache_read_overhead", "demo": str(out), "cache_codecs": asdict(meta.codecs),
        "samples": len(memory.keys()), "steps_per_round": args.steps, "rounds": args.rounds,
        "batch_size": args.batch_size, "loader_workers": 0,
        "median_s": {mode: {part: statistics.median(xs) for part, xs in parts.items()} for mode, parts in runs.items()},
        "ratio": ratio, "ratio_per_round": ratios, "machine": C.machine(threads=args.threads),
    }
    med = result["median_s"]
    rows = [[mode, f"{med[mode]['step'] * 1e3:.1f}", f"{med[mode]['read'] * 1e3:.2f}", f"{med[mode]['data'] * 1e3:.1f}",
             f"{med[mode]['compute'] * 1e3:.1f}"] for mode in ("cache", "memory")]
    markdown = "\n".join([
        "# Cache read overhead (benchmark 3)",
        "",
        f"A demo student's step (forward, backward, AdamW; batch {args.batch_size}) with its teacher signals read from "
        f"the cache ({out / 'cache'}) against the same signals held in memory, images and text processed per step in "
        f"both; {args.rounds} interleaved rounds of {args.steps} steps, DataLoader in the main process, cold chunk "
        "cache each round. Medians per step, milliseconds:",
        "",
        C.md_table(["signals", "step", "reading signals", "rest of the data pipeline", "forward + backward + AdamW"],
                   rows),
        "",
        f"Ratio of median steps, cache / memory: **{ratio:.3f}** (target at most 1.05); per round "
        + ", ".join(f"{x:.3f}" for x in ratios) + ".",
        "",
        C.machine_line(result["machine"]),
    ])
    C.write_results(C.RESULTS, "cache_read_overhead", result, markdown)


if __name__ == "__main__":
    main()
