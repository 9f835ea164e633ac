"""`alignkd demo`: the whole pipeline on the embedded default, on CPU, from nothing.

    alignkd demo                      # quick: CE only, CE + logit KD and Align-KD students, 5 seeds
    alignkd demo --full               # + Align-KD as the released code ran, and every ablation job
    alignkd demo --retrain-teacher    # train the teacher instead of using the committed one
    alignkd demo --out elsewhere/

Steps, each reusing what an earlier run already wrote (delete a folder to redo it):
  1. data      the synthetic shapes set (train / val / test shards);
  2. models    tiny MobileVLM-layout teacher and student checkpoints (random init, one shared
               frozen toy CLIP tower, as the 7B and 1.7B share one CLIP);
  3. teacher   the committed teacher (pipeline/demo_assets/teacher, seed 0), or with
               --retrain-teacher jobs/demo/teacher.toml: L_sup alone on its own, larger
               training set (teacher-data/train, a superset of the students' data/train);
  4. extract   jobs/demo/extract.toml: the teacher's signals cached once;
  5. students  jobs/demo/student_*.toml (and ablate_*.toml with --full), each seed against
               that one cache, from the same random student; one run per CPU core at
               a time (`workers`), each on one torch thread;
  6. report    test-split accuracy per variant (mean and std over seeds; each run evaluated
               in its own process as it ends), differences to CE only paired by seed with
               their 95% interval, the key word -> answer cell attention ratio, the
               teacher's, an image-blind teacher's and chance; results.md / results.json, curves.png,
               attention.png.

Every stage goes through the same job files and library entry points the CLI commands use;
paths are pointed at --out with the same dotted overrides a user would pass.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkd.config import load_job
from alignkd.data.synthetic import make_demo_data
from alignkd.evaluate import EvalArgs, evaluate_model, evaluation_record
from alignkd.models import load_vlm
from alignkd.models.tiny import write_tiny_models

__all__ = ["JOBS_DIR", "DemoArgs", "exit_with_parent", "paired_difference", "run_demo", "run_students", "split_eval", "split_result",
           "train_teacher", "weights_sha256"]

JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs" / "demo"
# The demo teacher, trained once by `alignkd demo --retrain-teacher` (jobs/demo/teacher.toml on
# DemoArgs.n_teacher_train samples, TEACHER_THREADS torch threads) and committed: see README.
DEMO_TEACHER = Path(__file__).resolve().parent / "demo_assets" / "teacher"
TEACHER_THREADS = 2
QUICK = ("student_ce", "student_logit", "student_alignkd")
# --full adds Align-KD as the released code effectively ran (frozen adapters, raw-MSE
# attention) and every ablate_*.toml: five more runs each would not fit the quick run's 10 minutes.
FULL = ("student_alignkd_paper",)
CHANCE = {"colour": 1 / 6, "shape": 1 / 4, "position": 1 / 9, "count": 1 / 4}


@dataclass
class DemoArgs:
    """Sizes of the demo; the defaults are the documented quick run, tests shrink them."""

    seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    n_train: int = 2000  # the students' training set (and the cache's): a sixteenth of what the teacher saw
    n_teacher_train: int = 32000  # the teacher's, a superset; only read with retrain_teacher
    n_val: int = 500  # about 370 questions to choose settings on
    n_test: int = 2800  # about 2150 questions (a quarter of the samples are captions)
    full: bool = False
    retrain_teacher: bool = False  # train the teacher instead of using the committed one
    overrides: dict[str, list[str]] = field(default_factory=dict)  # job name -> extra --set items
    attention_samples: int = 4
    workers: int = 0  # student runs at once; 0 = one per CPU core (at most 4)


def _pinned(threads: int, run: Callable[[], Any]) -> Any:
    """run() on exactly `threads` torch threads: float reductions depend on the thread count,
    so the teacher comes out the same on any machine (the committed one was made so)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run()
    finally:
        torch.set_num_threads(before)


def _share_tower(teacher: Path, student: Path) -> None:
    """Give the student checkpoint the teacher's vision tower, as MobileVLM V2's 1.7B and 7B
    share one pretrained CLIP: the demo's toy tower is trained with the teacher (its stand-in
    for CLIP pre-training) and then frozen in both. Rewrites student/model.safetensors only
    when the towers differ (written under a temporary name, then renamed), and the copy in
    student/vision_tower/ that the authors' loader builds the tower from (MobileVLM.save_pretrained)."""
    from safetensors.torch import load_file, save_file

    t = {k: v for k, v in load_file(str(teacher / "model.safetensors")).items() if ".vision_tower." in k}
    s = load_file(str(student / "model.safetensors"))
    tower = {k for k in s if ".vision_tower." in k}
    if tower != t.keys() or any(s[k].shape != t[k].shape for k in t):
        raise RuntimeError(f"{teacher} and {student} have differently shaped vision towers: delete {student.parent} "
                           f"to rebuild the tiny models")
    if all(s[k].equal(t[k]) for k in t):
        return
    copy = student / "vision_tower" / "model.safetensors"
    if copy.is_file():  # first: a rerun after a crash in between finds the main file still differing
        tmp = copy.with_name("model.safetensors.tmp")
        save_file({k.removeprefix("model.vision_tower.vision_tower."): v for k, v in t.items()}, str(tmp),
                  metadata={"format": "pt"})
        tmp.rename(copy)
    tmp = student / "model.safetensors.tmp"
    save_file({**s, **t}, str(tmp), metadata={"format": "pt"})
    tmp.rename(student / "model.safetensors")


def _job(name: str) -> Path:
    path = JOBS_DIR / f"{name}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: demo job not found (run the demo from a source checkout)")
    return path


def _student_jobs(full: bool) -> list[str]:
    ablations = [*FULL, *sorted(p.stem for p in JOBS_DIR.glob("ablate_*.toml"))] if full else []
    return [*QUICK, *ablations]


def _workers(requested: int) -> int:
    if requested < 0:
        raise ValueError(f"workers: expected 0 (one per CPU core) or more, got {requested}")
    return requested or max(1, min(4, os.cpu_count() or 1))


def _student(name: str, run_dir: Path, overrides: list[str], evaluate_on: Path | None = None) -> None:
    """One student run, as `alignkd train-student --job jobs/demo/<name>.toml --set ...` would do,
    then (with `evaluate_on`, a demo data split folder) its export evaluated on every sample of
    that split into run_dir/<split>.json, in the same process; a failure is a RuntimeError
    naming the job and the run folder.

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
        if evaluate_on is not None:
            split_result(run_dir / "export", evaluate_on, run_dir / f"{evaluate_on.name}.json")
    except Exception as e:
        raise RuntimeError(f"train-student {name} -> {run_dir} failed: {e}") from e
    finally:
        torch.set_num_threads(threads)


def run_students(todo: list[tuple[str, Path, list[str]]], workers: int = 0,
                 evaluate_on: Path | None = None) -> Iterator[tuple[str, Path]]:
    """Train every (job name, run dir, overrides) in `todo`, `workers` at a time (0: one per
    CPU core, at most 4) in separate processes (in this one when workers is 1), yielding each
    as it finishes; with `evaluate_on` (a split folder such as out/data/val), each run is then
    evaluated on it in its own process (`_student`). Runs with more
    distillation terms start first, as they take longest (in the quick demo, two at a time:
    about 54 s for full Align-KD, 50 s for CE + logit, 49 s for CE-only), so that the last
    round is a short run. A failed run stops the demo with its job and folder named; finished
    runs keep their final.json and interrupted ones resume from their last checkpoint on the
    next `alignkd demo`."""
    workers = _workers(workers)
    todo = sorted(todo, key=lambda run: -_distill_terms(run[0], run[2]))  # stable: ties keep their order
    if workers == 1 or len(todo) <= 1:
        for name, run_dir, overrides in todo:
            _student(name, run_dir, overrides, evaluate_on)
            yield name, run_dir
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads / Ray
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_student, name, run_dir, overrides, evaluate_on): (name, run_dir)
                   for name, run_dir, overrides in todo}
        try:
            for future in as_completed(futures):
                future.result()  # re-raises the run's RuntimeError
                yield futures[future]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def exit_with_parent(parent: int, every_s: float = 0.5) -> None:
    """A worker process's initializer: end the worker once `parent` is gone (a SIGTERM or
    SIGKILL to the demo leaves no orphaned student runs training on; Ctrl-C reaches the whole
    process group anyway). The interrupted run resumes from its last checkpoint."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _distill_terms(name: str, overrides: list[str]) -> int:
    from alignkd.train import TrainArgs

    loss = load_job(TrainArgs, _job(name), overrides).loss
    return sum(weight > 0 for weight in (loss.logit, loss.attn, loss.v_all, loss.v_focus))


def run_demo(out: str | Path, args: DemoArgs | None = None, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    from alignkd.extract import ExtractArgs, extract

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

    # 3. the teacher: the committed one, or trained (once) on its own, larger training set
    committed = DEMO_TEACHER.is_dir() and args.seed == 0 and not args.retrain_teacher
    stage(f"teacher -> {out / 'teacher'}" + (f" (the committed {DEMO_TEACHER.name})" if committed else ""))
    teacher = out / "teacher" / "export"
    if not (teacher / "config.json").is_file():
        if committed:
            shutil.copytree(DEMO_TEACHER, teacher)
        else:
            echo(_compared_with_committed(train_teacher(out, args, echo=echo)))
    elif committed and weights_sha256(teacher) != weights_sha256(DEMO_TEACHER):
        echo(f"warning: {teacher} is not the committed teacher (left by an earlier version or by --retrain-teacher); "
             f"its cache and students are reused as they are: delete {out} to run against the committed one")
    _share_tower(teacher, models / "student")

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
    for name, run_dir in run_students(todo, workers, evaluate_on=data / "test"):
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


def train_teacher(out: str | Path, args: DemoArgs | None = None, *, echo: Callable[[str], None] = print) -> Path:
    """Train the demo teacher as `alignkd demo --retrain-teacher` does (jobs/demo/teacher.toml
    on out/teacher-data, a superset of out/data/train; validated on out/data/val, which must
    exist; untrained tiny models in out/models) on TEACHER_THREADS threads, and return its
    export folder. Same arguments, same bytes: this is how the committed teacher was made."""
    from alignkd.train import TrainArgs, train

    args = args or DemoArgs()
    out = Path(out)
    teacher_data = out / "teacher-data"  # sample i depends on (seed, split, i) only
    if not (teacher_data / "demo_data.json").is_file():
        make_demo_data(teacher_data, seed=args.seed, n_train=args.n_teacher_train, n_val=0, n_test=0)
    job = load_job(TrainArgs, _job("teacher"), [
        f"student.path={json.dumps(str(out / 'models' / 'teacher'))}",
        f"data.shards={json.dumps(str(teacher_data / 'train'))}", f"eval.shards={json.dumps(str(out / 'data' / 'val'))}",
        f"run.dir={json.dumps(str(out / 'teacher'))}", *args.overrides.get("teacher", [])])
    _pinned(TEACHER_THREADS, lambda: train(job, echo=echo))
    return out / "teacher" / "export"


def weights_sha256(model: Path) -> str:
    """sha256 of a model folder's model.safetensors (how the committed teacher is named)."""
    return hashlib.sha256((Path(model) / "model.safetensors").read_bytes()).hexdigest()


def _compared_with_committed(teacher: Path) -> str:
    sha = weights_sha256(teacher)
    if not DEMO_TEACHER.is_dir():
        return f"teacher weights sha256 {sha}"
    committed = weights_sha256(DEMO_TEACHER)
    return (f"teacher weights sha256 {sha}: " + ("bit for bit the committed teacher" if sha == committed else
            f"differs from the committed teacher's {committed} (other settings, seed or torch build)"))


def split_eval(model: Path, out: Path, split: str = "test", **kw: Any) -> dict[str, Any]:
    """Accuracy and loss of a model folder on one split of the demo folder `out`, every sample."""
    vlm = load_vlm(model)
    args = EvalArgs(shards=str(out / "data" / split), max_samples=100_000, **kw)
    # with what the numbers depend on (prompt, settings, fingerprint, shard hashes, harness)
    return {**evaluate_model(vlm, args, template="v1", max_length=512),
            "record": evaluation_record(vlm, args, template="v1", max_length=512)}


def split_result(model: Path, split_dir: Path, result: Path, **kw: Any) -> dict[str, Any]:
    """split_eval of `model` on the split folder `split_dir` and, unless the images are
    blanked, its `keyword_attention_ratio`, kept in the file `result` (written atomically)
    with the split's shard names and sizes; a later call reads it back unless the split has
    changed since (a demo folder remade with another size)."""
    split = {p.name: p.stat().st_size for p in sorted(split_dir.glob("*.tar"))}
    if result.is_file():
        kept = json.loads(result.read_text())
        if kept.get("split") == split and ("attention_ratio" in kept or kw.get("blank_images")):
            return kept
    found = {**split_eval(model, split_dir.parent.parent, split=split_dir.name, **kw), "split": split}
    if not kw.get("blank_images"):  # where the key word's layer-0 attention goes (images needed)
        found["attention_ratio"] = keyword_attention_ratio(model, split_dir)["ratio"]
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(found, indent=2))
    tmp.rename(result)
    return found


def keyword_attention_ratio(model: Path, split_dir: Path, max_questions: int = 256) -> dict[str, float]:
    """How much a model's layer-0 attention from the question's key word goes to the cell that
    answers it: on colour and shape questions (each names one cell), the head-mean attention
    of the keyword's rows over the 9 vision tokens, renormalised to sum to 1, at the answer's
    token, times 9. 1.0 is uniform; 9.0 is all on the answer's cell. {"ratio": mean over
    questions, "questions": how many}."""
    from alignkd.data.shards import read_samples
    from alignkd.viz import attention_map

    vlm = load_vlm(model)
    vlm.eval()
    samples = [s for s in read_samples(str(split_dir), 100_000)[0]
               if s.meta.get("task") in ("colour", "shape") and len(s.meta.get("target_cells", [])) == 1]
    samples = samples[:max_questions]
    ratios = []
    for lo in range(0, len(samples), 32):
        chunk = samples[lo : lo + 32]
        for s, (block, rows) in zip(chunk, _keyword_blocks(vlm, chunk)):
            if not rows:
                continue
            amap = attention_map(block, rows)
            (row, col), = s.meta["target_cells"]
            grid = int(round(amap.size ** 0.5))
            ratios.append(float(amap[row * grid + col] / max(amap.sum(), 1e-12) * amap.size))
    return {"ratio": statistics.fmean(ratios) if ratios else float("nan"), "questions": len(ratios)}


def _keyword_blocks(vlm: Any, samples: list) -> list[tuple[Any, list[int]]]:
    """Per sample, its layer-0 text x vision block (H, Lq, Nv) as numpy and the rows of its
    question's key word (empty when the record has none or it does not occur), from one
    batched forward."""
    import torch

    from alignkd.data.batching import make_batch
    from alignkd.data.batching import keyword_rows

    batch, _ = make_batch(vlm, samples, template="v1", max_length=512)
    with torch.no_grad():
        probs = vlm(batch, tap_layers=(0,)).blocks[0].probs.float().numpy()
    return [(probs[i], keyword_rows(batch.input_ids[i].numpy(), int(batch.vision_start[i]) + batch.num_vision_tokens,
                                    s.meta.get("keyword"), vlm.tokenizer))
            for i, s in enumerate(samples)]


def _report(out: Path, teacher: Path, runs: dict[str, list[Path]], args: DemoArgs) -> dict[str, Any]:
    test = out / "data" / "test"
    t = split_result(teacher, test, out / "teacher" / "test.json")
    blind = split_result(teacher, test, out / "teacher" / "test_blind.json", blank_images=True)
    # chance = expected accuracy of uniform guessing, weighted by how often each task occurs
    per_task_n = t["answered_by_task"]
    chance = sum(CHANCE.get(k, 0) * v for k, v in per_task_n.items()) / max(1, sum(per_task_n.values()))
    variants = {}
    for variant, dirs in runs.items():
        accs = [split_result(d / "export", test, d / "test.json") for d in dirs]
        values = [a["accuracy"] for a in accs]
        variants[variant] = {
            "seeds": len(values),
            "accuracy_mean": statistics.fmean(values),
            "accuracy_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "accuracy_by_seed": values,
            "by_task_mean": {k: statistics.fmean(a["accuracy_by_task"][k] for a in accs)
                             for k in accs[0]["accuracy_by_task"]},
            "test_loss_mean": statistics.fmean(a["loss"] for a in accs),
            "attention_ratio_mean": statistics.fmean(a["attention_ratio"] for a in accs),
        }
    _pair(variants)
    return {"teacher": {"accuracy": t["accuracy"], "by_task": t["accuracy_by_task"], "test_loss": t["loss"],
                        "attention_ratio": t["attention_ratio"]},
            "teacher_image_blind": {"accuracy": blind["accuracy"], "by_task": blind["accuracy_by_task"]},
            "chance": chance, "test_questions": t["answered"], "variants": variants,
            "seeds": args.seeds, "n_train": args.n_train}


def _pair(variants: dict[str, dict[str, Any]]) -> None:
    """Add each variant's paired differences (seed by seed: same start and data order): "vs_ce"
    against CE only, and for the --full variants "vs_alignkd" against Align-KD with the defaults
    (what removing or changing a term costs)."""
    if "ce" in variants:  # every variant against CE-only, seed by seed (same start and data order)
        for variant, v in variants.items():
            if variant != "ce":
                v["vs_ce"] = paired_difference(v["accuracy_by_seed"], variants["ce"]["accuracy_by_seed"])
    if "alignkd" in variants:  # each --full variant against Align-KD with the defaults: what removing a term costs
        for variant, v in variants.items():
            if variant not in ("ce", "logit", "alignkd"):
                v["vs_alignkd"] = paired_difference(v["accuracy_by_seed"], variants["alignkd"]["accuracy_by_seed"])


# Two-sided 95% quantiles of Student's t by degrees of freedom (standard tables).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def paired_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """a - b paired by position (seed): mean, std and the 95% t interval of the mean."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference: expected two equally long non-empty lists, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(d)
    if len(d) == 1:
        return {"mean": mean, "std": 0.0, "ci95_low": float("nan"), "ci95_high": float("nan"), "n": 1}
    std = statistics.stdev(d)
    df = len(d) - 1
    t = _T95[max(k for k in _T95 if k <= df)]  # the next smaller df in the table: a wider interval
    half = t * std / len(d) ** 0.5
    return {"mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half, "n": len(d)}


def _markdown(r: dict[str, Any]) -> str:
    tasks = sorted(r["teacher"]["by_task"])

    def row(name: str, accuracy: str, by_task: dict[str, float], ratio: float | None) -> str:
        return (f"| {name} | {accuracy} | " + " | ".join(f"{by_task.get(t, 0):.3f}" for t in tasks)
                + f" | {'' if ratio is None else f'{ratio:.2f}'} |")

    lines = [f"Test split: {r['test_questions']} questions; students trained with seeds {r['seeds']} "
             f"on {r['n_train']} samples against one teacher cache. Last column: layer-0 attention from "
             f"the question's key word on the cell that answers it, as a multiple of uniform (colour and "
             f"shape questions).", "",
             "| model | accuracy (mean ± std over seeds) | " + " | ".join(tasks) + " | key word -> answer cell |",
             "|---|---|" + "---|" * (len(tasks) + 1)]
    for name, v in r["variants"].items():
        lines.append(row(f"student: {name}", f"{v['accuracy_mean']:.3f} ± {v['accuracy_std']:.3f}",
                         v["by_task_mean"], v.get("attention_ratio_mean")))
    lines.append(row("teacher", f"{r['teacher']['accuracy']:.3f}", r["teacher"]["by_task"],
                     r["teacher"].get("attention_ratio")))
    lines.append(row("teacher, images blanked", f"{r['teacher_image_blind']['accuracy']:.3f}",
                     r["teacher_image_blind"]["by_task"], None))
    lines.append(row("chance (uniform guess)", f"{r['chance']:.3f}", CHANCE, 1.0))
    paired = {name: v["vs_ce"] for name, v in r["variants"].items() if "vs_ce" in v}
    if paired:
        lines += ["", "Paired by seed (same student start and data order), each variant minus CE only:", "",
                  "| variant | mean difference | 95% interval | seeds |", "|---|---|---|---|"]
        for name, d in paired.items():
            lines.append(f"| {name} | {d['mean']:+.3f} | [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}] | {d['n']} |")
    against = {name: v["vs_alignkd"] for name, v in r["variants"].items() if "vs_alignkd" in v}
    if against:
        lines += ["", "Paired by seed, each `--full` variant minus Align-KD with the defaults (below zero: the "
                  "term it removes or changes helps):", "",
                  "| variant | mean difference | 95% interval | seeds |", "|---|---|---|---|"]
        for name, d in against.items():
            lines.append(f"| {name} | {d['mean']:+.3f} | [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}] | {d['n']} |")
    if "seconds" in r:
        lines += ["", f"Measured run time: {r['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def _pictures(out: Path, teacher: Path, runs: dict[str, list[Path]], args: DemoArgs) -> None:
    from alignkd.data.shards import decode_sample, expand_shards, iter_raw_samples
    from alignkd.viz import attention_figure, attention_map, curves_figure

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
            (block, picked), = _keyword_blocks(vlm, [s])
            maps.append((title, attention_map(block, picked)))
        question = s.conversations[0]["value"].replace("<image>", "").strip()
        rows.append((s.image, f"{question} ({s.meta.get('answer')})", maps))
    if rows:
        attention_figure(rows, out / "attention.png")
