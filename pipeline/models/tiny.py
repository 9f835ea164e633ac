"""Tiny teacher and student checkpoints, written in the families' real on-disk layouts.

The demo and the tests use them exactly as a user uses real checkpoints: they are saved with
`save_pretrained` and loaded back through `load_vlm`, never built in place.

>>> from alignkd.models import load_vlm
>>> paths = write_tiny_models("models", family="mobilevlm", tokenizer="word")
>>> sorted(paths)
['student', 'teacher', 'tokenizer']
>>> teacher, student = load_vlm(paths["teacher"]), load_vlm(paths["student"])
>>> (teacher.hidden_size, teacher.num_heads), (student.hidden_size, student.num_heads)
((128, 8), (64, 4))

Shapes keep the real pairs' relations at toy scale: the teacher is wider and deeper than the
student and has twice its heads (so the head mixer of the `mix_*` attention variants has work to do), and both
share one CLIP tower, as MobileVLM V2 7B and 1.7B do. The shapes are the same for every
family; what a family makes of them (its projector, its patch size) is its `VLM.build_tiny`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from alignkd.data.synthetic import demo_corpus_words
from alignkd.data.templates import template_words
from alignkd.data.tokenizers import build_sentencepiece_tokenizer, build_word_tokenizer
from alignkd.models import family_class

__all__ = ["TINY_TEXT", "TINY_VISION", "write_tiny_tokenizer", "write_tiny_models", "write_tiny_student",
           "tiny_image_processor"]

TINY_TEXT = {
    "teacher": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=8),
    "student": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4),
}
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   image_size=48, patch_size=4, projection_dim=64)
# 4-pixel patches (12 x 12 of them) because with 8-pixel ones (2 x 2 per cell of the demo's 3 x 3
# scene grid) a MobileVLM teacher trained 2500 steps read colour but not shape (val shape
# accuracy 0.18 vs 0.43 with 4-pixel patches; the frozen random tower's features carried shape
# either way, measured with a linear probe).


def tiny_image_processor(size: int = TINY_VISION["image_size"]) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def write_tiny_tokenizer(out_dir: str | Path, kind: Literal["word", "sentencepiece"] = "word",
                         family: str = "mobilevlm") -> Path:
    """The demo's word-level tokenizer, or a SentencePiece one trained on the same words, both
    covering the family's templates."""
    templates = family_class(family).templates.values()
    words = demo_corpus_words() + template_words(templates)
    if kind == "word":
        return build_word_tokenizer(words, out_dir)
    lines = [line for t in templates for line in t.literals]
    lines += [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return build_sentencepiece_tokenizer(lines * 4, out_dir, vocab_size=400)


def _text_shape(role: str, vocab_size: int) -> dict:
    """The decoder of `role`, as LlamaConfig keywords (LLaMA's special ids, see data/tokenizers.py)."""
    shape = TINY_TEXT[role]
    return dict(vocab_size=vocab_size, max_position_embeddings=512, num_key_value_heads=shape["num_attention_heads"],
                rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **shape)


def write_tiny_models(
    out_dir: str | Path,
    *,
    family: str = "mobilevlm",
    tokenizer: Literal["word", "sentencepiece"] = "word",
    seed: int = 0,
) -> dict[str, Path]:
    """Write out_dir/{tokenizer,teacher,student}; returns their paths. Weights are random
    (seeded): training the demo teacher is the demo's job, not this function's. `family` is a
    key of alignkd.models.FAMILIES."""
    cls = family_class(family)
    out = Path(out_dir)
    tok_dir = write_tiny_tokenizer(out / "tokenizer", tokenizer, family)
    tok = cls.tiny_tokenizer(tok_dir)  # the family may add its special tokens (Qwen's ChatML)
    paths = {"tokenizer": tok_dir}
    tower = None
    for i, role in enumerate(("teacher", "student")):
        vlm = cls.build_tiny(role, text=_text_shape(role, len(tok)), vision=dict(TINY_VISION), tokenizer=tok,
                             image_processor=tiny_image_processor(), seed=seed + i)
        # One vision tower for both, as MobileVLM V2 7B and 1.7B share one pretrained CLIP.
        if tower is None:
            tower = vlm.vision_tower.state_dict()
        else:
            vlm.vision_tower.load_state_dict(tower)
        vlm.save_pretrained(out / role)
        paths[role] = out / role
    return paths


def write_tiny_student(out_dir: str | Path, tokenizer_dir: str | Path, *, family: str = "mobilevlm",
                       image_size: int = 32, seed: int = 7) -> Path:
    """A tiny student with a vision tower of its own: other random weights than the teacher's
    and, by default, another resolution (32 px against 48; the same 3 x 3 vision tokens after
    MobileVLM's pooling), i.e. a pair that does not share one tower. `tokenizer_dir`: the
    pair's tokenizer (write_tiny_models' "tokenizer")."""
    cls = family_class(family)
    vlm = cls.build_tiny("student", text=_text_shape("student", len(cls.tiny_tokenizer(tokenizer_dir))),
                         vision={**TINY_VISION, "image_size": image_size}, tokenizer=cls.tiny_tokenizer(tokenizer_dir),
                         image_processor=tiny_image_processor(image_size), seed=seed)
    vlm.save_pretrained(out_dir)
    return Path(out_dir)
