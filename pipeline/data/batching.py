"""Decoded samples -> a `VLMBatch` for one model (its template, tokenizer, vision-token count, images).

    batch, skipped = make_batch(vlm, samples, template="v1", max_length=2048)

Samples the template cannot encode are not fatal: they come back in `skipped` as
(key, reason) so a stage can record them and go on with the rest; a template name the
model's family does not have raises TemplateError.

The model is anything with the few members of `BatchModel`; alignkd.models.VLM has them.
This package never imports alignkd.models (the models import it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Protocol

import torch
from PIL import Image

from alignkd.data.shards import Sample
from alignkd.data.templates import ConversationTemplate, TemplateError, collate, encode

__all__ = ["VLMBatch", "BatchModel", "make_batch", "keyword_rows", "grounding_targets"]


@dataclass
class VLMBatch:
    """A padded batch ready for `VLM.forward`.

    input_ids: (B, T) long; IMAGE_TOKEN at vision positions, pad id at padding.
    attention_mask: (B, T) long, 1 for real tokens.
    response_mask: (B, T) bool, True at positions R (tokens the model is trained to produce).
    vision_start: (B,) long, first vision position; -1 for text-only samples.
    pixel_values: (B_img, 3, H, W), images of the samples with vision_start >= 0, in batch order.
    """

    keys: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    vision_start: torch.Tensor
    num_vision_tokens: int
    pixel_values: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> VLMBatch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                if f.name == "pixel_values" and dtype is not None:
                    v = v.to(device=device, dtype=dtype)
                else:
                    v = v.to(device)
            moved[f.name] = v
        return VLMBatch(**moved)


class BatchModel(Protocol):
    """What turning samples into a model's inputs needs from the model."""

    family: str
    templates: Mapping[str, ConversationTemplate]  # the family's, by name
    tokenizer: Any
    image_processor: Any
    pad_images: bool

    @property
    def num_vision_tokens(self) -> int: ...

    def template(self, name: str) -> ConversationTemplate: ...

    def preprocess_images(self, images: list[Image.Image]) -> torch.Tensor: ...


def make_batch(
    vlm: BatchModel,
    samples: list[Sample],
    *,
    template: str,
    max_length: int,
    padding_side: Literal["right", "left"] = "right",
    for_generation: bool = False,
) -> tuple[VLMBatch | None, list[tuple[str, str]]]:
    """`for_generation` encodes prompts only (see templates.encode); `extras` carries each
    kept sample's `meta` and whether it was truncated."""
    chosen = vlm.template(template)
    encoded, kept, skipped = [], [], []
    for s in samples:
        try:
            encoded.append(
                encode(
                    s.conversations,
                    template=chosen,
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


def keyword_rows(input_ids: Sequence[int], vision_end: int, keyword: str | None, tokenizer: Any) -> list[int]:
    """Row indices (relative to vision_end) of the keyword's tokens in the text after the image;
    empty when there is no keyword or it does not occur."""
    if not keyword:
        return []
    target = [i for i in tokenizer(keyword, add_special_tokens=False)["input_ids"]]
    text = list(input_ids[vision_end:])
    for start in range(len(text) - len(target), -1, -1):  # the last occurrence: the question's
        if text[start : start + len(target)] == target:
            return list(range(start, start + len(target)))
    return []


def grounding_targets(batch: VLMBatch, tokenizer: Any, query_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each sample's question names its answer: (rows (B, query_rows) bool, the key
    word's rows of the tapped block; cells (B, N_v) bool, the vision tokens of the record's
    `target_cells`), from the records' `keyword` and `target_cells` (the demo data's; other
    samples get empty masks). A cell [r, c] is token r * g + c of the g x g token grid, which
    must be the scene's grid."""
    nv = batch.num_vision_tokens
    grid = round(nv**0.5)
    rows = torch.zeros(len(batch.keys), query_rows, dtype=torch.bool)
    cells = torch.zeros(len(batch.keys), nv, dtype=torch.bool)
    for i, meta in enumerate(batch.extras.get("meta") or []):
        targets, start = meta.get("target_cells") or [], int(batch.vision_start[i])
        if not targets or start < 0:
            continue
        for r, c in targets:
            if not (0 <= r < grid and 0 <= c < grid) or grid * grid != nv:
                raise ValueError(f"sample {batch.keys[i]}: target cell {[r, c]} is not on the {nv} vision tokens' "
                                 f"grid (the grounding loss needs one token per scene cell)")
            cells[i, r * grid + c] = True
        picked = [j for j in keyword_rows(batch.input_ids[i].tolist(), start + nv, meta.get("keyword"), tokenizer)
                  if j < query_rows]
        rows[i, picked] = True
    return rows, cells
