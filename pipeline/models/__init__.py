"""Vision-language model families behind one interface (`VLM`, see models/base.py).

`load_vlm` reads `model_type` from a checkpoint folder's config.json and hands the folder to
that family's class, found in FAMILIES and imported only then (loading a MobileVLM never
imports the LLaVA code). A new family is one module with one `VLM` subclass, plus one line in
FAMILIES; the loader, the tiny-model builder and `make-tiny-models --family` all read it.

>>> from alignkd.models.tiny import write_tiny_models
>>> paths = write_tiny_models("models", family="llava")
>>> vlm = load_vlm(paths["student"])      # a family's own options pass through (MobileVLM: vision_tower=)
>>> type(vlm).__name__, sorted(vlm.templates)
('LlavaVLM', ['plain', 'v1'])
>>> describe_checkpoint(paths["teacher"]).num_vision_tokens   # from the config files alone
36
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from alignkd.models.base import IMAGE_TOKEN, VLM, CheckpointSummary, ModelError, VLMBatch, VLMOutput

__all__ = [
    "IMAGE_TOKEN", "VLM", "VLMBatch", "VLMOutput", "ModelError", "ModelArgs", "CheckpointSummary",
    "load_vlm", "load_model", "describe_checkpoint", "checkpoint_identity", "family_class", "checkpoint_family",
    "FAMILIES",
]

# config.json's model_type -> "module:Class" of the family's VLM subclass.
FAMILIES = {
    "mobilevlm": "alignkd.models.mobilevlm:MobileVLM",  # MobileVLM V2, the paper's models (authors' layout)
    "llava": "alignkd.models.llava:LlavaVLM",  # transformers' LLaVA (LLaVA-1.5 and relatives)
    "qwen2_5_vl": "alignkd.models.qwen2_5_vl:Qwen2_5_VLVLM",  # transformers' Qwen2.5-VL (dynamic resolution, M-RoPE)
    "qwen2_vl": "alignkd.models.qwen2_5_vl:Qwen2VLVLM",  # transformers' Qwen2-VL (the same path)
    "internvl": "alignkd.models.internvl:InternVLVLM",  # transformers' InternVL (InternVL3-*-hf), one tile per image
}
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


def family_class(model_type: Any, source: str | Path | None = None) -> type[VLM]:
    """The VLM subclass of a family, imported on first use; a ModelError listing the
    supported families (naming `source`, the config file it came from) otherwise."""
    if model_type not in FAMILIES:
        where = f"{source}: model_type" if source is not None else "family"
        raise ModelError(f"{where} {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    module, name = FAMILIES[model_type].split(":")
    return getattr(importlib.import_module(module), name)


def checkpoint_family(path: str | Path) -> type[VLM]:
    """The family class of a checkpoint folder, from its config.json's model_type."""
    config_file = Path(path) / "config.json"
    return family_class(_read_config(path).get("model_type"), config_file)


def load_model(args: ModelArgs, *, attn_implementation: str = "tap") -> VLM:
    """`load_vlm` from a ModelArgs section of a job."""
    if not args.path:
        raise ModelError("model.path is not set: point it at a checkpoint folder")
    return load_vlm(args.path, vision_tower=args.vision_tower, dtype=_DTYPES[args.dtype],
                    device=args.resolved_device(), attn_implementation=attn_implementation)


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
    return checkpoint_family(path).describe(Path(path))


def checkpoint_identity(path: str | Path) -> dict[str, str]:
    """config_hash and weights_fingerprint of a checkpoint folder, computed as the loaded
    model's identity() computes them, without loading the model (for staleness checks)."""
    from alignkd.models.checkpoint_io import config_hash, weight_files, weights_fingerprint

    return {"config_hash": config_hash(_read_config(path)), "weights_fingerprint": weights_fingerprint(weight_files(path))}


def load_vlm(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str = "tap",
    **options: Any,
) -> VLM:
    """Load a checkpoint folder of any family (`VLM.from_pretrained`). attn_implementation:
    "tap" (SDPA + layer q/k capture) or "eager". `options` go to the family's loader; one
    left at None is not passed (ModelArgs.vision_tower of a LLaVA job), one the family does
    not take is a ModelError."""
    cls = checkpoint_family(path)
    options = {k: v for k, v in options.items() if v is not None}
    takes = inspect.signature(cls.from_pretrained).parameters
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ModelError(f"{Path(path) / 'config.json'}: a {cls.family} checkpoint takes no option {unknown[0]!r}")
    return cls.from_pretrained(path, dtype=dtype, device=device, attn_implementation=attn_implementation, **options)
