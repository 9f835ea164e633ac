"""The Qwen2.5-VL family: transformers' `Qwen2_5_VLForConditionalGeneration` from a local
folder (the 7B-Instruct teacher, the 3B-Instruct student), seen through the `VLM` interface;
Qwen2-VL (`Qwen2VLForConditionalGeneration`, the same layout around a ViT without window
attention) shares the path as `Qwen2VLVLM`.

What differs from the Llama-based families, and where it is handled:
  * dynamic resolution: an image is resized by the model's own processor to a multiple of
    patch x merge pixels within [min_pixels, max_pixels], so its vision-token count depends
    on its size (`num_vision_tokens` is None; `images.count(image)` gives it, from the
    processor's own `get_number_of_image_patches`). Batches are ragged: see VLMBatch.
  * vision features P are the patch merger's output (transformers' `get_image_features`),
    one (N_v_i, D) block per image, padded to the batch's largest in `encode_images`.
  * M-RoPE: 3-D positions (temporal, height, width) from the model's own `get_rope_index`,
    never re-derived; the decoder applies its own rotary, and the tap reads q/k after it.
  * grouped-query attention (fewer key heads than query heads): the tap expands the key
    heads as the model's attention does.
  * the processor (PIL variant: transformers' `AutoProcessor` for this family needs
    torchvision for its video half) is built from the folder's preprocessor_config.json; its
    min/max pixels, patch, merge and temporal patch sizes go into the cache's
    image_preprocessing ("grid") and a student with other settings is refused.

`Qwen2_5_VLVLM.from_pretrained("/models/Qwen2.5-VL-7B-Instruct", dtype=torch.bfloat16)` loads
the real model (pass the dtype: transformers 5 would pick the checkpoint's own); a tiny one:

>>> from PIL import Image
>>> from alignkd.models.tiny import write_tiny_models
>>> paths = write_tiny_models("models", family="qwen2_5_vl")
>>> vlm = Qwen2_5_VLVLM.from_pretrained(paths["teacher"])
>>> vlm.num_vision_tokens is None, vlm.images.count(Image.new("RGB", (48, 48))), vlm.images.count(Image.new("RGB", (64, 32)))
(True, 36, 32)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from alignkd.data.batching import VLMBatch
from alignkd.data.images import PreparedImages
from alignkd.data.templates import IMAGE_TOKEN
from alignkd.models.base import CheckpointSummary, ModelError
from alignkd.models.chatml import ChatMLTemplate
from alignkd.models.hf import TransformersVLM

__all__ = ["Qwen2_5_VLVLM", "Qwen2VLVLM", "QwenImages", "QWEN_SPECIAL_TOKENS"]

# Qwen's special tokens, by role (the real tokenizer's names; the tiny tokenizer adds them).
QWEN_SPECIAL_TOKENS = {
    "pad": "<|endoftext|>", "im_start": "<|im_start|>", "eos": "<|im_end|>", "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>", "image": "<|image_pad|>", "video": "<|video_pad|>",
}

# The tiny tokenizer's chat template: the one Qwen2.5-VL-Instruct's tokenizer ships (images and
# text items of a message in order, a default system turn), so that tests compare the family's
# ChatML template against the tokenizer's own apply_chat_template.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class QwenImages:
    """Qwen2-VL / Qwen2.5-VL image preparation through the model's own processor (picklable)."""

    image_processor: Qwen2VLImageProcessorPil

    def count(self, image: Image.Image) -> int:
        w, h = image.size
        proc = self.image_processor
        return proc.get_number_of_image_patches(h, w) // proc.merge_size**2

    def __call__(self, images: list[Image.Image]) -> PreparedImages:
        out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        grid = out["image_grid_thw"]
        lengths = (grid.prod(-1) // self.image_processor.merge_size**2).tolist()
        return PreparedImages(out["pixel_values"], {"image_grid_thw": grid}, lengths)

    def settings(self) -> dict[str, Any]:
        """Everything that decides an image's resized size and token grid."""
        proc = self.image_processor
        return {"grid": {"min_pixels": proc.size["shortest_edge"], "max_pixels": proc.size["longest_edge"],
                         "patch_size": proc.patch_size, "merge_size": proc.merge_size,
                         "temporal_patch_size": proc.temporal_patch_size}}


class Qwen2_5_VLVLM(TransformersVLM):
    family = "qwen2_5_vl"
    templates = {"chatml": ChatMLTemplate()}  # Qwen's own chat format (models/chatml.py)
    pad_images = False  # the processor keeps the aspect ratio
    hf_class: Any = Qwen2_5_VLForConditionalGeneration
    config_class: Any = Qwen2_5_VLConfig

    def __init__(self, hf: Qwen2_5_VLForConditionalGeneration, tokenizer: Any,
                 image_processor: Qwen2VLImageProcessorPil, *, path: str | Path | None = None):
        _check_processor(hf.config.vision_config, image_processor, Path(path) if path is not None else None)
        super().__init__(hf, tokenizer, image_processor, path=path)  # freezes the ViT; its merger is the projector

    @property
    def projector(self) -> nn.Module:
        return self.hf.model.visual.merger

    @property
    def vision_tower(self) -> nn.Module:
        """The ViT without its merger (which is the projector, trained at projector_lr)."""
        visual = self.hf.model.visual
        return nn.ModuleList([visual.patch_embed, visual.blocks])

    @property
    def text_config(self) -> Any:
        return self.language_model.config

    @property
    def num_vision_tokens(self) -> None:
        return None  # per image: `images.count`

    @property
    def images(self) -> QwenImages:
        return QwenImages(self.image_processor)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Patches (sum over images, C * t * p * p) and their grids (B_img, 3) -> the merger's
        output, (B_img, N_v max, D) padded with zeros past each image's own count."""
        if image_grid_thw is None:
            raise ModelError("Qwen2.5-VL images need their image_grid_thw (VLMBatch.image_inputs)")
        per_image = self.hf.model.get_image_features(pixel_values, image_grid_thw).pooler_output
        return nn.utils.rnn.pad_sequence(list(per_image), batch_first=True)

    def vision_grids(self, batch: VLMBatch) -> list[tuple[int, int]] | None:
        """Each image's merged-token grid: its patch grid (t, h, w) over the merge size, row-major."""
        grid = batch.image_inputs.get("image_grid_thw")
        merge = self.image_processor.merge_size
        return None if grid is None else [(int(h) // merge, int(w) // merge) for _, h, w in grid.tolist()]

    def position_ids(self, batch: VLMBatch) -> torch.Tensor:
        """(3, B, T) M-RoPE positions from the model's own rope index: text advances all three
        axes together, an image's tokens take (t, row, column) offsets from where it starts."""
        ids = batch.input_ids
        positions, _ = self.hf.model.get_rope_index(
            ids, mm_token_type_ids=(ids == IMAGE_TOKEN).int(), image_grid_thw=batch.image_inputs.get("image_grid_thw"),
            attention_mask=batch.attention_mask)
        return positions

    # --- checkpoints ------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        attn_implementation: str = "tap") -> Qwen2_5_VLVLM:
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelError(f"{config_file}: not found (expected a Qwen2.5-VL checkpoint folder)")
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type != cls.family:
            raise ModelError(f"{config_file}: model_type is {model_type!r}, expected {cls.family!r}")
        if not (path / "preprocessor_config.json").is_file():
            raise ModelError(f"{path / 'preprocessor_config.json'}: not found (the image processor's settings)")
        attn = "eager" if attn_implementation == "eager" else "sdpa"
        hf = cls.hf_class.from_pretrained(path, dtype=dtype, attn_implementation=attn)
        vlm = cls(hf.to(device), AutoTokenizer.from_pretrained(path), Qwen2VLImageProcessorPil.from_pretrained(path),
                  path=path)
        if attn_implementation == "tap":
            vlm.use_tap_attention()
        return vlm.eval()

    @classmethod
    def describe(cls, path: Path) -> CheckpointSummary:
        text = cls.config_class.from_pretrained(path).text_config
        return CheckpointSummary(cls.family, None, text.hidden_size, text.num_attention_heads, text.num_hidden_layers,
                                 text.vocab_size, AutoTokenizer.from_pretrained(path),
                                 images=QwenImages(Qwen2VLImageProcessorPil.from_pretrained(path)))

    @classmethod
    def tiny_tokenizer(cls, path: Path) -> Any:
        """The demo's word-level tokenizer with Qwen's special tokens and chat template, no
        BOS (as Qwen's), eos <|im_end|> and pad <|endoftext|> (as the Instruct tokenizers)."""
        tok = AutoTokenizer.from_pretrained(path)
        tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS.values())})
        tok.pad_token, tok.eos_token, tok.bos_token = QWEN_SPECIAL_TOKENS["pad"], QWEN_SPECIAL_TOKENS["eos"], None
        tok.chat_template = _QWEN_CHAT_TEMPLATE
        tok.save_pretrained(path)
        return AutoTokenizer.from_pretrained(path)

    @classmethod
    def build_tiny(cls, role: str, *, text: dict[str, Any], vision: dict[str, Any], tokenizer: Any,
                   image_processor: Any, seed: int) -> Qwen2_5_VLVLM:
        """The shared toy shapes in Qwen's layout: grouped-query attention in the teacher (half
        as many key heads), M-RoPE sections scaled to the head size as in the real models
        (1/4, 3/8, 3/8 of the rotary half), 4-pixel patches merged 2 x 2 (a 48 x 48 image is 36
        tokens), windows of 2 x 2 merged tokens with the last block full attention, so window
        attention is exercised; images between 32 x 32 and 64 x 64 pixels' worth."""
        heads = text["num_attention_heads"]
        half = text["hidden_size"] // heads // 2
        section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
        ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in QWEN_SPECIAL_TOKENS.items()}
        text_config = dict(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=heads // 2 if role == "teacher" else heads, rms_norm_eps=text["rms_norm_eps"],
            max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                           "mrope_section": section},
            bos_token_id=None, eos_token_id=ids["eos"], pad_token_id=ids["pad"], tie_word_embeddings=False)
        text_part, vision_part = cls._tiny_parts(text_config, vision, patch=4)
        config = cls.config_class(text_config=text_part.to_dict(), vision_config=vision_part.to_dict(),
                                  image_token_id=ids["image"], video_token_id=ids["video"],
                                  vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
                                  tie_word_embeddings=False)
        processor = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=4, merge_size=2,
                                             temporal_patch_size=2)
        torch.manual_seed(seed)
        vlm = cls(cls.hf_class(config), tokenizer, processor)
        vlm.use_tap_attention()
        return vlm

    @classmethod
    def _tiny_parts(cls, text: dict[str, Any], vision: dict[str, Any], patch: int) -> tuple[Any, Any]:
        """The tiny text and vision configs of this family (window attention in Qwen2.5-VL)."""
        return Qwen2_5_VLTextConfig(**text), Qwen2_5_VLVisionConfig(
            depth=vision["num_hidden_layers"], hidden_size=vision["hidden_size"],
            intermediate_size=vision["intermediate_size"], num_heads=vision["num_attention_heads"], patch_size=patch,
            spatial_merge_size=2, temporal_patch_size=2, window_size=2 * 2 * patch,
            fullatt_block_indexes=[vision["num_hidden_layers"] - 1], out_hidden_size=text["hidden_size"])



class Qwen2VLVLM(Qwen2_5_VLVLM):
    """Qwen2-VL: the same processor, template, M-RoPE and merger-as-projector; its ViT has no
    window attention and its merger a LayerNorm."""

    family = "qwen2_vl"
    hf_class = Qwen2VLForConditionalGeneration
    config_class = Qwen2VLConfig

    @classmethod
    def _tiny_parts(cls, text: dict[str, Any], vision: dict[str, Any], patch: int) -> tuple[Any, Any]:
        return Qwen2VLTextConfig(**text), Qwen2VLVisionConfig(
            depth=vision["num_hidden_layers"], embed_dim=vision["hidden_size"],
            mlp_ratio=vision["intermediate_size"] // vision["hidden_size"], num_heads=vision["num_attention_heads"],
            patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, hidden_size=text["hidden_size"])


def _check_processor(vision_config: Any, proc: Qwen2VLImageProcessorPil, path: Path | None) -> None:
    """The processor must cut the patches the tower was built for (one line naming both)."""
    pairs = {"patch_size": (proc.patch_size, vision_config.patch_size),
             "merge_size": (proc.merge_size, vision_config.spatial_merge_size),
             "temporal_patch_size": (proc.temporal_patch_size, vision_config.temporal_patch_size)}
    for name, (theirs, tower) in pairs.items():
        if theirs != tower:
            where = f"{path}: " if path else ""
            raise ModelError(f"{where}the image processor's {name} is {theirs}, the vision tower's {tower}")
