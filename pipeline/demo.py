"""`alignkd demo`: the whole pipeline on the embedded default, on CPU, from nothing.

    alignkd demo                      # quick: CE-only, CE + logit KD and full Align-KD students, 3 seeds
    alignkd demo --full               # + every ablation job in jobs/demo/
    alignkd demo --out elsewhere/

Steps, each reusing what an earlier run already wrote (delete a folder to redo it):
  1. data      the synthetic shapes set (train / val / test shards);
  2. models    tiny MobileVLM-layout teacher and student checkpoints (random init, one shared
               frozen toy CLIP tower, as the 7B and 1.7B share one CLIP);
  3. teacher   jobs/demo/teacher.toml: the teacher trained with L_sup alone until it answers;
  4. extract   jobs/demo/extract.toml: the teacher's signals cached once;
  5. students  jobs/demo/student_*.toml (and ablate_*.toml with --full), each seed against
               that one cache, from the same random student; one run per CPU core at
               a time (`workers`), each on one torch thread;
  6. report    test-split accuracy per variant (mean and std over seeds), the teacher's, an
               image-blind teacher's and chance; results.md / results.json, curves.png,
               attention.png.

Every stage goes through the same job files and library entry points the CLI commands use;
paths are pointed at --out with the same dotted overrides a user would pass.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkd.config import load_job
from alignkd.data.synthetic import make_demo_data
from alignkd.evaluate import EvalArgs, evaluate_model
from alignkd.models import load_vlm
from alignkd.models.tiny import write_tiny_models

__all__ = ["JOBS_DIR", "DemoArgs", "run_demo", "run_students", "split_eval"]

JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs" / "demo"
QUICK = ("student_ce", "student_logit", "student_alignkd")
CHANCE = {"colour": 1 / 6, "shape": 1 / 4, "position": 1 / 9, "count": 1 / 4}


@dataclass
class DemoArgs:
    """Sizes of the demo; the defaults are the documented quick run, tests shrink them."""

    seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_train: int = 4000
    n_val: int = 200
    n_test: int = 400
    full: bool = False
    overrides: dict[str, list[str]] = field(default_factory=dict)  # job name -> extra --set items
    attention_samples: int = 4
    workers: int = 0  # student runs at once; 0 = one per CPU core (at most 4)


def _job(name: str) -> Path:
    path = JOBS_DIR / f"{name}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: demo job not found (run the demo from a source checkout)")
    return path


def _student_jobs(full: bool) -> list[str]:
    ablations = sorted(p.stem for p in JOBS_DIR.glob("ablate_*.toml")) if full else []
    return [*QUICK, *ablations]


def _workers(requested: int) -> int:
    if requested < 0:
        raise ValueError(f"workers: expected 0 (one per CPU core) or more, got {requested}")
    return requested or max(1, min(4, os.cpu_count() or 1))


def _student(name: str, run_dir: Path, overrides: list[str]) -> None:
    """One student run, as `alignkd train-student --job jobs/demo/<name>.toml --set ...` would do;
    a failure is a RuntimeError naming the job and the run folder.

    Each run uses one torch thread. A tiny student gains little from a second thread
    (measured: 250 CE steps, start-up included, 17.8 s on 2 threads and 18.8 s on 1), so one
    student per core is what fills a machine; and float reductions depend on the thread
    count, so pinning it makes the table the same on any machine, whatever its cores or
    `workers`.
    """
    import torch

    from alignkd.train import TrainArgs, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_job(TrainArgs, _job(name), overrides), echo=lambda _: None, progress=False)
    except Exception as e:
        raise RuntimeError(f"train-student {name} -> {run_dir} failed: {e}") from e
    finally:
        torch.set_num_threads(threads)


def run_students(todo: list[tuple[str, Path, list[str]]], workers: int = 0) -> Iterator[tuple[str, Path]]:
    """Train every (job name, run dir, overrides) in `todo`, `workers` at a time (0: one per
    CPU core, at most 4) in separate processes (in this one when workers is 1), yielding each
    as it finishes. Runs with more
    distillation terms start first, as they take longest (in the quick demo, two at a time:
    about 54 s for full Align-KD, 50 s for CE + logit, 49 s for CE-only), so that the last
    round is a short run. A failed run stops the demo with its job and folder named; finished
    runs keep their final.json and interrupted ones resume from their last checkpoint on the
    next `alignkd demo`."""
    workers = _workers(workers)
    todo = sorted(todo, key=lambda run: -_distill_terms(run[0], run[2]))  # stable: ties keep their order
    if workers == 1 or len(todo) <= 1:
        for name, run_dir, overrides in todo:
            _student(name, run_dir, overrides)
            yield name, run_dir
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads / Ray
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_student, name, run_dir, overrides): (name, run_dir)
                   for name, run_dir, overrides in todo}
        try:
            for future in as_completed(futures):
                future.result()  # re-raises the run's RuntimeError
                yield futures[future]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _distill_terms(name: str, overrides: list[str]) -> int:
    from alignkd.train import TrainArgs

    loss = load_job(TrainArgs, _job(name), overrides).loss
    return sum(weight > 0 for weight in (loss.logit, loss.attn, loss.v_all, loss.v_focus))


def run_demo(out: str | Path, args: DemoArgs | None = None, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    from alignkd.extract import ExtractArgs, extract
    from alignkd.train import TrainArgs, train

    args = args or DemoArgs()
    workers = _workers(args.workers)  # a bad value fails before any work
    out = Path(out)
    data, models, started = out / "data", out / "models", time.monotonic()
    jobs = _student_jobs(args.full)
    total = 5 + len(jobs) * len(args.seeds)
    n = 0

    def stage(text: str) -> None:
        nonlocal n
        n += 1
        echo(f"[{n}/{total}] {text}  ({time.monotonic() - started:.0f} s)")

    # 1-2. data and untrained models
    stage(f"data -> {data}")
    if not (data / "demo_data.json").is_file():
        make_demo_data(data, seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    stage(f"tiny models -> {models}")
    if not (models / "student" / "config.json").is_file():
        write_tiny_models(models, family="mobilevlm", tokenizer="word", seed=args.seed)

    paths = [f"data.shards={json.dumps(str(data / 'train'))}", f"eval.shards={json.dumps(str(data / 'val'))}"]

    # 3. the teacher, trained once
    teacher_dir = out / "teacher"
    stage(f"teacher (L_sup only) -> {teacher_dir}")
    if not (teacher_dir / "export" / "config.json").is_file():
        job = load_job(TrainArgs, _job("teacher"), [
            f"student.path={json.dumps(str(models / 'teacher'))}", *paths,
            f"run.dir={json.dumps(str(teacher_dir))}", *args.overrides.get("teacher", [])])
        train(job, echo=echo)
    teacher = teacher_dir / "export"

    # 4. one extraction
    cache = out / "cache"
    stage(f"extract-teacher -> {cache}")
    extract(load_job(ExtractArgs, _job("extract"), [
        f"teacher.path={json.dumps(str(teacher))}", f"data.shards={json.dumps(str(data / 'train'))}",
        f"cache.path={json.dumps(str(cache))}", *args.overrides.get("extract", [])]), echo=echo)

    # 5. students against the fixed cache, several at once (each on one thread; see _student)
    runs: dict[str, list[Path]] = {}
    todo: list[tuple[str, Path, list[str]]] = []
    for name in jobs:
        variant = name.removeprefix("student_")
        for seed in args.seeds:
            run_dir = out / "runs" / f"{variant}-s{seed}"
            runs.setdefault(variant, []).append(run_dir)
            if (run_dir / "final.json").is_file():
                stage(f"train-student {name} seed {seed} -> {run_dir} (done earlier)")
                continue
            todo.append((name, run_dir, [
                f"student.path={json.dumps(str(models / 'student'))}", f"cache={json.dumps(str(cache))}", *paths,
                f"run.dir={json.dumps(str(run_dir))}", f"run.seed={seed}", *args.overrides.get("student", [])]))
    if todo:
        echo(f"{len(todo)} student runs, {min(workers, len(todo))} at a time, one torch thread each  "
             f"({time.monotonic() - started:.0f} s)")
    for name, run_dir in run_students(todo, workers):
        stage(f"train-student {name} -> {run_dir}")

    # 6. report
    stage("evaluate on the test split, write the report")
    report = _report(out, teacher, runs, args)
    report["seconds"] = time.monotonic() - started
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(_markdown(report))
    _pictures(out, teacher, runs, args)
    echo(_markdown(report))
    return report


def split_eval(model: Path, out: Path, split: str = "test", **kw: Any) -> dict[str, Any]:
    """Accuracy and loss of a model folder on one split of the demo folder `out`, every sample."""
    vlm = load_vlm(model)
    return evaluate_model(vlm, EvalArgs(shards=str(out / "data" / split), max_samples=100_000, **kw),
                          template="v1", max_length=512)


def _report(out: Path, teacher: Path, runs: dict[str, list[Path]], args: DemoArgs) -> dict[str, Any]:
    t = split_eval(teacher, out)
    blind = split_eval(teacher, out, blank_images=True)
    # chance = expected accuracy of uniform guessing, weighted by how often each task occurs
    per_task_n = t["answered_by_task"]
    chance = sum(CHANCE.get(k, 0) * v for k, v in per_task_n.items()) / max(1, sum(per_task_n.values()))
    variants = {}
    for variant, dirs in runs.items():
        accs = [split_eval(d / "export", out) for d in dirs]
        values = [a["accuracy"] for a in accs]
        variants[variant] = {
            "seeds": len(values),
            "accuracy_mean": statistics.fmean(values),
            "accuracy_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "accuracy_by_seed": values,
            "by_task_mean": {k: statistics.fmean(a["accuracy_by_task"][k] for a in accs)
                             for k in accs[0]["accuracy_by_task"]},
            "test_loss_mean": statistics.fmean(a["loss"] for a in accs),
        }
    return {"teacher": {"accuracy": t["accuracy"], "by_task": t["accuracy_by_task"], "test_loss": t["loss"]},
            "teacher_image_blind": {"accuracy": blind["accuracy"], "by_task": blind["accuracy_by_task"]},
            "chance": chance, "test_questions": t["answered"], "variants": variants,
            "seeds": args.seeds, "n_train": args.n_train}


def _markdown(r: dict[str, Any]) -> str:
    tasks = sorted(r["teacher"]["by_task"])
    lines = [f"Test split: {r['test_questions']} questions; students trained with seeds {r['seeds']} "
             f"on {r['n_train']} samples against one teacher cache.", "",
             "| model | accuracy (mean ± std over seeds) | " + " | ".join(tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    for name, v in r["variants"].items():
        lines.append(f"| student: {name} | {v['accuracy_mean']:.3f} ± {v['accuracy_std']:.3f} | "
                     + " | ".join(f"{v['by_task_mean'].get(t, 0):.3f}" for t in tasks) + " |")
    lines.append(f"| teacher | {r['teacher']['accuracy']:.3f} | "
                 + " | ".join(f"{r['teacher']['by_task'][t]:.3f}" for t in tasks) + " |")
    lines.append(f"| teacher, images blanked | {r['teacher_image_blind']['accuracy']:.3f} | "
                 + " | ".join(f"{r['teacher_image_blind']['by_task'].get(t, 0):.3f}" for t in tasks) + " |")
    lines.append(f"| chance (uniform guess) | {r['chance']:.3f} | "
                 + " | ".join(f"{CHANCE.get(t, 0):.3f}" for t in tasks) + " |")
    if "seconds" in r:
        lines += ["", f"Measured run time: {r['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def _pictures(out: Path, teacher: Path, runs: dict[str, list[Path]], args: DemoArgs) -> None:
    from alignkd.data.batching import make_batch
    from alignkd.data.shards import decode_sample, expand_shards, iter_raw_samples
    from alignkd.viz import attention_figure, attention_map, curves_figure, keyword_rows

    curves_figure(runs, out / "curves.png")
    models = {"teacher": load_vlm(teacher)}
    for variant in ("ce", "alignkd"):
        if variant in runs:
            models[f"student {variant}"] = load_vlm(runs[variant][0] / "export")
    samples = []
    for shard in expand_shards(out / "data" / "test"):
        for raw in iter_raw_samples(shard):
            s = decode_sample(raw)
            if s.meta.get("task") in ("colour", "shape"):  # questions that name a region
                samples.append(s)
            if len(samples) == args.attention_samples:
                break
        if len(samples) == args.attention_samples:
            break
    rows = []
    for s in samples:
        maps = []
        for title, vlm in models.items():
            batch, _ = make_batch(vlm, [s], template="v1", max_length=512)
            block = vlm(batch, tap_layers=(0,)).blocks[0].probs[0].detach().numpy()
            ids = batch.input_ids[0].numpy()
            picked = keyword_rows(ids, int(batch.vision_start[0]) + batch.num_vision_tokens, s.meta.get("keyword"),
                                  vlm.tokenizer)
            maps.append((title, attention_map(block, picked)))
        question = s.conversations[0]["value"].replace("<image>", "").strip()
        rows.append((s.image, f"{question} ({s.meta.get('answer')})", maps))
    if rows:
        attention_figure(rows, out / "attention.png")
