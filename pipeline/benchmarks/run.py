"""Score a checkpoint on one of the paper's benchmarks from local files, reproducibly.

    alignkd evaluate --model runs/alignkd/export --benchmark pope --data data/pope --out evals/pope
    result = evaluate_benchmark(vlm, BenchmarkArgs(benchmark="pope", data="data/pope", out="evals/pope"))

Every question goes through the model's own family: its conversation template
(`vlm.template(args.template)`), its image preprocessing (`make_batch`) and `VLM.generate`
(greedy by default). The out folder gets, side by side:
  scores.json    the benchmark's official scores (alignkd.benchmarks.rules)
  answers.jsonl  each question's key, the raw answer and what the rule made of it
  record.json    what the scores depend on: the prompt template (name, one rendered prompt,
                 the instruction suffix), the generation settings, the model's fingerprint
                 (config hash, weights sha256), its image preprocessing, sha256 of every data
                 file read (annotations one by one, images as one digest) and the harness
                 (alignkd, torch and transformers versions)
Published numbers for one model differ by several points across prompts and temperatures;
two record.json files that agree mean the same evaluation.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from alignkd import provenance
from alignkd.benchmarks.formats import BENCHMARKS, Item, read_items
from alignkd.data.batching import make_batch
from alignkd.data.shards import IMAGE_PLACEHOLDER, Sample
from alignkd.models.base import VLM, GenerationSettings
from alignkd.provenance import sha256_file

__all__ = ["BenchmarkArgs", "evaluate_benchmark", "evaluation_record", "render_prompt", "default_out"]


@dataclass
class BenchmarkArgs:
    benchmark: str = "pope"
    data: str = ""  # the benchmark's local folder (see alignkd.benchmarks.formats)
    out: str = ""  # scores.json, answers.jsonl, record.json; "" = write nothing
    template: str = "v1"  # one of the model family's templates
    max_new_tokens: int = 16  # short answers; the rules read the first word, letter or phrase
    batch_size: int = 8
    max_length: int = 2048
    limit: int = 0  # the first N questions only (0: all); recorded
    instruction: str | None = None  # replaces the benchmark's answer-format line (None: its own); recorded


def default_out(model: str | Path, benchmark: str) -> str:
    """Where an evaluation goes when no --out is given: RUN_DIR/benchmarks/<name>/ for a run's
    export (a folder beside final.json, where `alignkd compare` finds it), else nowhere ("")."""
    from alignkd.compare import BENCHMARK_DIR

    run_dir = Path(model).resolve().parent
    return str(run_dir / BENCHMARK_DIR / benchmark) if (run_dir / "final.json").is_file() else ""


def _sample(item: Item, instruction: str | None) -> Sample:
    raw = item.image if isinstance(item.image, bytes) else item.image.read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        image = im.convert("RGB")
    conv = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{item.prompt(instruction)}"}]
    return Sample(key=item.key, image=image, conversations=conv, image_bytes=raw)


def render_prompt(vlm: VLM, template: str, question: str) -> str:
    """The prompt of one question as text (alignkd.provenance.render_prompt)."""
    return provenance.render_prompt(vlm, template, [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"}])


def _images_digest(items: list[Item]) -> str:
    """One sha256 over the distinct images in question order (file name and content)."""
    h, seen = hashlib.sha256(), set()
    for item in items:
        ident = item.image if isinstance(item.image, Path) else hashlib.sha256(item.image).hexdigest()
        if ident in seen:
            continue
        seen.add(ident)
        if isinstance(item.image, Path):
            h.update(f"{item.image.name}\0{sha256_file(item.image)}\0".encode())
        else:
            h.update(f"inline\0{ident}\0".encode())
    return h.hexdigest()


def evaluation_record(vlm: VLM, args: BenchmarkArgs, settings: GenerationSettings, items: list[Item],
                      files: list[Path]) -> dict[str, Any]:
    """Everything the scores depend on (the module docstring's record.json; alignkd.provenance)."""
    bench = BENCHMARKS[args.benchmark]
    return provenance.evaluation_record(
        vlm, template=args.template, prompt=render_prompt(vlm, args.template, items[0].prompt(args.instruction)),
        instruction=items[0].instruction if args.instruction is None else args.instruction, settings=settings,
        data_files=files, data_root=args.data,
        benchmark={"name": bench.name, "lmms_eval_task": bench.task, "headline": bench.headline,
                   "questions": len(items), "limit": args.limit},
        generation={"max_length": args.max_length, "batch_size": args.batch_size},
        data={"images_sha256": _images_digest(items)})


@torch.no_grad()
def evaluate_benchmark(vlm: VLM, args: BenchmarkArgs, settings: GenerationSettings | None = None) -> dict[str, Any]:
    """{"scores", "record", "answers"}; written into args.out when set."""
    items, files = read_items(args.benchmark, args.data)
    if args.limit:
        items = items[: args.limit]
    settings = settings or GenerationSettings(max_new_tokens=args.max_new_tokens)
    was_training = vlm.training
    vlm.eval()
    answers: list[str] = []
    started = time.monotonic()
    for lo in range(0, len(items), args.batch_size):
        chunk = [_sample(i, args.instruction) for i in items[lo : lo + args.batch_size]]
        batch, skipped = make_batch(vlm, chunk, template=args.template, max_length=args.max_length,
                                    for_generation=True, padding_side="left")
        if skipped:
            raise ValueError(f"{args.benchmark}: question {skipped[0][0]} cannot be encoded: {skipped[0][1]}")
        rows = vlm.generate(batch.to(vlm.device, dtype=vlm.dtype), settings)
        answers += [vlm.tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
    vlm.train(was_training)
    scores = BENCHMARKS[args.benchmark].score(items, answers)
    record = evaluation_record(vlm, args, settings, items, files)
    record["seconds"] = round(time.monotonic() - started, 2)
    result = {"scores": scores, "record": record,
              "answers": [{"key": i.key, "answer": a} for i, a in zip(items, answers)]}
    if args.out:
        _write(Path(args.out), result)
    return result


def _write(out: Path, result: dict[str, Any]) -> None:
    provenance.write_result(out, {"scores.json": json.dumps(result["scores"], indent=2),
                               "record.json": json.dumps(result["record"], indent=2),
                               "answers.jsonl": "".join(json.dumps(a) + "\n" for a in result["answers"])})
