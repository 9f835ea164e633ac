"""Align-KD placements and attention forms compared on the demo's VALIDATION split only (the
test split decides nothing): the candidates for the defaults of issue 13.

  * the vision adapter: on the student side (a regressor onto the fixed teacher features,
    FitNets), on the teacher side frozen at its seeded init (what the released code
    effectively ran), or on the teacher side trained with the student (collapses);
    optionally with per-token standardised targets;
  * the attention term: the per-head KL of vision-renormalised rows (`mix_kl`), the head-mean
    KL (`mean`), or the paper's raw MSE (`mix_mse`);
  * the baselines, CE only and CE + logit KD.

Each variant runs for every seed with the demo's student job and `--set` overrides, exactly
as `alignkd train-student` would, and is then evaluated on the whole validation split in its
own process. Differences to CE only are paired by seed (same student start and data order).
Run after `alignkd demo --out DIR`:

    python bench/demo_val_sweep.py --out DIR [--seeds 0 1 2] [--workers 2] [--only NAME ...]

Writes bench/results/demo_val_sweep.{json,md}; new runs go to DIR/val-sweep/ (a variant
without overrides reuses the demo's own run of the same job and seed when it exists).
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
    "alignkd (student regressor, mix_kl)": ("student_alignkd", []),
    "alignkd, student regressor, normalised target": ("student_alignkd", ["loss.vision_target_norm=true"]),
    "alignkd, teacher_frozen adapter": ("student_alignkd", ["loss.vision_adapter=teacher_frozen"]),
    "alignkd, trained teacher adapter": ("student_alignkd", ["loss.vision_adapter=teacher"]),
    "alignkd, attention mean": ("student_alignkd", ["loss.attn_variant=mean"]),
    "alignkd without the logit term": ("student_alignkd", ["loss.logit=0.0"]),
    "alignkd as the paper's code ran": ("student_alignkd_paper", []),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a finished `alignkd demo` folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=0, help="runs at once (0: one per core, at most 4)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="these variants only (names as in VARIANTS; CE only is always kept for the pairing)")
    parser.add_argument("--overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="--set items for every run (e.g. a student budget being chosen)")
    parser.add_argument("--tag", default="", help="names the sweep's run folder and result files (with --overrides)")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    bench_env()

    from alignkd.demo import split_result, paired_difference, run_students

    out = args.out.resolve()
    for needed in ("cache", "models/student", "data/train", "data/val"):
        if not (out / needed).exists():
            raise SystemExit(f"{out / needed}: missing; run `alignkd demo --out {args.out}` first")
    common = [f"student.path={json.dumps(str(out / 'models' / 'student'))}", f"cache={json.dumps(str(out / 'cache'))}",
              f"data.shards={json.dumps(str(out / 'data' / 'train'))}",
              f"eval.shards={json.dumps(str(out / 'data' / 'val'))}"]
    unknown = sorted(set(args.only or []) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--only: unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    chosen = {n: v for n, v in VARIANTS.items() if args.only is None or n in args.only or n == "ce"}
    sweep = out / ("val-sweep" + (f"-{args.tag}" if args.tag else ""))
    todo, dirs = [], {}
    for i, (name, (job, overrides)) in enumerate(VARIANTS.items()):
        if name not in chosen:
            continue
        overrides = [*overrides, *args.overrides]
        for seed in args.seeds:
            # A variant without overrides is the demo's own run of that job and seed: reuse it.
            run_dir = out / "runs" / f"{job.removeprefix('student_')}-s{seed}"
            if overrides or not (run_dir / "final.json").is_file():
                run_dir = sweep / f"v{i}-s{seed}"
            dirs.setdefault(name, []).append(run_dir)
            if not (run_dir / "final.json").is_file():
                todo.append((job, run_dir, [*common, *overrides, f"run.dir={json.dumps(str(run_dir))}",
                                            f"run.seed={seed}"]))
    started = time.monotonic()
    for job, run_dir in run_students(todo, args.workers, evaluate_on=out / "data" / "val"):
        print(f"{job} -> {run_dir}  ({time.monotonic() - started:.0f} s)", flush=True)

    rows, result = [], {"machine": machine(threads=1), "demo": str(out), "seeds": args.seeds,
                        "overrides": args.overrides, "seconds": time.monotonic() - started, "variants": {}}
    ce = None
    for name, run_dirs in dirs.items():
        evals = [split_result(d / "export", out / "data" / "val", d / "val.json") for d in run_dirs]
        accs = [e["accuracy"] for e in evals]
        ce = accs if name == "ce" else ce
        paired = paired_difference(accs, ce) if name != "ce" and len(accs) > 1 else None
        by_task = {t: statistics.fmean(e["accuracy_by_task"][t] for e in evals) for t in evals[0]["accuracy_by_task"]}
        final = [json.loads((d / "final.json").read_text()) for d in run_dirs]
        diag = {k: statistics.fmean(f[k] for f in final) for k in ("grad_share_attn", "grad_share_v_all",
                                                                   "spread_student") if all(k in f for f in final)}
        result["variants"][name] = {"job": VARIANTS[name][0], "overrides": VARIANTS[name][1], "accuracy": accs,
                                    "by_task_mean": by_task, "questions": evals[0]["answered"], "vs_ce": paired,
                                    "final_diagnostics": diag}
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append([name, f"{statistics.fmean(accs):.3f} ± {std:.3f}",
                     f"{paired['mean']:+.3f} [{paired['ci95_low']:+.3f}, {paired['ci95_high']:+.3f}]" if paired else "",
                     ", ".join(f"{a:.3f}" for a in accs), *(f"{by_task[t]:.2f}" for t in sorted(by_task)),
                     *(f"{diag[k]:.3g}" if k in diag else "" for k in ("grad_share_attn", "grad_share_v_all",
                                                                       "spread_student"))])
    tasks = sorted(next(iter(result["variants"].values()))["by_task_mean"])
    questions = next(iter(result["variants"].values()))["questions"]
    markdown = "\n".join([
        "# Align-KD placements and attention forms on the demo's validation split",
        "",
        f"Demo folder {out}; {questions} validation questions; seeds {args.seeds}; students trained "
        "one torch thread each, as `alignkd demo` does" + (f", with {' '.join(args.overrides)}" if args.overrides
                                                           else "") + ". Diagnostics at the last step.",
        "",
        md_table(["variant", "val accuracy (mean ± std)", "minus CE, paired [95%]", "by seed", *tasks,
                  "grad share attn", "grad share V_all", "spread student"], rows),
        "",
        machine_line(result["machine"]),
    ])
    write_results(results_dir(args), "demo_val_sweep" + (f"_{args.tag}" if args.tag else ""), result, markdown)


if __name__ == "__main__":
    main()
