"""The ChatML template against the tokenizer's own chat template (Qwen2.5-VL-Instruct's, carried
by the tiny Qwen tokenizer): the same text and the same ids for real-format conversations, the
assistant turns as the response, and generation prompts ending in the assistant header."""

import pytest

from alignkd.data.templates import IMAGE_TOKEN, Mark, TemplateError, encode
from alignkd.models.chatml import ChatMLTemplate

CONVERSATIONS = [
    # LLaVA format, then the same conversation as Qwen's chat messages
    ([{"from": "human", "value": "<image>\nHow many squares are there?"}, {"from": "gpt", "value": "three"},
      {"from": "human", "value": "What colour is the cross?"}, {"from": "gpt", "value": "a purple cross"}],
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many squares are there?"}]},
      {"role": "assistant", "content": "three"},
      {"role": "user", "content": "What colour is the cross?"},
      {"role": "assistant", "content": "a purple cross"}]),
    ([{"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "a yellow square"}],
     [{"role": "user", "content": [{"type": "text", "text": "Describe the image."}, {"type": "image"}]},
      {"role": "assistant", "content": "a yellow square"}]),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from alignkd.models.tiny import write_tiny_tokenizer
    from alignkd.models.qwen2_5_vl import Qwen2_5_VLVLM

    return Qwen2_5_VLVLM.tiny_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), family="qwen2_5_vl"))


def _text(segments):
    return "".join("<|image_pad|>" if s is Mark.IMAGE else s for s, _ in segments)


@pytest.mark.parametrize("llava, messages", CONVERSATIONS)
def test_chatml_text_and_ids_equal_the_tokenizers_chat_template(tokenizer, llava, messages):
    template = ChatMLTemplate()
    segments = template.segments(llava, has_image=True, key="k")
    reference = tokenizer.apply_chat_template(messages, tokenize=False)
    assert _text(segments) == reference
    enc = encode(llava, template=template, tokenizer=tokenizer, num_vision_tokens=5, max_length=512, has_image=True,
                 key="k")
    ids = enc.input_ids
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # the image span is 5 IMAGE_TOKENs where the processor would expand <|image_pad|> 5 times
    assert ids[enc.vision_start : enc.vision_start + 5] == [IMAGE_TOKEN] * 5 and enc.vision_length == 5
    collapsed = ids[: enc.vision_start] + [pad] + ids[enc.vision_start + 5 :]
    assert collapsed == tokenizer(reference, add_special_tokens=False)["input_ids"]
    # the responses: each answer and the <|im_end|> closing it
    answers = [t["value"] for t in llava if t["from"] == "gpt"]
    expected = [i for a in answers for i in tokenizer(a + "<|im_end|>", add_special_tokens=False)["input_ids"]]
    assert [i for i, r in zip(ids, enc.response_mask) if r] == expected


def test_a_generation_prompt_ends_in_the_assistant_header(tokenizer):
    llava, messages = CONVERSATIONS[1]
    template = ChatMLTemplate()
    prompt = template.segments(template.prompt(llava), has_image=True, key="k")
    assert _text(prompt) == tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    enc = encode(llava, template=template, tokenizer=tokenizer, num_vision_tokens=3, max_length=512, has_image=True,
                 key="k", for_generation=True)
    assert tokenizer.convert_ids_to_tokens(enc.input_ids[-2:]) == ["<|im_start|>", "assistant"]
    assert not any(enc.response_mask)


def test_the_system_prompt_and_image_wrapper_are_parameters():
    t = ChatMLTemplate(system=None, image_wrap=("<img>", "</img>"))
    segs = t.segments([{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yes"}], has_image=True,
                      key="k")
    assert _text(segs) == "<|im_start|>user\n<img><|image_pad|></img>hi<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"


@pytest.mark.bad_input
@pytest.mark.parametrize("turns, has_image, message", [
    ([{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yes"}], False, "placeholder but no image"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}], True, "no <image> placeholder"),
    ([{"from": "gpt", "value": "yes"}], False, "expected alternating human/gpt"),
    ([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "yes"}], True, "more than one"),
])
def test_conversations_the_template_cannot_take_are_refused_naming_the_sample(turns, has_image, message):
    with pytest.raises(TemplateError, match=f"^sample k: .*{message}"):
        ChatMLTemplate().segments(turns, has_image=has_image, key="k")
