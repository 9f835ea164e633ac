"""The InternVL family against transformers' own InternVL: its image features, its forward with
its own image-token splicing, its chat template and processor prompt, its checkpoint format;
then both stages end to end with an InternVL teacher and student. (The tap against eager
attention, the gradient to layer 0 and generation run for every family in test_tap.py and
test_generate.py.)"""

import dataclasses
import json
import types

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, InternVLForConditionalGeneration
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.internvl.processing_internvl import InternVLProcessor

from alignkd.data import DataArgs
from alignkd.data.batching import make_batch
from alignkd.data.shards import Sample
from alignkd.data.templates import encode
from alignkd.evaluate import EvalArgs
from alignkd.models import IMAGE_TOKEN, ModelArgs, load_vlm
from alignkd.models.internvl import IMG_CONTEXT, InternVLVLM
from alignkd.signals import image_preprocessing, image_view
from alignkd.train import LossArgs, OptimArgs, RunArgs, TrainArgs, train
from conftest import build_cache

CONVERSATION = [  # a real-format sample: two turns, the image in the first
    {"from": "human", "value": "<image>\nWhat colour is the square?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "And how many circles are there?"},
    {"from": "gpt", "value": "two"},
]
HF_MESSAGES = [  # the same conversation as transformers' chat messages
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": [{"type": "text", "text": "And how many circles are there?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
]


@pytest.fixture(scope="module")
def teacher(tiny_models):
    return load_vlm(tiny_models["internvl"]["teacher"])


def _hf_ids(vlm, batch):
    """input_ids as transformers' InternVL reads them: its image token at the vision positions."""
    return batch.input_ids.masked_fill(batch.input_ids == IMAGE_TOKEN, vlm.hf.config.image_token_id)


def _processor_prompt(tokenizer, nv, messages, **template_kw):
    """The prompt InternVLProcessor builds: the tokenizer's chat template, then each image's
    <IMG_CONTEXT> replaced by the processor's own `replace_image_token` (one tile). The full
    processor needs torchvision (for its video part), which is not installed beside CPU torch."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, **template_kw)
    fields = types.SimpleNamespace(start_image_token=tokenizer.start_image_token, image_token=IMG_CONTEXT,
                                   end_image_token=tokenizer.end_image_token, image_seq_length=nv)
    expanded = InternVLProcessor.replace_image_token(fields, {"num_patches": [1]}, 0)
    assert text.count(IMG_CONTEXT) == 1
    return text.replace(IMG_CONTEXT, expanded)


def _encoded_text(vlm, conversations, **kw):
    enc = encode(conversations, template=vlm.template("chatml"), tokenizer=vlm.tokenizer,
                 num_vision_tokens=vlm.num_vision_tokens, max_length=512, has_image=True, key="k", **kw)
    ids = [vlm.hf.config.image_token_id if i == IMAGE_TOKEN else i for i in enc.input_ids]
    return enc, ids, vlm.tokenizer.decode(ids)


def test_the_chat_template_is_the_tokenizers_own_and_the_processors_prompt(teacher):
    tok, nv = teacher.tokenizer, teacher.num_vision_tokens
    enc, ids, text = _encoded_text(teacher, CONVERSATION)
    expected = _processor_prompt(tok, nv, HF_MESSAGES)
    assert text == expected
    assert text.startswith("<|im_start|>user\n<img><IMG_CONTEXT>") and "</img>\nWhat colour" in text
    # chunk-wise tokenisation gives the ids of the whole prompt, tokenised as the processor does
    assert ids == tok(expected, add_special_tokens=False)["input_ids"]
    # the vision block sits right after <img>
    assert ids[enc.vision_start - 1] == tok.convert_tokens_to_ids("<img>")
    assert ids[enc.vision_start + nv] == tok.convert_tokens_to_ids("</img>")
    # responses: each answer and its <|im_end|>, not the "\n" after it nor the prompt
    answers = [tok.decode([i for i, r in zip(ids, enc.response_mask) if r])]
    assert answers == ["red<|im_end|>two<|im_end|>"]
    # the generation prompt is the chat template's add_generation_prompt (one turn: `encode`
    # drops every response segment of a generation prompt, earlier answers included)
    _, _, prompt = _encoded_text(teacher, CONVERSATION[:2], for_generation=True)
    assert prompt == _processor_prompt(tok, nv, HF_MESSAGES[:1], add_generation_prompt=True)


def test_the_full_processor_gives_the_same_ids_and_pixels(teacher):
    pytest.importorskip("torchvision")  # InternVLProcessor builds its video processor with it
    processor = InternVLProcessor(image_processor=teacher.image_processor, tokenizer=teacher.tokenizer,
                                  image_seq_length=teacher.num_vision_tokens)
    image = Image.new("RGB", (60, 40), (200, 30, 30))
    text = teacher.tokenizer.apply_chat_template(HF_MESSAGES, tokenize=False)
    out = processor(text=text, images=[image], crop_to_patches=False, return_tensors="pt")
    _, ids, _ = _encoded_text(teacher, CONVERSATION)
    assert out["input_ids"][0].tolist() == ids
    torch.testing.assert_close(out["pixel_values"], teacher.preprocess_images([image]))


def test_preprocessing_is_one_stretched_tile_as_the_image_processor_makes_it(teacher):
    image = Image.new("RGB", (90, 30), (10, 200, 30))
    pixels = teacher.preprocess_images([image])
    size = teacher.hf.config.vision_config.image_size
    assert pixels.shape == (1, 3, *size)
    # the image processor itself, tiling off: one tile, the whole image resized to the square
    reference = GotOcr2ImageProcessorPil.from_pretrained(teacher.path)(
        [image.resize(tuple(size), Image.BICUBIC)], crop_to_patches=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, reference, atol=0.05, rtol=0)
    # with tiling on the same image would be three tiles and a thumbnail: not what this family serves
    tiled = teacher.image_processor([image], crop_to_patches=True, return_tensors="pt")["pixel_values"]
    assert tiled.shape[0] > 1
    view = image_view(image_preprocessing(teacher))
    assert view == {"pad_to_square": False, "resize": "stretch", "crop_fraction": [1.0, 1.0],
                    "tiles": {"crop_to_patches": False, "max_patches": None}}


def test_projector_output_equals_transformers_image_features(teacher, demo_samples):
    batch, _ = make_batch(teacher, demo_samples[:3], template="chatml", max_length=512)
    with torch.no_grad():
        ours = teacher.encode_images(batch.pixel_values)
        theirs = teacher.hf.get_image_features(batch.pixel_values).pooler_output
    assert ours.shape == (3, teacher.num_vision_tokens, teacher.hidden_size)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    # another feature layer: only the layers up to it run, transformers takes hidden_states[layer]
    teacher.hf.config.vision_feature_layer = 1
    try:
        with torch.no_grad():
            ours = teacher.encode_images(batch.pixel_values)
            theirs = teacher.hf.get_image_features(batch.pixel_values, vision_feature_layer=1).pooler_output
    finally:
        teacher.hf.config.vision_feature_layer = -1
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_logits_equal_transformers_forward_with_its_own_image_splicing(tiny_models, demo_samples, role):
    path = tiny_models["internvl"][role]
    vlm = load_vlm(path)
    reference = InternVLForConditionalGeneration.from_pretrained(path).eval()  # transformers alone
    batch, _ = make_batch(vlm, demo_samples[:4], template="chatml", max_length=512, padding_side="right")
    assert len(set(batch.attention_mask.sum(1).tolist())) > 1, "rows of one length would not test the padding"
    with torch.no_grad():
        ours = vlm.logits(vlm(batch, tap_layers=(0,)).hidden)
        theirs = reference(input_ids=_hf_ids(vlm, batch), pixel_values=batch.pixel_values,
                           attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


def test_save_round_trips_through_load_vlm_and_transformers(teacher, tiny_models, demo_samples, tmp_path):
    student = load_vlm(tiny_models["internvl"]["student"])
    assert student.hf.lm_head.weight is student.hf.model.language_model.embed_tokens.weight  # tied, as InternVL3-1B
    student.save_pretrained(tmp_path / "again")
    again = load_vlm(tmp_path / "again")
    a, b = student.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch, _ = make_batch(student, demo_samples[:3], template="chatml", max_length=512)
    with torch.no_grad():
        torch.testing.assert_close(student(batch).hidden, again(batch).hidden, rtol=0, atol=0)
        hf = InternVLForConditionalGeneration.from_pretrained(tmp_path / "again").eval()
        logits = hf(input_ids=_hf_ids(student, batch), pixel_values=batch.pixel_values,
                    attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(logits[real], student.logits(student(batch).hidden)[real], atol=1e-5, rtol=1e-5)
    assert again.identity()["weights_fingerprint"] == student.identity()["weights_fingerprint"]
    # the files are InternVL's own: the tokenizer keeps no BOS (the one this module names is not
    # written), its chat template and image tokens; one tile per image; the tokens per tile
    tok = AutoTokenizer.from_pretrained(tmp_path / "again")
    assert tok.bos_token is None and tok.chat_template and tok.context_image_token == IMG_CONTEXT
    preprocessor = json.loads((tmp_path / "again" / "preprocessor_config.json").read_text())
    assert preprocessor["crop_to_patches"] is False
    processor = json.loads((tmp_path / "again" / "processor_config.json").read_text())
    assert processor["image_seq_length"] == student.num_vision_tokens == hf.config.image_seq_length


def test_teacher_and_student_share_tokenizer_and_vision_grid(tiny_models):
    teacher, student = (load_vlm(tiny_models["internvl"][r]) for r in ("teacher", "student"))
    from alignkd.signals import tokenizer_hash

    assert tokenizer_hash(teacher.tokenizer) == tokenizer_hash(student.tokenizer)
    assert teacher.num_vision_tokens == student.num_vision_tokens
    assert teacher.text_config.num_key_value_heads < teacher.num_heads  # grouped-query attention in the teacher


def test_a_sample_without_the_placeholder_or_with_two_is_skipped_not_fatal(teacher):
    image = Image.new("RGB", (48, 48))
    bad = [Sample(key="none", conversations=[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"}],
                  image=image),
           Sample(key="two", conversations=[{"from": "human", "value": "<image> <image>"},
                                            {"from": "gpt", "value": "x"}], image=image)]
    batch, skipped = make_batch(teacher, bad, template="chatml", max_length=512)
    assert batch is None and [k for k, _ in skipped] == ["none", "two"]


def test_both_stages_end_to_end_with_an_internvl_teacher_and_student(tiny_models, demo_data, tmp_path):
    """extract-teacher's worker code on the InternVL teacher, then train-student on the InternVL
    student with every loss term on; the export loads back through load_vlm and transformers."""
    cache = build_cache(tiny_models, demo_data, tmp_path / "cache", family="internvl")
    args = TrainArgs(
        student=ModelArgs(path=str(tiny_models["internvl"]["student"]), device="cpu"),
        data=DataArgs(shards=str(demo_data / "train"), template="chatml", max_length=256, batch_size=4),
        cache=str(cache),
        optim=OptimArgs(lr=1e-3, projector_lr=1e-3, adapter_lr=1e-2, grad_accum=1),
        loss=LossArgs(sup=1.0, logit=1.0, attn=1.0, v_all=1.0, v_focus=1.0, focus_k=4),
        run=RunArgs(dir=str(tmp_path / "run"), max_steps=3, save_every=3, keep_last=1, gradient_checkpointing=True),
        eval=EvalArgs(shards=str(demo_data / "val"), max_samples=4, max_new_tokens=2),
    )
    before = load_vlm(args.student.path).state_dict()
    assert train(args, echo=lambda _: None, progress=False).steps == 3
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    terms = {"sup", "logit", "attn", "v_all", "v_focus"}
    assert terms <= set(metrics[1]) and all(metrics[1][t] > 0 for t in terms)
    export = tmp_path / "run" / "export"
    student = load_vlm(export)
    assert isinstance(student, InternVLVLM)
    after = student.state_dict()
    assert not torch.equal(before["hf.model.multi_modal_projector.linear_1.weight"],
                           after["hf.model.multi_modal_projector.linear_1.weight"])
    InternVLForConditionalGeneration.from_pretrained(export)
    # a student that sees other image regions than the InternVL teacher is refused
    other = dataclasses.replace(args, student=ModelArgs(path=str(tiny_models["llava"]["student"]), device="cpu"),
                                data=dataclasses.replace(args.data, template="v1"),
                                run=dataclasses.replace(args.run, dir=str(tmp_path / "refused")))
    with pytest.raises(ValueError, match=r"image geometry: pad_to_square False \(teacher\) vs True \(student\)"):
        train(other, echo=lambda _: None, progress=False)


def test_tap_equals_eager_attention_with_the_image_anywhere_in_the_conversation(tiny_models):
    """Hand-made samples put the vision block at different offsets (first words, after a
    question, in the second human turn) in one right-padded batch; layers 0 and 2."""
    path, layers = tiny_models["internvl"]["teacher"], (0, 2)
    tap, eager = load_vlm(path), load_vlm(path, attn_implementation="eager")
    with torch.no_grad():  # peaked attention, identically in both, so wrong rows or columns show
        for vlm in (tap, eager):
            for layer in layers:
                attn = vlm.language_model.layers[layer].self_attn
                attn.q_proj.weight.mul_(6.0)
                attn.k_proj.weight.mul_(6.0)
    image = Image.new("RGB", (48, 48), (30, 30, 200))
    turns = [
        [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "blue"}],
        [{"from": "human", "value": "Look at this picture and say how many squares: <image>"},
         {"from": "gpt", "value": "three squares"}],
        [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "hi"},
         {"from": "human", "value": "<image>\nWhat shape is on the left?"}, {"from": "gpt", "value": "a circle"}],
    ]
    samples = [Sample(key=str(i), image=image, conversations=c) for i, c in enumerate(turns)]
    batch, skipped = make_batch(tap, samples, template="chatml", max_length=512)
    assert not skipped and len(set(batch.vision_start.tolist())) == 3
    with torch.no_grad():
        out = tap(batch, tap_layers=layers)
        embeds, _ = eager.inputs_embeds(batch)
        ref = eager.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                   position_ids=eager.position_ids(batch),
                                   output_attentions=True).attentions
    nv = batch.num_vision_tokens
    assert max(float(out.blocks[layer].probs.max()) for layer in layers) > 0.3
    for layer in layers:
        for b, start in enumerate(batch.vision_start.tolist()):
            n_rows = int(batch.attention_mask[b].sum()) - (start + nv)
            assert int(out.blocks[layer].query_mask[b].sum()) == n_rows
            expected = ref[layer][b, :, start + nv : start + nv + n_rows, start : start + nv]
            torch.testing.assert_close(out.blocks[layer].probs[b, :, :n_rows], expected, atol=1e-5, rtol=0)


def test_image_view_tells_a_stretched_tile_from_a_centre_crop_and_from_tiles(teacher):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ours = image_view(image_preprocessing(teacher))
    # CLIP's resize keeps the aspect ratio and crops the long side: other regions of a non-square image
    clip = types.SimpleNamespace(pad_images=False, image_processor=CLIPImageProcessorPil(
        size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}))
    tiled = types.SimpleNamespace(pad_images=False, image_processor=GotOcr2ImageProcessorPil(
        size={"height": 48, "width": 48}, crop_to_patches=True))
    assert image_view(image_preprocessing(clip)) != ours
    assert image_view(image_preprocessing(tiled)) != ours
