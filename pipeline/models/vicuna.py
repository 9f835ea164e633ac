"""The conversation templates of the Llama / Vicuna families (MobileVLM V2, LLaVA-1.5).

MobileVLM V2 trains with two templates (ALIGN_KD.md, training setup); LLaVA-1.5 uses the same:
  plain  (pre-training):  <s> [image] caption \\n
  v1     (fine-tuning):   <s> SYSTEM USER: [image]\\nquestion ASSISTANT: answer</s>USER: ... ASSISTANT: answer</s>

A family declares them as `templates = VICUNA_TEMPLATES`; `encode` (alignkd.data.templates)
does the tokenisation, the same for every template:

>>> from alignkd.data.templates import Mark
>>> VICUNA_TEMPLATES["v1"].segments([{"from": "human", "value": "<image>\\nWhat colour?"},
...                                   {"from": "gpt", "value": "red"}], has_image=True, key="k")[1:]
[(<Mark.IMAGE: 'image'>, False), ('\\nWhat colour? ASSISTANT:', False), (' red', True), (<Mark.EOS: 'eos'>, True)]
"""

from __future__ import annotations

from typing import Any

from alignkd.data.shards import IMAGE_PLACEHOLDER
from alignkd.data.templates import ConversationTemplate, Mark, Segment, TemplateError

__all__ = ["V1_SYSTEM", "PlainTemplate", "VicunaV1Template", "VICUNA_TEMPLATES"]

V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class PlainTemplate(ConversationTemplate):
    """Pre-training: only the image and the first answer (the caption); the human prompt is unused."""

    def segments(self, conversations: list[dict[str, Any]], *, has_image: bool, key: str) -> list[Segment]:
        if not has_image:
            raise TemplateError(f"sample {key}: the plain template needs an image")
        if len(conversations) < 2:
            raise TemplateError(f"sample {key}: the plain template needs a caption turn")
        return [(Mark.IMAGE, False), (conversations[1]["value"].strip() + "\n", True)]

    def prompt(self, conversations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The human turn and an empty caption: the prompt ends right after the image."""
        return [*super().prompt(conversations)[:1], {"from": "gpt", "value": ""}]


class VicunaV1Template(ConversationTemplate):
    """Fine-tuning: the system prompt, then "USER: ... ASSISTANT:" turns; every answer and its
    EOS are responses."""

    literals = (V1_SYSTEM, "USER: ASSISTANT:")

    def segments(self, conversations: list[dict[str, Any]], *, has_image: bool, key: str) -> list[Segment]:
        segs: list[Segment] = []
        prefix = V1_SYSTEM + " "
        for i, turn in enumerate(conversations):
            role, value = turn["from"], turn["value"]
            if (role == "human") != (i % 2 == 0):
                raise TemplateError(f"sample {key}: turn {i} is from {role!r}, expected alternating human/gpt")
            if role == "human":
                text = prefix + "USER: " + value + " ASSISTANT:"
                prefix = ""
                if IMAGE_PLACEHOLDER in text:
                    if not has_image:
                        raise TemplateError(f"sample {key}: <image> placeholder but no image")
                    before, after = text.split(IMAGE_PLACEHOLDER, 1)
                    if IMAGE_PLACEHOLDER in after:
                        raise TemplateError(f"sample {key}: more than one <image> placeholder")
                    segs += [(before, False), (Mark.IMAGE, False), (after, False)]
                else:
                    segs.append((text, False))
            else:
                segs += [(" " + value.strip(), True), (Mark.EOS, True)]
        if has_image and not any(s is Mark.IMAGE for s, _ in segs):
            raise TemplateError(f"sample {key}: image given but no <image> placeholder")
        return segs


VICUNA_TEMPLATES: dict[str, ConversationTemplate] = {"plain": PlainTemplate(), "v1": VicunaV1Template()}
