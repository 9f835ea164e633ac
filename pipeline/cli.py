"""The `alignkd` command line. Each command parses its options and calls one function;
the work lives in the library modules named in each docstring."""

from __future__ import annotations

import json
import sys

import click

from alignkd import __version__

__all__ = ["main"]


def _fail(e: Exception) -> None:
    """Known errors are one line on stderr and exit code 2, never a traceback."""
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


_KNOWN_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, OSError)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="alignkd")
def main() -> None:
    """Align-KD distillation of vision-language models from cached teacher signals."""


@main.command("make-shards")
@click.option("--llava-json", required=True, type=click.Path(exists=True, dir_okay=False), help="LLaVA/ShareGPT4V JSON list.")
@click.option("--image-root", required=True, type=click.Path(exists=True, file_okay=False), help="Folder the records' image paths are relative to.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for the shards.")
@click.option("--samples-per-shard", default=1000, show_default=True, type=click.IntRange(min=1))
def make_shards_cmd(llava_json: str, image_root: str, out: str, samples_per_shard: int) -> None:
    """Convert LLaVA-format data into webdataset shards (alignkd.data.llava)."""
    from alignkd.data.llava import make_shards

    try:
        report = make_shards(llava_json, image_root, out, samples_per_shard=samples_per_shard)
    except _KNOWN_ERRORS as e:
        _fail(e)
    click.echo(f"{report.written} samples in {report.shards} shards, {report.skipped} skipped -> {out}")
    for reason, count in sorted(report.skipped_by_reason.items()):
        click.echo(f"  skipped {count}: {reason}")
    if report.skipped:
        click.echo(f"  details: {report.skipped_file}")


@main.command("make-demo-data")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--n-train", default=2000, show_default=True)
@click.option("--n-val", default=200, show_default=True)
@click.option("--n-test", default=400, show_default=True)
def make_demo_data_cmd(out: str, seed: int, n_train: int, n_val: int, n_test: int) -> None:
    """Write the embedded synthetic data set (alignkd.data.synthetic)."""
    from alignkd.data.synthetic import make_demo_data

    try:
        info = make_demo_data(out, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)
    except _KNOWN_ERRORS as e:
        _fail(e)
    click.echo(json.dumps(info, indent=2))


@main.command("make-tiny-models")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--family", default="mobilevlm", show_default=True,
              help="A model family: a model_type listed in alignkd.models.FAMILIES.")
@click.option("--tokenizer", type=click.Choice(["word", "sentencepiece"]), default="word", show_default=True)
@click.option("--seed", default=0, show_default=True)
def make_tiny_models_cmd(out: str, family: str, tokenizer: str, seed: int) -> None:
    """Write tiny teacher and student checkpoints in the family's real layout (alignkd.models.tiny)."""
    from alignkd.models.tiny import write_tiny_models

    try:
        paths = write_tiny_models(out, family=family, tokenizer=tokenizer, seed=seed)
    except _KNOWN_ERRORS as e:
        _fail(e)
    for role, path in paths.items():
        click.echo(f"{role}: {path}")


def _job_options(f):
    """--job FILE and repeatable --set key=value, shared by every job-driven command."""
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a job value, e.g. --set data.batch_size=4 (repeatable).")(f)
    return click.option("--job", type=click.Path(dir_okay=False), default=None, help="Job file (TOML).")(f)


@main.command("probe")
@_job_options
@click.option("--model", default=None, help="Checkpoint folder (same as --set model.path=...).")
@click.option("--data", default=None, help="Shards: folder, file, glob or brace pattern (same as --set data.shards=...).")
@click.option("-n", "n", default=None, type=click.IntRange(min=1), help="Samples to probe (same as --set n=...).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def probe_cmd(job: str | None, overrides: tuple[str, ...], model: str | None, data: str | None, n: int | None,
              as_json: bool) -> None:
    """Show a model's layer-0 text-to-vision attention and projector output on a few samples (alignkd.probe)."""
    from alignkd.config import load_job
    from alignkd.probe import ProbeArgs, probe

    shortcuts = [f"{k}={json.dumps(v)}" for k, v in (("model.path", model), ("data.shards", data), ("n", n)) if v is not None]
    try:
        args = load_job(ProbeArgs, job, [*shortcuts, *overrides], check_paths=True)
        rows, skipped = probe(args)
    except _KNOWN_ERRORS as e:
        _fail(e)
    _print_probe(rows, skipped, as_json)


@main.command("extract-teacher")
@_job_options
@click.option("--address", default=None, help="Ray cluster address ('auto' or host:port); default: a local Ray.")
@click.option("--dry-run", is_flag=True, help="Estimate the cache size from the data and the schema; load no teacher.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs, CI).")
def extract_teacher_cmd(job: str | None, overrides: tuple[str, ...], address: str | None, dry_run: bool,
                        no_progress: bool) -> None:
    """Stage 1: run the teacher over the shards and write its signals to the cache (alignkd.extract)."""
    from alignkd.config import load_job
    from alignkd.extract import ExtractArgs, estimate_size, extract

    extra = [f"ray.address={json.dumps(address)}"] if address else []
    try:
        args = load_job(ExtractArgs, job, [*overrides, *extra], check_paths=True)
        if dry_run:
            _print_estimate(estimate_size(args))
            return
        summary = extract(args, echo=click.echo, progress=not no_progress)
    except _KNOWN_ERRORS + (RuntimeError,) as e:
        _fail(e)
    click.echo(
        f"wrote {len(summary.shards_written)} shards ({summary.shards_done_before} already done), "
        f"{summary.samples_written} samples, {summary.samples_skipped} skipped, "
        f"{summary.bytes_written / 2**20:.1f} MiB in {summary.seconds:.1f} s -> {summary.cache}"
    )
    for reason, count in sorted(summary.skipped_by_reason.items()):
        click.echo(f"  skipped {count}: {reason}")
    if summary.images_mislabelled:
        click.echo(f"  {summary.images_mislabelled} image(s) decoded by content: their bytes are not in the format "
                   "their extension names (kept)")
    if summary.removed_partial:
        click.echo(f"  removed {len(summary.removed_partial)} partial shard(s) left by an earlier run")


def _print_estimate(est: dict) -> None:
    from alignkd.extract import _human

    click.echo(f"estimate from {est['sampled']} of {est['samples']} samples "
               f"(after quantisation, before {est['compressor']} compression):")
    for name, per in sorted(est["bytes_per_sample"].items()):
        click.echo(f"  {name:<16} {_human(per):>10}/sample {_human(est['total_bytes'][name]):>12}")
    click.echo(f"  {'zarr metadata':<16} {'':>17} {_human(est['metadata_bytes']):>12}")
    click.echo(f"  {'total':<16} {_human(sum(est['bytes_per_sample'].values())):>10}/sample {_human(est['total']):>12}")
    click.echo(f"both modes (cache.signals; this job: {est['signals']}; after quantisation, before compression):")
    for mode, m in est["modes"].items():
        if m["total"] is None:
            click.echo(f"  {mode:<16} not available for this teacher's family")
            continue
        once = (f" + teacher slice {_human(m['once_bytes'])} once (its vision tower {m['slice_tower']})"
                if mode == "recompute" else "")
        click.echo(f"  {mode:<16} {_human(m['bytes_per_sample']):>10}/sample {_human(m['total']):>12}{once}")


@main.command("inspect-cache")
@click.argument("path")  # a folder or an fsspec URL (s3://...); a missing one is a one-line error
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect_cache_cmd(path: str, as_json: bool) -> None:
    """Samples, shards, skipped samples, bytes per signal and codec error of a cache (alignkd.cache.inspect)."""
    from alignkd.cache.inspect import format_table, inspect_cache

    try:
        report = inspect_cache(path)
    except _KNOWN_ERRORS as e:
        _fail(e)
    click.echo(json.dumps(report, indent=2) if as_json else format_table(report))


@main.command("verify-cache")
@click.argument("path")  # a folder or an fsspec URL (s3://...); a missing one is a one-line error
@click.option("--quick", is_flag=True, help="File lists and sizes only, no hashing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
def verify_cache_cmd(path: str, quick: bool, as_json: bool) -> None:
    """Check every shard file against its recorded size and sha256, and the schema; names each
    damaged shard, exit status 1 if any (alignkd.cache.verify)."""
    from dataclasses import asdict

    from alignkd.cache.verify import verify_cache

    try:
        report = verify_cache(path, hashes=not quick)
    except _KNOWN_ERRORS as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    else:
        how = "sha256 and sizes" if report.hashed else "sizes only"
        click.echo(f"{path}: {report.shards} shards, {report.files} files, {report.bytes / 2**20:.1f} MiB checked ({how})")
        for name, problems in sorted(report.damaged.items()):
            more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
            click.echo(f"damaged shard {name}: {'; '.join(problems[:3])}{more}")
        if report.partial:
            click.echo(f"{len(report.partial)} temporary shard(s) left by an interrupted run (the next extraction removes them)")
        click.echo("ok" if report.ok else f"{len(report.damaged)} damaged shard(s): delete them and run the same "
                   "extract-teacher job again to redo them")
    if not report.ok:
        sys.exit(1)


def _print_probe(rows, skipped, as_json: bool) -> None:
    from dataclasses import asdict

    if as_json:
        click.echo(json.dumps({"rows": [asdict(r) for r in rows], "skipped": skipped}, indent=2))
        return
    header = f"{'key':<14} {'tokens':>6} {'vision':>9} {'resp':>4} {'attn->img':>9} {'top focus':<12} {'|P|':>7} {'logp(resp)':>10}"
    click.echo(header)
    click.echo("-" * len(header))
    for r in rows:
        span = f"{r.vision_start}+{r.vision_tokens}" if r.vision_tokens else "-"
        click.echo(
            f"{r.key:<14} {r.tokens:>6} {span:>9} {r.response_tokens:>4} {r.vision_attention:>9.3f} "
            f"{','.join(map(str, r.top_focus)):<12} {r.feature_norm:>7.2f} {r.answer_logprob:>10.3f}"
        )
    for key, reason in skipped:
        click.echo(f"skipped {key}: {reason}")


@main.command("demo")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--full", is_flag=True, help="Also run every ablation job in jobs/demo/ (slower).")
@click.option("--seed", default=0, show_default=True, help="Data and model seed.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="Student runs trained at once, one thread each; 0 = one per CPU core (at most 4).")
@click.option("--retrain-teacher", is_flag=True,
              help="Train the demo teacher here instead of using the committed one (about 30 minutes alone on 2 cores).")
def demo_cmd(out: str, full: bool, seed: int, workers: int, retrain_teacher: bool) -> None:
    """The whole pipeline on the embedded default: synthetic data, tiny models, CPU (alignkd.demo)."""
    from alignkd.demo import DemoArgs, run_demo

    try:
        run_demo(out, DemoArgs(seed=seed, full=full, workers=workers, retrain_teacher=retrain_teacher),
                 echo=click.echo)
    except _KNOWN_ERRORS + (RuntimeError,) as e:
        _fail(e)



@main.command("train-student")
@_job_options
@click.option("--no-progress", is_flag=True, help="No progress bar (logs, CI).")
def train_student_cmd(job: str | None, overrides: tuple[str, ...], no_progress: bool) -> None:
    """Stage 2: train a student against a fixed teacher cache (alignkd.train)."""
    from alignkd.config import load_job
    from alignkd.train import TrainArgs, train

    try:
        args = load_job(TrainArgs, job, overrides, check_paths=True)
        result = train(args, echo=click.echo, progress=not no_progress)
    except _KNOWN_ERRORS as e:
        _fail(e)
    from alignkd.distributed import Procs

    if not Procs.from_env().main:  # under torchrun, one line from rank 0 is enough
        return
    done = "finished" if result.export else "stopped"
    click.echo(f"{done} at step {result.steps} -> {result.run_dir}" + (f" (export: {result.export})" if result.export else ""))


@main.command("evaluate")
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False), help="Checkpoint folder.")
@click.option("--data", required=True,
              help="Held-out shards (folder, file, glob or brace pattern); with --benchmark, the benchmark's local folder.")
@click.option("--benchmark", default=None,
              type=click.Choice(["mme", "mmbench", "gqa", "scienceqa", "textvqa", "pope"]),
              help="Score one of the paper's benchmarks from local files by its official rule (alignkd.benchmarks).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for scores.json and record.json (with --benchmark also answers.jsonl; its default for "
                   "a run's export: RUN_DIR/benchmarks/NAME, where `alignkd compare` shows it).")
@click.option("--template", default="v1", show_default=True, help="A conversation template of the model's family.")
@click.option("--max-length", default=2048, show_default=True)
@click.option("--max-samples", default=400, show_default=True)
@click.option("--limit", default=0, show_default=True, help="With --benchmark: the first N questions only (0 = all).")
@click.option("--max-new-tokens", default=16, show_default=True, help="With --benchmark: greedy answer length.")
@click.option("--batch-size", default=8, show_default=True, help="With --benchmark: questions per generate call.")
@click.option("--instruction", default=None,
              help="With --benchmark: replaces its answer-format line (e.g. '' for none); recorded.")
@click.option("--vision-tower", default=None, help="Local CLIP folder for MobileVLM's mm_vision_tower.")
@click.option("--no-generate", is_flag=True, help="Loss only; skip answer accuracy by greedy generation.")
@click.option("--json", "as_json", is_flag=True)
def evaluate_cmd(model: str, data: str, benchmark: str | None, out: str | None, template: str, max_length: int,
                 max_samples: int, limit: int, max_new_tokens: int, batch_size: int, instruction: str | None, vision_tower: str | None, no_generate: bool,
                 as_json: bool) -> None:
    """Held-out response loss and answer accuracy (alignkd.evaluate), or a benchmark's
    official scores with a reproducibility record (alignkd.benchmarks.run)."""
    from alignkd.models import ModelArgs, load_model

    try:
        vlm = load_model(ModelArgs(path=model, vision_tower=vision_tower))
        if benchmark:
            from alignkd.benchmarks.run import BenchmarkArgs, default_out, evaluate_benchmark

            out = out or default_out(model, benchmark)
            result = evaluate_benchmark(vlm, BenchmarkArgs(benchmark=benchmark, data=data, out=out,
                                                           template=template, max_new_tokens=max_new_tokens,
                                                           batch_size=batch_size, max_length=max_length, limit=limit,
                                                           instruction=instruction))
        else:
            from alignkd.evaluate import EvalArgs, evaluate_model, evaluation_record

            eval_args = EvalArgs(shards=data, max_samples=max_samples, generate=not no_generate)
            m = evaluate_model(vlm, eval_args, template=template, max_length=max_length)
            if out:
                from alignkd.provenance import write_result

                record = evaluation_record(vlm, eval_args, template=template, max_length=max_length)
                write_result(out, {"scores.json": json.dumps(m, indent=2), "record.json": json.dumps(record, indent=2)})
    except _KNOWN_ERRORS as e:
        _fail(e)
    if benchmark:
        scores = result["scores"]
        if as_json:
            click.echo(json.dumps(scores, indent=2))
            return
        head = result["record"]["benchmark"]
        click.echo(f"{benchmark}: {scores['score']:.2f} ({head['headline']}) over {head['questions']} questions"
                   + (f" -> {out}" if out else ""))
        return
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    click.echo(f"samples {m['samples']}, response tokens {m['tokens']}, loss {m['loss']:.4f}")
    if m["accuracy"] is not None:
        by_task = ", ".join(f"{k} {v:.3f}" for k, v in m["accuracy_by_task"].items())
        click.echo(f"accuracy {m['accuracy']:.3f} over {m['answered']} questions ({by_task})")


@main.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def compare_cmd(run_dirs: tuple[str, ...], as_json: bool) -> None:
    """Final metrics of student runs side by side (alignkd.compare)."""
    from alignkd.compare import collect_runs, format_markdown

    try:
        rows = collect_runs(list(run_dirs))
    except _KNOWN_ERRORS as e:
        _fail(e)
    click.echo(json.dumps(rows, indent=2) if as_json else format_markdown(rows))


@main.command("show-cache")
@click.argument("cache")  # a folder or an fsspec URL (s3://...); a missing one is a one-line error
@click.argument("key")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--data", default=None, help="Shards holding the sample's image (default: the extraction job's).")
@click.option("-k", "k", default=4, show_default=True, help="Focus top-k to outline (L_V_focus's k).")
def show_cache_cmd(cache: str, key: str, out: str, data: str | None, k: int) -> None:
    """Render a cached sample: image, teacher layer-0 attention, focus top-k (alignkd.viz)."""
    from alignkd.viz import show_cache

    try:
        path = show_cache(cache, key, out, data=data, k=k)
    except (*_KNOWN_ERRORS, KeyError) as e:
        _fail(e)
    click.echo(f"wrote {path}")


if __name__ == "__main__":  # `python -m alignkd.cli ...`, e.g. under `torchrun -m`
    main()
