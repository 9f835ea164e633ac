"""Tiny teacher and student checkpoints, written in the families' real on-disk layouts.

The demo and the tests use them exactly as a user uses real checkpoints: they are saved with
`save_pretrained` and loaded back through `load_vlm`, never built in place.

    paths = write_tiny_models("models/", family="mobilevlm", tokenizer="word")
    teacher = load_vlm(paths["teacher"])

Shapes keep the real pairs' relations at toy scale: the teacher is wider and deeper than the
student and has twice its heads (so the head mixer of the `mix_*` attention variants has work to do), and both
share one CLIP tower, as MobileVLM V2 7B and 1.7B do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from alignkd.data.synthetic import demo_corpus_words
from alignkd.data.templates import V1_SYSTEM, template_words
from alignkd.data.tokenizers import build_sentencepiece_tokenizer, build_word_tokenizer

__all__ = ["TINY_TEXT", "TINY_VISION", "write_tiny_tokenizer", "write_tiny_models", "tiny_image_processor"]

TINY_TEXT = {
    "teacher": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=8),
    "student": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4),
}
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   image_size=48, patch_size=4, projection_dim=64)
# 12 x 12 CLIP patches pooled to 3 x 3 = 9 vision tokens (MobileVLM): one token per cell of the
# demo's 3 x 3 scene grid, so "which token to look at" is exactly "which cell". 4-pixel patches
# because with 8-pixel ones (2 x 2 per cell) a teacher trained 2500 steps read colour but not
# shape (val shape accuracy 0.18 vs 0.43 with 4-pixel patches; the frozen random tower's
# features carried shape either way, measured with a linear probe).
# LLaVA has no pooling layer, so its tiny models keep 8-pixel patches (36 vision tokens) to
# keep the tests that use them fast.
TINY_LLAVA_PATCH = 8
TINY_PROJECTOR_GRID = 3
TINY_VISION_TOWER = "alignkd/clip-tiny"  # a hub-style name, as the real configs carry


def tiny_image_processor() -> CLIPImageProcessorPil:
    size = TINY_VISION["image_size"]
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def write_tiny_tokenizer(out_dir: str | Path, kind: Literal["word", "sentencepiece"] = "word") -> Path:
    """The demo's word-level tokenizer, or a SentencePiece one trained on the same words."""
    words = demo_corpus_words() + template_words()
    if kind == "word":
        return build_word_tokenizer(words, out_dir)
    lines = [V1_SYSTEM, "USER: ASSISTANT:"] + [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return build_sentencepiece_tokenizer(lines * 4, out_dir, vocab_size=400)


def _text_config(role: str, vocab_size: int, num_key_value_heads: int | None = None) -> LlamaConfig:
    shape = TINY_TEXT[role]
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=512,
        num_key_value_heads=num_key_value_heads or shape["num_attention_heads"],
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        **shape,
    )


def write_tiny_models(
    out_dir: str | Path,
    *,
    family: Literal["mobilevlm", "llava"] = "mobilevlm",
    tokenizer: Literal["word", "sentencepiece"] = "word",
    seed: int = 0,
) -> dict[str, Path]:
    """Write out_dir/{tokenizer,teacher,student}; returns their paths. Weights are random
    (seeded): training the demo teacher is the demo's job, not this function's."""
    out = Path(out_dir)
    tok_dir = write_tiny_tokenizer(out / "tokenizer", tokenizer)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    vocab = len(tok)
    paths = {"tokenizer": tok_dir}
    tower = None
    for i, role in enumerate(("teacher", "student")):
        patch = TINY_VISION["patch_size"] if family == "mobilevlm" else TINY_LLAVA_PATCH
        vision = CLIPVisionConfig(**{**TINY_VISION, "patch_size": patch})
        if family == "mobilevlm":
            from alignkd.models.mobilevlm import MobileVLM

            vlm = MobileVLM.from_configs(
                _text_config(role, vocab), vision, tokenizer=tok, image_processor=tiny_image_processor(),
                projector_grid=TINY_PROJECTOR_GRID, mm_vision_tower=TINY_VISION_TOWER, seed=seed + i,
            )
        elif family == "llava":
            from alignkd.models.llava import LlavaVLM

            # The LLaVA teacher uses grouped-query attention so the tap's K/V head expansion is exercised.
            kv = TINY_TEXT[role]["num_attention_heads"] // (2 if role == "teacher" else 1)
            config = LlavaConfig(vision_config=vision, text_config=_text_config(role, vocab, kv),
                                 image_token_index=tok.unk_token_id, vision_feature_layer=-2,
                                 vision_feature_select_strategy="default")
            vlm = LlavaVLM.from_configs(config, tokenizer=tok, image_processor=tiny_image_processor(), seed=seed + i)
        else:
            raise ValueError(f"unknown family {family!r}")
        # One vision tower for both, as MobileVLM V2 7B and 1.7B share one pretrained CLIP.
        if tower is None:
            tower = vlm.vision_tower.state_dict()
        else:
            vlm.vision_tower.load_state_dict(tower)
        vlm.save_pretrained(out / role)
        paths[role] = out / role
    return paths
