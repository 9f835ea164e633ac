"""Held-out evaluation of any checkpoint: response loss, and answer accuracy by greedy
generation on data whose records carry an `answer` (the demo task).

    alignkd evaluate --model runs/full/export --data demo-out/data/test
    metrics = evaluate_model(vlm, EvalArgs(shards="demo-out/data/test"), template="v1", max_length=512)

`evaluation_record` is what the numbers depend on (alignkd.provenance); `alignkd evaluate --out
DIR` writes it as DIR/record.json beside DIR/scores.json.

Accuracy compares the generated text, lower-cased and stripped of punctuation, with the
record's `answer`; captions (task "caption") count towards the loss only. Per-task accuracy
is reported too, since chance differs by task (colour 1/6, shape 1/4, position 1/9, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from alignkd.data.batching import make_batch
from alignkd.data.shards import read_samples
from alignkd.models.base import VLM, GenerationSettings, VLMBatch

__all__ = ["EvalArgs", "evaluate_model", "evaluation_record", "greedy_answers", "normalise_answer"]


@dataclass
class EvalArgs:
    shards: str = ""  # held-out split; "" = no evaluation
    max_samples: int = 400
    batch_size: int = 32
    generate: bool = True  # answer accuracy by greedy decoding (needs records with an `answer`)
    max_new_tokens: int = 8
    blank_images: bool = False  # every image replaced by flat grey: what a model gets from text alone


def normalise_answer(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _batch(vlm: VLM, samples: list, *, template: str, max_length: int, for_generation: bool) -> VLMBatch | None:
    # Generation appends at the end of every row, so prompts are left-padded.
    return make_batch(vlm, samples, template=template, max_length=max_length, for_generation=for_generation,
                      padding_side="left" if for_generation else "right")[0]


def greedy_answers(vlm: VLM, batch: VLMBatch, max_new_tokens: int) -> list[str]:
    """Greedy answers to left-padded prompts, decoded to text (`VLM.generate`, KV cache)."""
    rows = vlm.generate(batch, GenerationSettings(max_new_tokens=max_new_tokens))  # greedy
    return [vlm.tokenizer.decode(row, skip_special_tokens=True) for row in rows]


@torch.no_grad()
def evaluate_model(vlm: VLM, args: EvalArgs, *, template: str, max_length: int) -> dict[str, Any]:
    """{"loss", "tokens", "samples", "accuracy", "accuracy_by_task", "answered", "answered_by_task"}."""
    was_training = vlm.training
    vlm.eval()
    samples, _ = read_samples(args.shards, args.max_samples)
    if args.blank_images:
        from PIL import Image

        for s in samples:
            if s.image is not None:
                s.image = Image.new("RGB", s.image.size, (128, 128, 128))
    total_loss, total_tokens = 0.0, 0
    correct: dict[str, list[int]] = {}
    for lo in range(0, len(samples), args.batch_size):
        chunk = samples[lo : lo + args.batch_size]
        batch = _batch(vlm, chunk, template=template, max_length=max_length, for_generation=False)
        if batch is None:
            continue
        batch = batch.to(vlm.device, dtype=vlm.dtype)
        out = vlm(batch)
        resp = batch.response_mask.clone()
        resp[:, 0] = False
        b, t = resp.nonzero(as_tuple=True)
        logits = vlm.logits(out.hidden[b, t - 1]).float()
        total_loss += float(torch.nn.functional.cross_entropy(logits, batch.input_ids[b, t], reduction="sum"))
        total_tokens += int(t.numel())
        questions = [s for s in chunk if s.meta.get("answer") is not None and s.meta.get("task") != "caption"]
        if args.generate and questions:
            prompt = _batch(vlm, questions, template=template, max_length=max_length, for_generation=True)
            if prompt is not None:
                answers = greedy_answers(vlm, prompt.to(vlm.device, dtype=vlm.dtype), args.max_new_tokens)
                for meta, answer in zip(prompt.extras["meta"], answers):
                    hit = int(normalise_answer(answer) == normalise_answer(str(meta["answer"])))
                    correct.setdefault(meta.get("task", "all"), []).append(hit)
    vlm.train(was_training)
    hits = [h for v in correct.values() for h in v]
    return {
        "samples": len(samples),
        "tokens": total_tokens,
        "loss": total_loss / max(total_tokens, 1),
        "answered": len(hits),
        "accuracy": sum(hits) / len(hits) if hits else None,
        "accuracy_by_task": {k: sum(v) / len(v) for k, v in sorted(correct.items())},
        "answered_by_task": {k: len(v) for k, v in sorted(correct.items())},
    }


def evaluation_record(vlm: VLM, args: EvalArgs, *, template: str, max_length: int) -> dict[str, Any]:
    """The reproducibility record of `evaluate_model(vlm, args, ...)`: the prompt (one rendered
    from the first sample), generation settings, model fingerprint, the shards' sha256 and
    the harness."""
    from pathlib import Path

    from alignkd.data.shards import expand_shards
    from alignkd.provenance import evaluation_record as record, render_prompt

    samples, _ = read_samples(args.shards, 1)
    prompt = render_prompt(vlm, template, samples[0].conversations, samples[0].image is not None) if samples else ""
    files = [Path(p) for p in expand_shards(args.shards)]
    root = Path(args.shards) if Path(args.shards).is_dir() else files[0].parent
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens) if args.generate else None
    return record(vlm, template=template, prompt=prompt, settings=settings, data_files=files, data_root=root,
                  generation={"max_length": max_length, "batch_size": args.batch_size},
                  data={"max_samples": args.max_samples, "blank_images": args.blank_images})
