"""ChatML conversation templates (Qwen2-VL, Qwen2.5-VL; InternVL uses the same turn format).

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|>[image]<|vision_end|>question<|im_end|>\\n
    <|im_start|>assistant\\nanswer<|im_end|>\\n

The response segments are the assistant turns: each answer and the `<|im_end|>` that closes
it (the Instruct tokenizers' eos), not the newline after it nor the "assistant" header. The
image sits where the human turn's `<image>` placeholder is, inside the family's wrapper text
(`image_wrap`: Qwen's `<|vision_start|>` / `<|vision_end|>`; another family passes its own),
and one newline beside the placeholder is LLaVA's separator, not text: "<image>\\nWhat?" reads
as the image followed by "What?", as Qwen's chat template renders an image item then a text
item. The text equals the tokenizer's own `apply_chat_template` with the image item expanded
(tests/models/test_chatml.py checks it on Qwen's template):

>>> t = ChatMLTemplate()
>>> segs = t.segments([{"from": "human", "value": "<image>\\nWhat colour?"}, {"from": "gpt", "value": "red"}],
...                   has_image=True, key="k")
>>> [s for s, is_response in segs if is_response]
['red<|im_end|>']
>>> "".join("<|image_pad|>" if s is Mark.IMAGE else s for s, _ in segs)
'<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\\n<|im_start|>assistant\\nred<|im_end|>\\n'
"""

from __future__ import annotations

from typing import Any

from alignkd.data.shards import IMAGE_PLACEHOLDER
from alignkd.data.templates import ConversationTemplate, Mark, Segment, TemplateError

__all__ = ["QWEN_SYSTEM", "QWEN_IMAGE_WRAP", "ChatMLTemplate", "CHATML_SPECIAL_TOKENS"]

QWEN_SYSTEM = "You are a helpful assistant."
QWEN_IMAGE_WRAP = ("<|vision_start|>", "<|vision_end|>")
CHATML_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
_ROLES = {"human": "user", "gpt": "assistant"}


class ChatMLTemplate(ConversationTemplate):
    """LLaVA-format turns in ChatML. `system`: the system prompt (None: no system turn);
    `image_wrap`: the text before and after the vision block."""

    def __init__(self, system: str | None = QWEN_SYSTEM, image_wrap: tuple[str, str] = QWEN_IMAGE_WRAP):
        self.system = system
        self.image_wrap = image_wrap
        # the plain words a toy tokenizer must cover (the special tokens are added as such)
        self.literals = ((system,) if system else ()) + ("system user assistant",)

    def segments(self, conversations: list[dict[str, Any]], *, has_image: bool, key: str) -> list[Segment]:
        segs: list[Segment] = []
        if self.system is not None:
            segs.append((f"<|im_start|>system\n{self.system}<|im_end|>\n", False))
        images = 0
        for i, turn in enumerate(conversations):
            role, value = turn.get("from"), turn.get("value")
            if role not in _ROLES or (role == "human") != (i % 2 == 0):
                raise TemplateError(f"sample {key}: turn {i} is from {role!r}, expected alternating human/gpt")
            if role == "gpt":
                segs.append(("<|im_start|>assistant\n", False))
                if value is not None:  # None: the turn the model is to write (`prompt`)
                    segs += [(value.strip() + "<|im_end|>", True), ("\n", False)]
                continue
            value = value or ""
            images += value.count(IMAGE_PLACEHOLDER)
            if images > 1:
                raise TemplateError(f"sample {key}: more than one <image> placeholder")
            if IMAGE_PLACEHOLDER in value:
                if not has_image:
                    raise TemplateError(f"sample {key}: <image> placeholder but no image")
                before, after = value.split(IMAGE_PLACEHOLDER, 1)
                before = before[:-1] if before.endswith("\n") else before
                after = after[1:] if after.startswith("\n") else after
                segs += [(f"<|im_start|>user\n{before}{self.image_wrap[0]}", False), (Mark.IMAGE, False),
                         (f"{self.image_wrap[1]}{after}<|im_end|>\n", False)]
            else:
                segs.append((f"<|im_start|>user\n{value}<|im_end|>\n", False))
        if has_image and not images:
            raise TemplateError(f"sample {key}: image given but no <image> placeholder")
        return segs

    def prompt(self, conversations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Without the final answer, ending in the assistant header the model continues
        (apply_chat_template's add_generation_prompt)."""
        return [*super().prompt(conversations), {"from": "gpt", "value": None}]
