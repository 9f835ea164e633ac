"""Benchmark 3 (issue 6): what reading the teacher cache costs a student step.

The same student, the same batches, the same loss terms, the same data pipeline (images
decoded, text tokenised per step), two ways: (a) each sample's teacher signals read from the
Zarr cache (what train-student does), (b) the very same signals read beforehand and held in
memory. The ratio of median step times is the cache's overhead (target: at most 1.05). Run after `alignkd demo` (it uses the
demo's cache, data and student), or point it elsewhere:

    python bench/cache_read_overhead.py [--out demo-out] [--steps 60] [--batch-size 16] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from alignkd.cache.reader import CacheReader
from alignkd.data.distill import DistillDataset, EpochSampler, StudentProcessor
from alignkd.losses import AlignKDAdapters
from alignkd.models import load_vlm
from alignkd.train import LossArgs, compute_losses

RESULTS = Path(__file__).parent / "results"


class _Preloaded:
    """Every record of a cache, read once into memory; the interface DistillDataset uses."""

    def __init__(self, cache: CacheReader):
        self.records = {key: cache.get(key) for key in cache.keys()}

    def keys(self) -> list[str]:
        return list(self.records)

    def get(self, key: str):
        return self.records[key]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="demo-out", help="an `alignkd demo` output folder")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(2)
    student = load_vlm(out / "models" / "student")
    cache = CacheReader(out / "cache")
    datasets = {
        name: DistillDataset(shards=str(out / "data" / "train"), cache=source, processor=StudentProcessor.of(student),
                             template=cache.meta.template, max_length=cache.meta.max_length)
        for name, source in (("cache", cache), ("memory", _Preloaded(cache)))
    }
    loss = LossArgs(focus_k=4)
    adapters = AlignKDAdapters(teacher_heads=cache.meta.teacher.num_heads, student_heads=student.num_heads,
                               teacher_width=cache.meta.teacher.hidden_size, student_width=student.hidden_size)
    opt = torch.optim.AdamW(list(student.parameters()) + list(adapters.parameters()), lr=1e-4)

    def loader(name: str, epoch: int):
        ds = datasets[name]
        return DataLoader(ds, batch_size=args.batch_size, sampler=EpochSampler(len(ds), seed=0, epoch=epoch),
                          collate_fn=ds.collate, num_workers=args.workers, drop_last=True)

    def step(batch, teacher) -> None:
        opt.zero_grad(set_to_none=True)
        compute_losses(student, adapters, batch, teacher, loss)["total"].backward()
        opt.step()

    def timed(batches) -> list[float]:
        times = []
        it = iter(batches)
        for _ in range(args.steps):
            t = time.perf_counter()
            batch, teacher = next(it)  # reading is part of the step
            step(batch, teacher)
            times.append(time.perf_counter() - t)
        return times

    cached, in_memory = [], []
    for r in range(args.rounds):  # interleaved, so drift in machine load hits both alike
        in_memory += timed(loader("memory", r))
        cache._chunks.items.clear()  # the cache side starts each round with cold chunk caches
        cached += timed(loader("cache", r))
    ratio = statistics.median(cached) / statistics.median(in_memory)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "threads": 2, "torch": torch.__version__}
    result = {"steps_per_round": args.steps, "rounds": args.rounds, "batch_size": args.batch_size,
              "workers": args.workers, "median_step_cached_s": statistics.median(cached),
              "median_step_in_memory_s": statistics.median(in_memory), "ratio": ratio, "machine": machine,
              "cache": str(out / "cache"), "samples": len(datasets["cache"])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cache_read_overhead.json").write_text(json.dumps(result, indent=2))
    md = (f"Cache read overhead: student step (forward, backward, AdamW) with its teacher signals read from the "
          f"cache vs the same signals held in memory (images and text processed per step in both); {args.rounds} interleaved rounds of {args.steps} steps, "
          f"batch {args.batch_size}, DataLoader workers {args.workers}; {machine['processor']}, 2 threads.\n\n"
          f"| median step, cache (s) | median step, in memory (s) | ratio (target <= 1.05) |\n|---|---|---|\n"
          f"| {result['median_step_cached_s']:.4f} | {result['median_step_in_memory_s']:.4f} | {ratio:.3f} |\n")
    (RESULTS / "cache_read_overhead.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
