"""alignkd's checkpoints as an lmms-eval model, registered by entry point (`pip install 'alignkd[eval]'`):

    python -m lmms_eval --model alignkd --model_args pretrained=runs/alignkd/export \\
        --tasks mme,mmbench_en_dev,gqa,scienceqa_img,textvqa_val,pope --batch_size 8 --output_path evals/

Any family alignkd loads (MobileVLM V2 in the authors' layout, transformers' LLaVA) answers
through its own conversation template (`template=`, default v1), its own image preprocessing
and `VLM.generate` (greedy unless the task asks to sample), exactly as `alignkd evaluate
--benchmark` asks its own questions. model_args: pretrained (the checkpoint folder),
vision_tower (MobileVLM's local CLIP folder), template, dtype (float32 / bfloat16 / float16),
device ("auto"), max_new_tokens (a cap on the task's own; 0, the default: none). Only
lmms-eval imports this module.

pyproject's entry point names `manifest`, which lmms-eval's model registry calls (its
`lmms_eval.models` entry-point group, lmms-eval >= 0.7).
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.model import lmms

from alignkd.data.batching import make_batch
from alignkd.data.shards import IMAGE_PLACEHOLDER, Sample
from alignkd.models import ModelArgs, load_model
from alignkd.models.base import GenerationSettings

__all__ = ["AlignKDModel", "manifest"]


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="alignkd", simple_class_path="alignkd.benchmarks.lmms_plugin.AlignKDModel")


def settings_from(gen_kwargs: dict[str, Any], cap: int = 0) -> GenerationSettings:
    """A task's generation_kwargs as GenerationSettings: temperature 0 or do_sample false is
    greedy; `cap` (0: none) bounds the task's max_new_tokens."""
    until = gen_kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    temperature = float(gen_kwargs.get("temperature", 0) or 0)
    sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
    tokens = int(gen_kwargs.get("max_new_tokens") or cap or 128)
    return GenerationSettings(max_new_tokens=min(tokens, cap) if cap else tokens, do_sample=sample,
                              temperature=temperature if sample else 1.0, top_p=float(gen_kwargs.get("top_p") or 1.0),
                              stop_strings=until)


class AlignKDModel(lmms):
    is_simple = True

    def __init__(self, pretrained: str, vision_tower: str | None = None, template: str = "v1", dtype: str = "float32",
                 device: str = "auto", batch_size: int | str = 1, max_new_tokens: int = 0, max_length: int = 2048,
                 **kwargs: Any) -> None:
        super().__init__()
        self.vlm = load_model(ModelArgs(path=pretrained, vision_tower=vision_tower, dtype=dtype,
                                        device="auto" if device in (None, "", "auto") else device))
        self.vlm.template(template)  # a TemplateError now, not at the first question
        self.template_name = template
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.max_length = int(max_length)

    def _answers(self, prompts: list[tuple[str, Any]], settings: GenerationSettings) -> list[str]:
        samples = []
        for n, (context, visuals) in enumerate(prompts):
            images = [v for v in (visuals or []) if hasattr(v, "convert")]
            if len(images) > 1:
                raise ValueError(f"question {n}: {len(images)} images; alignkd's models take one")
            value = f"{IMAGE_PLACEHOLDER}\n{context}" if images else context
            samples.append(Sample(key=str(n), image=images[0].convert("RGB") if images else None,
                                  conversations=[{"from": "human", "value": value}]))
        batch, skipped = make_batch(self.vlm, samples, template=self.template_name, max_length=self.max_length,
                                    for_generation=True, padding_side="left")
        if skipped:
            raise ValueError(f"a question cannot be encoded: {skipped[0][1]}")
        rows = self.vlm.generate(batch.to(self.vlm.device, dtype=self.vlm.dtype), settings)
        texts = [self.vlm.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        for stop in settings.stop_strings:
            texts = [t.split(stop)[0] for t in texts]
        return [t.strip() for t in texts]

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out: list[str] = [""] * len(requests)
        # one generate call per run of requests with the same generation settings
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for indices in groups.values():
            settings = settings_from(dict(requests[indices[0]].args[1]), self.max_new_tokens)
            for lo in range(0, len(indices), self.batch_size):
                chunk = indices[lo : lo + self.batch_size]
                prompts = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    prompts.append((context, doc_to_visual(self.task_dict[task][split][doc_id])))
                for i, text in zip(chunk, self._answers(prompts, settings)):
                    out[i] = text
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError("alignkd's lmms-eval model answers by generation only (generate_until tasks)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("alignkd's lmms-eval model answers single-turn questions only")
