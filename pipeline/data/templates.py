"""Conversation templates -> token ids, response mask and vision span.

What a template says differs by model family, so each family declares its own (`VLM.templates`;
MobileVLM V2 and LLaVA-1.5 share the two Vicuna ones in alignkd.models.vicuna). A template
(`ConversationTemplate`) only lays a conversation out as text segments in sequence order, each
marked as response or not, with `IMAGE` where the vision block goes and `EOS` for the
end-of-sequence token. Everything after that is the same for every template and lives here:

As in the authors' prompt code, the text around the image placeholder is tokenized chunk by
chunk, only the first BOS is kept, and the image becomes N_v copies of IMAGE_TOKEN, so the
vision block lands wherever the placeholder sits (never a fixed offset). The response mask
marks the tokens the model is trained to produce (positions R): for MobileVLM's templates,
the caption for `plain`, each answer and its EOS for `v1`.

    enc = encode(conversations, template=vlm.template("v1"), tokenizer=vlm.tokenizer,
                 num_vision_tokens=vlm.num_vision_tokens, max_length=2048, has_image=True, key="sample-1")
    batch = collate([enc, ...], pad_id=vlm.tokenizer.pad_token_id)

Truncation policy: a sequence over max_length loses tokens from its end; it is refused
(TemplateError) if that would cut into the vision block or leave no response token.
"""

from __future__ import annotations

import abc
import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from alignkd.cache_schemas import IMAGE_TOKEN  # the id at vision positions; the cache layout defines it

__all__ = [
    "IMAGE_TOKEN",
    "Mark",
    "Segment",
    "ConversationTemplate",
    "TemplateError",
    "Encoded",
    "choose_template",
    "encode",
    "collate",
    "template_words",
]


class TemplateError(ValueError):
    """A conversation that the template cannot encode (message names the sample key), or a
    template name the model's family does not have."""


class Mark(enum.Enum):
    """Segments that are not text."""

    IMAGE = "image"  # the vision block: N_v copies of IMAGE_TOKEN
    EOS = "eos"  # the tokenizer's end-of-sequence token


Segment = tuple[str | Mark, bool]  # (text or mark, is_response)


class ConversationTemplate(abc.ABC):
    """How one family's model reads a conversation: LLaVA-format turns
    (`[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]`)
    -> segments for `encode`."""

    literals: tuple[str, ...] = ()  # the text the template adds, as lines: what a toy tokenizer must cover

    @abc.abstractmethod
    def segments(self, conversations: list[dict[str, Any]], *, has_image: bool, key: str) -> list[Segment]:
        """(text | Mark, is_response) pairs in sequence order, without the leading BOS; a
        TemplateError naming `key` for a conversation this template cannot take."""

    def prompt(self, conversations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation to encode as a generation prompt (its response segments are then
        dropped): here, without its final answer."""
        if conversations and conversations[-1].get("from") == "gpt":
            return conversations[:-1]
        return conversations


def choose_template(templates: Mapping[str, ConversationTemplate], name: str, family: str) -> ConversationTemplate:
    """templates[name]; a one-line TemplateError listing the family's templates otherwise."""
    try:
        return templates[name]
    except KeyError:
        raise TemplateError(f"{name!r} is not one of the {family} templates ({', '.join(templates)})") from None


def template_words(templates: Iterable[ConversationTemplate]) -> list[str]:
    """Every literal word the templates add, split as a word-level tokenizer's whitespace
    pre-tokenizer splits (runs of word characters, runs of punctuation)."""
    text = " ".join(line for t in templates for line in t.literals)
    return sorted(set(re.findall(r"\w+|[^\w\s]+", text)))


@dataclass
class Encoded:
    """One encoded sample. input_ids hold IMAGE_TOKEN at the N_v vision positions."""

    key: str
    input_ids: list[int]
    response_mask: list[bool]
    vision_start: int  # -1 when the sample has no image
    truncated: bool = False
    vision_length: int = 0  # N_v of this sample's image (0 without one)


def encode(
    conversations: list[dict[str, Any]],
    *,
    template: ConversationTemplate,
    tokenizer: Any,
    num_vision_tokens: int,
    max_length: int,
    has_image: bool,
    key: str,
    for_generation: bool = False,
) -> Encoded:
    """Encode one conversation. `num_vision_tokens` is this sample's image's N_v (a
    dynamic-resolution family's count differs per image). `for_generation` encodes the
    template's `prompt` without its response segments, so the sequence ends where the model
    should start answering (after "ASSISTANT:" for v1, after the image for plain); the
    response mask is then empty. A tokenizer without BOS (Qwen's) starts with the template's
    first segment."""
    if for_generation:
        conversations = template.prompt(conversations)
    bos = tokenizer.bos_token_id
    ids: list[int] = [bos] if bos is not None else []
    resp: list[bool] = [False] * len(ids)
    vision_start = -1
    segments = template.segments(conversations, has_image=has_image, key=key)
    if for_generation:
        segments = [(seg, False) for seg, is_resp in segments if not is_resp]
    for seg, is_resp in segments:
        if seg is Mark.IMAGE:
            vision_start = len(ids)
            piece = [IMAGE_TOKEN] * num_vision_tokens
        elif seg is Mark.EOS:
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
    return Encoded(key=key, input_ids=ids, response_mask=resp, vision_start=vision_start, truncated=truncated,
                   vision_length=num_vision_tokens if vision_start >= 0 else 0)


def collate(
    encoded: list[Encoded], *, pad_id: int, padding_side: Literal["right", "left"] = "right"
) -> dict[str, torch.Tensor | list[str]]:
    """Pad to the longest sample. Returns keys, input_ids, attention_mask, response_mask,
    vision_start (shifted by the left padding, -1 for text-only samples) and vision_lengths
    (each sample's N_v, 0 for text-only samples)."""
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
        "vision_lengths": torch.tensor([e.vision_length for e in encoded], dtype=torch.long),
    }
