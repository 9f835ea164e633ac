"""The LLaVA family: transformers' `LlavaForConditionalGeneration` (LLaVA-1.5 and relatives)
from a local folder, seen through the `VLM` interface.

We reuse transformers' modules and on-disk layout as they are, and only take over the
splicing of image features (by IMAGE_TOKEN positions, see models/base.py) so that both
families share one forward with the layer-0 tap. `LlavaVLM.from_pretrained("/models/llava-1.5-7b-hf")`
loads the real model; a tiny one:

>>> from alignkd.models.tiny import write_tiny_models
>>> paths = write_tiny_models("models", family="llava")
>>> vlm = LlavaVLM.from_pretrained(paths["teacher"])
>>> vlm.num_vision_tokens, vlm.hidden_size             # 6 x 6 CLIP patches, CLS dropped
(36, 128)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from alignkd.models.base import CheckpointSummary, ModelError, clip_patch_features
from alignkd.models.hf import TransformersVLM
from alignkd.models.vicuna import VICUNA_TEMPLATES

__all__ = ["LlavaVLM"]


class LlavaVLM(TransformersVLM):
    family = "llava"
    templates = VICUNA_TEMPLATES

    def __init__(self, hf: LlavaForConditionalGeneration, tokenizer: Any, image_processor: Any, *,
                 path: str | Path | None = None, pad_images: bool = True):
        super().__init__(hf, tokenizer, image_processor, path=path)
        self.pad_images = pad_images

    @property
    def num_vision_tokens(self) -> int:
        vc = self.hf.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n if self.hf.config.vision_feature_select_strategy == "default" else n + 1

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.hf.config
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise ModelError("LLaVA checkpoints with several vision_feature_layer values are not supported")
        tower = self.hf.model.vision_tower
        feats = clip_patch_features(tower, pixel_values.to(tower.dtype), layer,
                                    drop_cls=cfg.vision_feature_select_strategy == "default")
        return self.hf.model.multi_modal_projector(feats)

    def projector_spec(self) -> dict[str, Any]:
        return _projector_spec(self.hf.config)

    @classmethod
    def build_projector(cls, spec: dict[str, Any]) -> nn.Module:
        # Only the widths matter to the projector; one head keeps the configs' own checks happy.
        config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=spec["vision_hidden_size"], num_attention_heads=1),
                             text_config=LlamaConfig(hidden_size=spec["hidden_size"], num_attention_heads=1),
                             projector_hidden_act=spec["act"], multimodal_projector_bias=spec["bias"],
                             vision_feature_layer=spec["input"]["feature_layer"])
        return LlavaMultiModalProjector(config)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        attn_implementation: str = "tap", pad_images: bool = True) -> LlavaVLM:
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelError(f"{config_file}: not found (expected a LLaVA checkpoint folder)")
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type != "llava":
            raise ModelError(f"{config_file}: model_type is {model_type!r}, expected 'llava'")
        attn = "eager" if attn_implementation == "eager" else "sdpa"
        hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn)
        vlm = cls(hf.to(device), AutoTokenizer.from_pretrained(path),
                  CLIPImageProcessorPil.from_pretrained(path), path=path, pad_images=pad_images)
        if attn_implementation == "tap":
            vlm.use_tap_attention()
        return vlm.eval()

    @classmethod
    def from_configs(cls, config: LlavaConfig, *, tokenizer: Any, image_processor: Any, seed: int = 0) -> LlavaVLM:
        torch.manual_seed(seed)
        vlm = cls(LlavaForConditionalGeneration(config), tokenizer, image_processor)
        vlm.use_tap_attention()
        return vlm

    @classmethod
    def describe(cls, path: Path) -> CheckpointSummary:
        llava = LlavaConfig.from_pretrained(path)
        text, vc = llava.text_config, llava.vision_config
        nv = (vc.image_size // vc.patch_size) ** 2 + (llava.vision_feature_select_strategy != "default")
        return CheckpointSummary(cls.family, nv, text.hidden_size, text.num_attention_heads, text.num_hidden_layers,
                                 text.vocab_size, AutoTokenizer.from_pretrained(path), projector_spec=_projector_spec(llava),
                                 text_config=text, vision_config=vc)

    @classmethod
    def build_tiny(cls, role: str, *, text: dict[str, Any], vision: dict[str, Any], tokenizer: Any,
                   image_processor: Any, seed: int) -> LlavaVLM:
        """8-pixel patches: LLaVA has no pooling layer, so 4-pixel ones would give 144 vision
        tokens and slow the tests that use these models. The teacher uses grouped-query
        attention so the tap's K/V head expansion is exercised."""
        kv = text["num_attention_heads"] // (2 if role == "teacher" else 1)
        config = LlavaConfig(vision_config=CLIPVisionConfig(**{**vision, "patch_size": 8}),
                             text_config=LlamaConfig(**{**text, "num_key_value_heads": kv}),
                             image_token_index=tokenizer.unk_token_id, vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
        return cls.from_configs(config, tokenizer=tokenizer, image_processor=image_processor, seed=seed)


def _projector_spec(config: LlavaConfig) -> dict[str, Any]:
    """`VLM.projector_spec` of a LLaVA config: the two-layer MLP over one CLIP layer's features."""
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ModelError("LLaVA checkpoints with several vision_feature_layer values are not supported")
    return {"type": "llava_mlp", "vision_hidden_size": config.vision_config.hidden_size,
            "hidden_size": config.text_config.hidden_size, "act": config.projector_hidden_act,
            "bias": config.multimodal_projector_bias,
            "input": {"feature_layer": layer, "drop_cls": config.vision_feature_select_strategy == "default"}}
