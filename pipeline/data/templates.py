"""Conversation templates -> token ids, response mask and vision span.

MobileVLM V2 trains with two templates (ALIGN_KD.md, training setup):
  plain  (pre-training):  <s> [image] caption \\n
  v1     (fine-tuning):   <s> SYSTEM USER: [image]\\nquestion ASSISTANT: answer</s>USER: ... ASSISTANT: answer</s>

As in the authors' prompt code, the text around the image placeholder is tokenized chunk by
chunk, only the first BOS is kept, and the image becomes N_v copies of IMAGE_TOKEN, so the
vision block lands wherever the placeholder sits (never a fixed offset). The response mask
marks the tokens the model is trained to produce (positions R): the caption for `plain`, each
answer and its EOS for `v1`.

    enc = encode(conversations, template="v1", tokenizer=tok, num_vision_tokens=144,
                 max_length=2048, has_image=True, key="sample-1")
    batch = collate([enc, ...], pad_id=tok.pad_token_id)

Truncation policy: a sequence over max_length loses tokens from its end; it is refused
(TemplateError) if that would cut into the vision block or leave no response token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch

from alignkd.data.shards import IMAGE_PLACEHOLDER

__all__ = [
    "IMAGE_TOKEN",
    "TEMPLATES",
    "V1_SYSTEM",
    "TemplateError",
    "Encoded",
    "encode",
    "collate",
    "template_words",
]

IMAGE_TOKEN = -200  # the id at vision positions of input_ids (as in MobileVLM); never a real token
Template = Literal["plain", "v1"]
TEMPLATES = ("plain", "v1")
V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_IMAGE = IMAGE_PLACEHOLDER
_IMAGE_SEGMENT = object()  # marks where the vision block goes in a segment list


class TemplateError(ValueError):
    """A conversation that the template cannot encode (message names the sample key)."""


@dataclass
class Encoded:
    """One encoded sample. input_ids hold IMAGE_TOKEN at the N_v vision positions."""

    key: str
    input_ids: list[int]
    response_mask: list[bool]
    vision_start: int  # -1 when the sample has no image
    truncated: bool = False


def template_words() -> list[str]:
    """Every literal word the templates add, split as a word-level tokenizer's whitespace
    pre-tokenizer splits (runs of word characters, runs of punctuation)."""
    return sorted(set(re.findall(r"\w+|[^\w\s]+", V1_SYSTEM + " USER: ASSISTANT:")))


def _segments(conversations: list[dict[str, Any]], template: str, has_image: bool, key: str) -> list:
    """(text | _IMAGE_SEGMENT | eos marker, is_response) pairs in sequence order."""
    if template == "plain":
        # Pre-training: only the image and the first answer (the caption); the human prompt is unused.
        if not has_image:
            raise TemplateError(f"sample {key}: the plain template needs an image")
        if len(conversations) < 2:
            raise TemplateError(f"sample {key}: the plain template needs a caption turn")
        return [(_IMAGE_SEGMENT, False), (conversations[1]["value"].strip() + "\n", True)]
    if template != "v1":
        raise TemplateError(f"unknown template {template!r} (known: {', '.join(TEMPLATES)})")
    segs: list = []
    prefix = V1_SYSTEM + " "
    for i, turn in enumerate(conversations):
        role, value = turn["from"], turn["value"]
        if (role == "human") != (i % 2 == 0):
            raise TemplateError(f"sample {key}: turn {i} is from {role!r}, expected alternating human/gpt")
        if role == "human":
            text = prefix + "USER: " + value + " ASSISTANT:"
            prefix = ""
            if _IMAGE in text:
                if not has_image:
                    raise TemplateError(f"sample {key}: <image> placeholder but no image")
                before, after = text.split(_IMAGE, 1)
                if _IMAGE in after:
                    raise TemplateError(f"sample {key}: more than one <image> placeholder")
                segs += [(before, False), (_IMAGE_SEGMENT, False), (after, False)]
            else:
                segs.append((text, False))
        else:
            segs += [(" " + value.strip(), True), ("</s>", True)]
    if has_image and not any(s is _IMAGE_SEGMENT for s, _ in segs):
        raise TemplateError(f"sample {key}: image given but no <image> placeholder")
    return segs


def encode(
    conversations: list[dict[str, Any]],
    *,
    template: str,
    tokenizer: Any,
    num_vision_tokens: int,
    max_length: int,
    has_image: bool,
    key: str,
    for_generation: bool = False,
) -> Encoded:
    """Encode one conversation. `for_generation` drops the final answer and ends the
    sequence where the model should start answering (after "ASSISTANT:" for v1, after the
    image for plain); the response mask is then empty."""
    if for_generation:
        if conversations and conversations[-1].get("from") == "gpt":
            conversations = conversations[:-1]
        if template == "plain":
            conversations = [*conversations[:1], {"from": "gpt", "value": ""}]
    ids: list[int] = [tokenizer.bos_token_id]
    resp: list[bool] = [False]
    vision_start = -1
    segments = _segments(conversations, template, has_image, key)
    if for_generation:
        segments = [(seg, False) for seg, is_resp in segments if not is_resp]
    for seg, is_resp in segments:
        if seg is _IMAGE_SEGMENT:
            vision_start = len(ids)
            piece = [IMAGE_TOKEN] * num_vision_tokens
        elif seg == "</s>":
            piece = [tokenizer.eos_token_id]
        elif seg.strip() == "" and seg != "\n":
            continue
        else:
            piece = tokenizer(seg, add_special_tokens=False)["input_ids"]
        ids += piece
        resp += [is_resp] * len(piece)

    truncated = len(ids) > max_length
    if truncated:
        if vision_start >= 0 and vision_start + num_vision_tokens > max_length:
            raise TemplateError(
                f"sample {key}: {len(ids)} tokens, max_length {max_length} would cut the vision block"
            )
        ids, resp = ids[:max_length], resp[:max_length]
    if not any(resp) and not for_generation:
        why = "no response token left after truncation" if truncated else "no response tokens"
        raise TemplateError(f"sample {key}: {why} (max_length {max_length})")
    return Encoded(key=key, input_ids=ids, response_mask=resp, vision_start=vision_start, truncated=truncated)


def collate(
    encoded: list[Encoded], *, pad_id: int, padding_side: Literal["right", "left"] = "right"
) -> dict[str, torch.Tensor | list[str]]:
    """Pad to the longest sample. Returns keys, input_ids, attention_mask, response_mask and
    vision_start (shifted by the left padding, -1 for text-only samples)."""
    if not encoded:
        raise ValueError("collate needs at least one sample")
    length = max(len(e.input_ids) for e in encoded)
    bsz = len(encoded)
    input_ids = torch.full((bsz, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((bsz, length), dtype=torch.long)
    response_mask = torch.zeros((bsz, length), dtype=torch.bool)
    vision_start = torch.full((bsz,), -1, dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        off = length - n if padding_side == "left" else 0
        input_ids[i, off : off + n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[i, off : off + n] = 1
        response_mask[i, off : off + n] = torch.tensor(e.response_mask, dtype=torch.bool)
        if e.vision_start >= 0:
            vision_start[i] = e.vision_start + off
    return {
        "keys": [e.key for e in encoded],
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "vision_start": vision_start,
    }
