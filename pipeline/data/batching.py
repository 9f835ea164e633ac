"""Decoded samples -> a `VLMBatch` for one model (its template, tokenizer, image preparation).

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

from alignkd.data.images import ImagePreprocessor
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
    num_vision_tokens: N_v when every image of the model has the same count (MobileVLM,
        LLaVA), None for a dynamic-resolution model (Qwen2.5-VL), whose counts differ per image.
    vision_lengths: (B,) long, each sample's N_v (0 for text-only samples); filled from
        num_vision_tokens when not given.
    pixel_values: the images of the samples with vision_start >= 0, in batch order, in the
        family's layout (CLIP: (B_img, 3, H, W); see data.images.PreparedImages).
    image_inputs: the family's other image tensors, first axis over those images (Qwen2.5-VL:
        image_grid_thw (B_img, 3)), passed to `VLM.encode_images` as keywords.
    """

    keys: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    vision_start: torch.Tensor
    num_vision_tokens: int | None
    pixel_values: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    vision_lengths: torch.Tensor | None = None
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vision_lengths is None:
            if self.num_vision_tokens is None:
                raise ValueError("VLMBatch: vision_lengths is needed when num_vision_tokens is None")
            has_image = self.vision_start >= 0
            self.vision_lengths = has_image.long() * self.num_vision_tokens

    def image_token_mask(self) -> torch.Tensor | None:
        """(B_img, N_v max) bool, True at each image's real vision tokens, for outputs padded to
        the batch's longest image; None when every image has the same count (nothing padded)."""
        lengths = self.vision_lengths[self.vision_start >= 0]
        if lengths.numel() == 0 or bool((lengths == lengths.max()).all()):
            return None
        return torch.arange(int(lengths.max()), device=lengths.device)[None, :] < lengths[:, None]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> VLMBatch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                if f.name == "pixel_values" and dtype is not None:
                    v = v.to(device=device, dtype=dtype)
                else:
                    v = v.to(device)
            elif f.name == "image_inputs":
                v = {k: t.to(device) for k, t in v.items()}
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
    def num_vision_tokens(self) -> int | None: ...

    @property
    def images(self) -> ImagePreprocessor: ...

    def template(self, name: str) -> ConversationTemplate: ...


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
    prep = vlm.images
    encoded, kept, skipped = [], [], []
    for s in samples:
        try:
            encoded.append(
                encode(
                    s.conversations,
                    template=chosen,
                    tokenizer=vlm.tokenizer,
                    num_vision_tokens=prep.count(s.image) if s.image is not None else 0,
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
    prepared = prep(images) if images else None
    batch = VLMBatch(
        keys=text["keys"],
        input_ids=text["input_ids"],
        attention_mask=text["attention_mask"],
        response_mask=text["response_mask"],
        vision_start=text["vision_start"],
        num_vision_tokens=vlm.num_vision_tokens,
        pixel_values=prepared.pixel_values if prepared else None,
        extras={"truncated": torch.tensor([e.truncated for e in encoded]), "meta": [s.meta for s in kept]},
        vision_lengths=text["vision_lengths"],
        image_inputs=prepared.extras if prepared else {},
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
    if nv is None:
        raise ValueError("grounding targets need one fixed vision-token grid (the demo's); this model's varies per image")
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
