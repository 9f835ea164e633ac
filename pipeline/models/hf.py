"""What the families built on transformers' own `*ForConditionalGeneration` classes share
(LLaVA, InternVL, Qwen2.5-VL, Qwen2-VL): the wrapped model, tokenizer and image processor, a
frozen vision tower, the modules by the names `VLM` expects, saving as transformers writes a
checkpoint, and the identity of a loaded folder. A family overrides only where its model
differs (Qwen: the ViT and its merger; InternVL: the tokenizer's BOS when saving).

>>> from alignkd.models import load_vlm
>>> from alignkd.models.tiny import write_tiny_models
>>> vlm = load_vlm(write_tiny_models("models", family="llava")["student"])
>>> isinstance(vlm, TransformersVLM), vlm.lm_head is vlm.hf.lm_head
(True, True)
>>> any(p.requires_grad for p in vlm.vision_tower.parameters())   # the tower is frozen
False
>>> vlm.save_pretrained("out/student")                              # transformers' own layout
>>> type(load_vlm("out/student")).__name__, vlm.identity()["family"]
('LlavaVLM', 'llava')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from alignkd.models.base import VLM
from alignkd.models.checkpoint_io import config_hash, weight_files, weights_fingerprint

__all__ = ["TransformersVLM"]


class TransformersVLM(VLM):
    """A `VLM` over a transformers model `hf` (its `.model` holds the decoder, tower and projector)."""

    def __init__(self, hf: nn.Module, tokenizer: Any, image_processor: Any, *, path: str | Path | None = None):
        super().__init__()
        self.hf = hf
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.path = Path(path) if path is not None else None
        for p in self.vision_tower.parameters():  # frozen, as in LLaVA and MobileVLM
            p.requires_grad_(False)

    # The transformers modules, by the names the base class expects.
    @property
    def language_model(self) -> nn.Module:
        return self.hf.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.lm_head

    @property
    def projector(self) -> nn.Module:
        return self.hf.model.multi_modal_projector

    @property
    def vision_tower(self) -> nn.Module:
        return self.hf.model.vision_tower

    @property
    def text_config(self) -> Any:
        return self.hf.config.text_config

    def save_pretrained(self, path: str | Path) -> None:
        """A plain checkpoint folder of the family (transformers' own from_pretrained loads it)."""
        path = Path(path)
        self.hf.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    def identity(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "path": str(self.path) if self.path else None,
            "config_hash": config_hash(json.loads((self.path / "config.json").read_text())) if self.path
            else config_hash(self.hf.config.to_dict()),
            "weights_fingerprint": weights_fingerprint(weight_files(self.path)) if self.path else None,
            "vision_tower": None,
        }
