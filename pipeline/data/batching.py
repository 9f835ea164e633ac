"""Decoded samples -> a `VLMBatch` for one model (its tokenizer, vision-token count, images).

    batch, skipped = make_batch(vlm, samples, template="v1", max_length=2048)

Samples the template cannot encode are not fatal: they come back in `skipped` as
(key, reason) so a stage can record them and go on with the rest.
"""

from __future__ import annotations

from typing import Literal

import torch

from alignkd.data.shards import Sample
from alignkd.data.templates import TemplateError, collate, encode
from alignkd.models.base import VLM, VLMBatch

__all__ = ["make_batch"]


def make_batch(
    vlm: VLM,
    samples: list[Sample],
    *,
    template: str,
    max_length: int,
    padding_side: Literal["right", "left"] = "right",
    for_generation: bool = False,
) -> tuple[VLMBatch | None, list[tuple[str, str]]]:
    """`for_generation` encodes prompts only (see templates.encode); `extras` carries each
    kept sample's `meta` and whether it was truncated."""
    encoded, kept, skipped = [], [], []
    for s in samples:
        try:
            encoded.append(
                encode(
                    s.conversations,
                    template=template,
                    tokenizer=vlm.tokenizer,
                    num_vision_tokens=vlm.num_vision_tokens,
                    max_length=max_length,
                    has_image=s.image is not None,
                    key=s.key,
                    for_generation=for_generation,
                )
            )
            kept.append(s)
        except TemplateError as e:
            skipped.append((s.key, str(e)))
    if not encoded:
        return None, skipped
    text = collate(encoded, pad_id=vlm.tokenizer.pad_token_id, padding_side=padding_side)
    images = [s.image for s in kept if s.image is not None]
    pixel_values = vlm.preprocess_images(images) if images else None
    batch = VLMBatch(
        keys=text["keys"],
        input_ids=text["input_ids"],
        attention_mask=text["attention_mask"],
        response_mask=text["response_mask"],
        vision_start=text["vision_start"],
        num_vision_tokens=vlm.num_vision_tokens,
        pixel_values=pixel_values,
        extras={"truncated": torch.tensor([e.truncated for e in encoded]), "meta": [s.meta for s in kept]},
    )
    return batch, skipped
