"""make_batch takes the template from the model it batches for: a family of its own (here a
made-up one behind the BatchModel protocol, no alignkd.models code) brings its own template."""

import pytest
import torch

from alignkd.data.batching import make_batch
from alignkd.data.images import PreparedImages
from alignkd.data.shards import Sample
from alignkd.data.templates import IMAGE_TOKEN, ConversationTemplate, Mark, TemplateError, choose_template
from alignkd.data.tokenizers import build_word_tokenizer

NV = 4


class QATemplate(ConversationTemplate):
    """"Q: question A: answer</s>" with the image first, as some other family might read a sample."""

    literals = ("Q: A:",)

    def segments(self, conversations, *, has_image, key):
        question = conversations[0]["value"].replace("<image>", "").strip()
        return [(Mark.IMAGE, False), ("Q: " + question, False), (" A: " + conversations[1]["value"], True),
                (Mark.EOS, True)]


class ToyModel:
    family = "toy"
    templates = {"qa": QATemplate()}
    image_processor = None
    pad_images = False
    num_vision_tokens = NV

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def template(self, name):
        return choose_template(self.templates, name, self.family)

    @property
    def images(self):
        return ToyImages()


class ToyImages:
    """A fixed-count family's image preparation: NV tokens per image."""

    def count(self, image):
        return NV

    def __call__(self, images):
        return PreparedImages(torch.zeros(len(images), 3, 8, 8), {}, [NV] * len(images))

    def settings(self):
        return {}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from transformers import AutoTokenizer

    words = "Q : A what colour ? red".split()
    return ToyModel(AutoTokenizer.from_pretrained(build_word_tokenizer(words, tmp_path_factory.mktemp("tok"))))


def test_make_batch_encodes_with_the_models_own_template(toy):
    from PIL import Image

    sample = Sample("s0", Image.new("RGB", (8, 8)), [{"from": "human", "value": "<image>\nwhat colour ?"},
                                                       {"from": "gpt", "value": "red"}])
    batch, skipped = make_batch(toy, [sample], template="qa", max_length=64)
    ids = batch.input_ids[0].tolist()
    assert skipped == [] and ids[:1 + NV] == [toy.tokenizer.bos_token_id] + [IMAGE_TOKEN] * NV
    words = toy.tokenizer.convert_ids_to_tokens(ids[1 + NV:])
    assert words == "Q : what colour ? A : red </s>".split()
    assert toy.tokenizer.convert_ids_to_tokens([i for i, r in zip(ids, batch.response_mask[0]) if r]) == \
        "A : red </s>".split()


@pytest.mark.bad_input
def test_a_template_the_models_family_lacks_is_refused_listing_its_templates(toy):
    with pytest.raises(TemplateError, match=r"^'v1' is not one of the toy templates \(qa\)$"):
        make_batch(toy, [], template="v1", max_length=64)
