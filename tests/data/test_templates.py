"""Templates: where the vision block lands, which tokens are responses, how truncation works."""

import pytest

from alignkd.data.templates import IMAGE_TOKEN, TemplateError, collate, encode, template_words
from alignkd.data.tokenizers import build_word_tokenizer
from alignkd.models.vicuna import V1_SYSTEM, VICUNA_TEMPLATES

NV = 5
PLAIN, V1 = VICUNA_TEMPLATES["plain"], VICUNA_TEMPLATES["v1"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    words = template_words([PLAIN, V1])
    words += "a red circle at the top left what colour is shape ? . blue square two".split()
    return AutoTokenizer.from_pretrained(build_word_tokenizer(words, tmp_path_factory.mktemp("tok")))


def _conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


def _words(tok, ids):
    return tok.convert_ids_to_tokens([i for i in ids if i >= 0])


def test_plain_puts_the_image_after_bos_and_trains_on_the_caption(tok):
    enc = encode(_conv("<image>\nDescribe.", "a red circle at the top left ."), template=PLAIN, tokenizer=tok,
                 num_vision_tokens=NV, max_length=64, has_image=True, key="k")
    assert enc.input_ids[0] == tok.bos_token_id
    assert enc.vision_start == 1
    assert enc.input_ids[1 : 1 + NV] == [IMAGE_TOKEN] * NV
    response = [i for i, r in zip(enc.input_ids, enc.response_mask) if r]
    assert _words(tok, response) == "a red circle at the top left .".split()
    assert not any(enc.response_mask[: 1 + NV])


def test_v1_places_the_image_after_the_system_prompt_and_masks_answers_with_eos(tok):
    conv = _conv("<image>\nwhat colour is the circle ?", "red", "what shape is at the top left ?", "circle")
    enc = encode(conv, template=V1, tokenizer=tok, num_vision_tokens=NV, max_length=256, has_image=True, key="k")
    prefix = tok(V1_SYSTEM + " USER: ", add_special_tokens=False)["input_ids"]
    assert enc.vision_start == 1 + len(prefix)
    assert enc.input_ids[1 : enc.vision_start] == prefix
    # responses: "red </s>" and "circle </s>", in order, nothing else
    spans, cur = [], []
    for i, r in zip(enc.input_ids, enc.response_mask):
        if r:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert [_words(tok, s) for s in spans] == [["red", "</s>"], ["circle", "</s>"]]


def test_placeholder_position_inside_the_turn_moves_the_vision_block(tok):
    first = encode(_conv("<image>\nwhat colour ?", "red"), template=V1, tokenizer=tok, num_vision_tokens=NV,
                   max_length=256, has_image=True, key="a")
    later = encode(_conv("what colour ? <image>", "red"), template=V1, tokenizer=tok, num_vision_tokens=NV,
                   max_length=256, has_image=True, key="b")
    assert later.vision_start == first.vision_start + 3
    assert later.input_ids[later.vision_start : later.vision_start + NV] == [IMAGE_TOKEN] * NV


def test_text_only_samples_have_no_vision_block(tok):
    enc = encode(_conv("what colour ?", "red"), template=V1, tokenizer=tok, num_vision_tokens=NV,
                 max_length=256, has_image=False, key="t")
    assert enc.vision_start == -1 and IMAGE_TOKEN not in enc.input_ids


@pytest.mark.parametrize(
    ("turns", "has_image", "template", "message"),
    [
        (("<image> <image> what ?", "red"), True, "v1", "more than one <image>"),
        (("what ?", "red"), True, "v1", "image given but no <image>"),
        (("<image> what ?", "red"), False, "v1", "placeholder but no image"),
        (("<image>",), True, "plain", "needs a caption turn"),
        (("what ?", "red"), False, "plain", "needs an image"),
    ],
)
@pytest.mark.bad_input
def test_bad_conversations_are_refused_naming_the_sample(tok, turns, has_image, template, message):
    with pytest.raises(TemplateError) as info:
        encode(_conv(*turns), template=VICUNA_TEMPLATES[template], tokenizer=tok, num_vision_tokens=NV, max_length=256,
               has_image=has_image, key="bad-7")
    assert message in str(info.value) and "bad-7" in str(info.value)


@pytest.mark.bad_input
def test_truncation_cuts_the_end_and_refuses_what_it_cannot_keep(tok):
    conv = _conv("<image>\nwhat colour ?", "red circle at the top left")
    full = encode(conv, template=PLAIN, tokenizer=tok, num_vision_tokens=NV, max_length=256, has_image=True, key="k")
    cut = encode(conv, template=PLAIN, tokenizer=tok, num_vision_tokens=NV, max_length=len(full.input_ids) - 2,
                 has_image=True, key="k")
    assert cut.truncated and cut.input_ids == full.input_ids[:-2]
    with pytest.raises(TemplateError, match="no response token left"):
        encode(conv, template=PLAIN, tokenizer=tok, num_vision_tokens=NV, max_length=1 + NV, has_image=True, key="k")
    with pytest.raises(TemplateError, match="cut the vision block"):
        encode(conv, template=PLAIN, tokenizer=tok, num_vision_tokens=NV, max_length=NV, has_image=True, key="k")


def test_collate_pads_either_side_and_shifts_the_vision_start(tok):
    a = encode(_conv("<image>\nwhat colour ?", "red"), template=V1, tokenizer=tok, num_vision_tokens=NV,
               max_length=256, has_image=True, key="a")
    b = encode(_conv("<image>", "a red circle at the top left ."), template=PLAIN, tokenizer=tok,
               num_vision_tokens=NV, max_length=256, has_image=True, key="b")
    for side in ("right", "left"):
        batch = collate([a, b], pad_id=tok.pad_token_id, padding_side=side)
        for row, enc in enumerate((a, b)):
            mask = batch["attention_mask"][row].bool()
            assert batch["input_ids"][row][mask].tolist() == enc.input_ids
            assert batch["response_mask"][row][mask].tolist() == enc.response_mask
            start = int(batch["vision_start"][row])
            assert batch["input_ids"][row, start : start + NV].tolist() == [IMAGE_TOKEN] * NV
            assert not batch["response_mask"][row][~mask].any()
