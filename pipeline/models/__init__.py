"""Vision-language model families behind one interface (`VLM`, see models/base.py).

    from alignkd.models import load_vlm
    vlm = load_vlm("/models/MobileVLM_V2-7B", vision_tower="/models/clip-vit-large-patch14-336")

`load_vlm` reads `model_type` from the folder's config.json: "mobilevlm" (MobileVLM V2, the
paper's models, in the authors' release layout) or "llava" (transformers' LLaVA).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from alignkd.models.base import IMAGE_TOKEN, VLM, ModelError, VLMBatch, VLMOutput

__all__ = [
    "IMAGE_TOKEN", "VLM", "VLMBatch", "VLMOutput", "ModelError", "ModelArgs", "CheckpointSummary",
    "load_vlm", "load_model", "describe_checkpoint", "checkpoint_identity", "FAMILIES",
]

FAMILIES = ("mobilevlm", "llava")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelArgs:
    """A checkpoint folder and how to run it."""

    path: str = ""
    vision_tower: str | None = None  # local CLIP folder for MobileVLM's mm_vision_tower hub name
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # "auto": cuda when available, else cpu

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


def load_model(args: ModelArgs, *, attn_implementation: str = "tap") -> VLM:
    """`load_vlm` from a ModelArgs section of a job."""
    if not args.path:
        raise ModelError("model.path is not set: point it at a checkpoint folder")
    return load_vlm(args.path, vision_tower=args.vision_tower, dtype=_DTYPES[args.dtype],
                    device=args.resolved_device(), attn_implementation=attn_implementation)


@dataclass
class CheckpointSummary:
    """What a checkpoint's config says, without loading its weights (for size estimates)."""

    family: str
    num_vision_tokens: int
    hidden_size: int
    num_heads: int
    num_layers: int
    vocab_size: int
    tokenizer: Any


def _read_config(path: str | Path) -> dict[str, Any]:
    config_file = Path(path) / "config.json"
    try:
        return json.loads(config_file.read_text())
    except FileNotFoundError:
        raise ModelError(f"{config_file}: not found (expected a checkpoint folder)") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{config_file}: not valid JSON ({e})") from None


def describe_checkpoint(path: str | Path) -> CheckpointSummary:
    """Shapes and tokenizer of a checkpoint folder from its config files alone."""
    from transformers import AutoTokenizer

    config = _read_config(path)
    family = config.get("model_type")
    if family == "mobilevlm":
        from alignkd.models.mobilevlm import DEFAULT_GRID, _llama_config

        text = _llama_config(config, Path(path) / "config.json")
        nv = config.get("alignkd_projector_grid", DEFAULT_GRID) ** 2
        tokenizer = AutoTokenizer.from_pretrained(path, config=text)
    elif family == "llava":
        from transformers import LlavaConfig

        llava = LlavaConfig.from_pretrained(path)
        text, vc = llava.text_config, llava.vision_config
        nv = (vc.image_size // vc.patch_size) ** 2 + (llava.vision_feature_select_strategy != "default")
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        raise ModelError(f"{Path(path) / 'config.json'}: model_type {family!r} is not supported")
    return CheckpointSummary(family, nv, text.hidden_size, text.num_attention_heads, text.num_hidden_layers,
                             text.vocab_size, tokenizer)


def checkpoint_identity(path: str | Path) -> dict[str, str]:
    """config_hash and weights_fingerprint of a checkpoint folder, computed as the loaded
    model's identity() computes them, without loading the model (for staleness checks)."""
    from alignkd.models.checkpoint_io import config_hash, weight_files, weights_fingerprint

    return {"config_hash": config_hash(_read_config(path)), "weights_fingerprint": weights_fingerprint(weight_files(path))}


def load_vlm(
    path: str | Path,
    *,
    vision_tower: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str = "tap",
) -> VLM:
    """Load a checkpoint folder of either family; `vision_tower` maps MobileVLM's CLIP hub name
    to a local folder. attn_implementation: "tap" (SDPA + layer q/k capture) or "eager"."""
    config_file = Path(path) / "config.json"
    model_type = _read_config(path).get("model_type")
    if model_type == "mobilevlm":
        from alignkd.models.mobilevlm import MobileVLM

        return MobileVLM.from_pretrained(
            path, vision_tower=vision_tower, dtype=dtype, device=device, attn_implementation=attn_implementation
        )
    if model_type == "llava":
        from alignkd.models.llava import LlavaVLM

        return LlavaVLM.from_pretrained(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    raise ModelError(f"{config_file}: model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
