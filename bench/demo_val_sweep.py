"""Align-KD settings tried against the demo's collapse of the student's vision tokens, on the
VALIDATION split only (the test split decides nothing).

The demo's Align-KD students lose to CE-only ones, and `demo_feature_spread.py` measured why:
L_V_all and L_V_focus pull the student's projector output towards Adapter(P^T) while the
adapter itself stays near its random start, and both shrink together. This script trains,
against a finished demo's cache, the quick variants plus the remedies that keep the method as
specified and change only a hyper-parameter:

  * a faster adapter (its own learning rate 10x and 30x the student's), so it can follow the
    student instead of dragging it;
  * the two vision terms at weight 0.1 instead of 1.0.

Each variant runs for every seed with the demo's student job and `--set` overrides, exactly
as `alignkd train-student` would, then answers the whole validation split by greedy
generation. Run after `alignkd demo --out DIR`:

    python bench/demo_val_sweep.py --out DIR [--seeds 0 1 2] [--workers 2]

Writes bench/results/demo_val_sweep.{json,md}; new runs go to DIR/val-sweep/ (the plain
variants reuse the demo's own runs of the same job and seed when they exist).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import bench_env, machine, machine_line, md_table, results_dir, write_results

VARIANTS = {  # name -> (demo job, overrides)
    "ce": ("student_ce", []),
    "logit": ("student_logit", []),
    "alignkd": ("student_alignkd", []),
    "alignkd, adapter lr 1e-2": ("student_alignkd", ["optim.adapter_lr=1e-2"]),
    "alignkd, adapter lr 3e-2": ("student_alignkd", ["optim.adapter_lr=3e-2"]),
    "alignkd, V terms x0.1": ("student_alignkd", ["loss.v_all=0.1", "loss.v_focus=0.1"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a finished `alignkd demo` folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=0, help="runs at once (0: one per core, at most 4)")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    bench_env()

    from alignkd.demo import run_students, split_eval

    out = args.out.resolve()
    for needed in ("cache", "models/student", "data/train", "data/val"):
        if not (out / needed).exists():
            raise SystemExit(f"{out / needed}: missing; run `alignkd demo --out {args.out}` first")
    common = [f"student.path={json.dumps(str(out / 'models' / 'student'))}", f"cache={json.dumps(str(out / 'cache'))}",
              f"data.shards={json.dumps(str(out / 'data' / 'train'))}",
              f"eval.shards={json.dumps(str(out / 'data' / 'val'))}"]
    todo, dirs = [], {}
    for i, (name, (job, overrides)) in enumerate(VARIANTS.items()):
        for seed in args.seeds:
            # A variant without overrides is the demo's own run of that job and seed: reuse it.
            run_dir = out / "runs" / f"{job.removeprefix('student_')}-s{seed}"
            if overrides or not (run_dir / "final.json").is_file():
                run_dir = out / "val-sweep" / f"v{i}-s{seed}"
            dirs.setdefault(name, []).append(run_dir)
            if not (run_dir / "final.json").is_file():
                todo.append((job, run_dir, [*common, *overrides, f"run.dir={json.dumps(str(run_dir))}",
                                            f"run.seed={seed}"]))
    started = time.monotonic()
    for job, run_dir in run_students(todo, args.workers):
        print(f"{job} -> {run_dir}  ({time.monotonic() - started:.0f} s)", flush=True)

    rows, result = [], {"machine": machine(threads=1), "demo": str(out), "seeds": args.seeds, "variants": {}}
    for name, run_dirs in dirs.items():
        evals = [split_eval(d / "export", out, split="val") for d in run_dirs]
        accs = [e["accuracy"] for e in evals]
        by_task = {t: statistics.fmean(e["accuracy_by_task"][t] for e in evals) for t in evals[0]["accuracy_by_task"]}
        result["variants"][name] = {"job": VARIANTS[name][0], "overrides": VARIANTS[name][1], "accuracy": accs,
                                    "by_task_mean": by_task, "questions": evals[0]["answered"]}
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append([name, f"{statistics.fmean(accs):.3f} ± {std:.3f}", ", ".join(f"{a:.3f}" for a in accs),
                     *(f"{by_task[t]:.2f}" for t in sorted(by_task))])
    tasks = sorted(next(iter(result["variants"].values()))["by_task_mean"])
    questions = next(iter(result["variants"].values()))["questions"]
    markdown = "\n".join([
        "# Align-KD remedies on the demo's validation split",
        "",
        f"Demo folder {out}; {questions} validation questions; seeds {args.seeds}; students trained "
        "one torch thread each, as `alignkd demo` does.",
        "",
        md_table(["variant", "val accuracy (mean ± std)", "by seed", *tasks], rows),
        "",
        machine_line(result["machine"]),
    ])
    write_results(results_dir(args), "demo_val_sweep", result, markdown)


if __name__ == "__main__":
    main()
