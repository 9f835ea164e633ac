"""The Qwen2.5-VL family (and Qwen2-VL, on the same path) against transformers' own model: the layer-0 tap equals the eager
attention weights of transformers' full forward (its own splice, vision tower and M-RoPE
positions) with images of different sizes in one batch, padding on either side, a text-only
sample and the vision block at different offsets; vision features are the merger's output
per image; generation matches transformers' greedy generate; exports load back through
load_vlm and transformers' from_pretrained."""

import dataclasses
import json
import shutil

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from alignkd.data.batching import make_batch
from alignkd.data.templates import IMAGE_TOKEN
from alignkd.models import ModelError, load_vlm
from alignkd.models.base import GenerationSettings
from alignkd.models.qwen2_5_vl import Qwen2_5_VLVLM

LAYERS = (0, 1)
SIZES = [(48, 48), (64, 32), (40, 56), (96, 64)]  # 36, 32, 35 and 54 vision tokens


@pytest.fixture(scope="module")
def qwen(tiny_models):
    return tiny_models["qwen2_5_vl"]  # written by tests/conftest.py through save_pretrained


FAMILY_CLASSES = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration}


def _samples(demo_samples):
    """Five samples: images of four sizes, one with text before its image (the vision block
    further in), one text-only."""
    picked = [s for s in demo_samples if s.meta["task"] == "caption"][:2] + [
        s for s in demo_samples if s.meta["task"] != "caption"][:3]
    out = [dataclasses.replace(s, image=s.image.resize(size)) for s, size in zip(picked, SIZES)]
    turns = out[1].conversations
    out[1] = dataclasses.replace(out[1], conversations=[
        {"from": "human", "value": "Look at this picture : " + turns[0]["value"]}, *turns[1:]])
    text_only = picked[4]
    out.append(dataclasses.replace(text_only, image=None, conversations=[
        {"from": "human", "value": text_only.conversations[0]["value"].replace("<image>\n", "")},
        *text_only.conversations[1:]]))
    return out


def _sharpen(*vlms, factor=6.0):
    """Random-init attention is nearly uniform, which would hide wrong positions or masks;
    scaling the tapped layers' query and key projections makes it peaked (in each model alike)."""
    with torch.no_grad():
        for vlm in vlms:
            for layer in LAYERS:
                attn = vlm.language_model.layers[layer].self_attn
                for proj in (attn.q_proj, attn.k_proj):
                    proj.weight.mul_(factor)
                    proj.bias.mul_(factor)


def _hf_inputs(vlm, batch):
    """The batch as transformers' own Qwen2.5-VL forward takes it: image pad tokens in the ids,
    the modality of each position, the processor's patches and grids."""
    is_image = batch.input_ids == IMAGE_TOKEN
    return dict(input_ids=batch.input_ids.masked_fill(is_image, vlm.hf.config.image_token_id),
                attention_mask=batch.attention_mask, mm_token_type_ids=is_image.int(),
                pixel_values=batch.pixel_values, image_grid_thw=batch.image_inputs["image_grid_thw"])


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_tapped_block_equals_transformers_eager_attention_weights(tiny_models, demo_samples, family, padding_side):
    tap = load_vlm(tiny_models[family]["teacher"])
    eager = load_vlm(tiny_models[family]["teacher"], attn_implementation="eager")
    assert isinstance(tap.hf, FAMILY_CLASSES[family])
    config = tap.text_config
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    _sharpen(tap, eager)
    batch, skipped = make_batch(tap, _samples(demo_samples), template="chatml", max_length=512,
                                padding_side=padding_side)
    assert not skipped
    lengths, starts = batch.vision_lengths.tolist(), batch.vision_start.tolist()
    assert lengths == [36, 32, 35, 54, 0] and batch.num_vision_tokens is None
    assert len(set(s for s in starts if s >= 0)) > 1  # the vision block at different offsets

    with torch.no_grad():
        out = tap(batch, tap_layers=LAYERS)
        ref = eager.hf(**_hf_inputs(eager, batch), output_attentions=True).attentions

    assert max(float(out.blocks[layer].probs.max()) for layer in LAYERS) > 0.3  # far from uniform
    for layer in LAYERS:
        block = out.blocks[layer]
        assert block.probs.shape[-1] == max(lengths)
        for b, (start, nv) in enumerate(zip(starts, lengths)):
            if start < 0:
                assert not block.query_mask[b].any() and block.probs[b].abs().sum() == 0
                continue
            last = int(batch.attention_mask[b].nonzero().max())
            vend = start + nv
            n_rows = last - vend + 1
            assert int(block.query_mask[b].sum()) == n_rows
            assert block.vision_mask[b].tolist() == [True] * nv + [False] * (max(lengths) - nv)
            expected = ref[layer][b, :, vend : last + 1, start:vend]
            torch.testing.assert_close(block.probs[b, :, :n_rows, :nv], expected, atol=1e-5, rtol=0)
            assert block.probs[b, :, n_rows:].abs().sum() == 0 and block.probs[b, :, :, nv:].abs().sum() == 0


def test_positions_are_the_models_own_3d_rope_index_and_matter(qwen, demo_samples):
    vlm = load_vlm(qwen["teacher"])
    _sharpen(vlm)
    batch, _ = make_batch(vlm, _samples(demo_samples)[:4], template="chatml", max_length=512)
    positions = vlm.position_ids(batch)
    assert positions.shape == (3, *batch.input_ids.shape)
    b, start, nv = 1, int(batch.vision_start[1]), int(batch.vision_lengths[1])  # a 64 x 32 image: 4 x 8 tokens
    rows, cols = positions[1, b, start : start + nv], positions[2, b, start : start + nv]
    assert rows.unique().numel() == 4 and cols.unique().numel() == 8
    # text after the image continues from the image's largest position + 1, on all three axes
    after = positions[:, b, start + nv]
    assert after.unique().numel() == 1 and int(after[0]) == int(positions[:, b, start : start + nv].max()) + 1
    # 1-D positions (what transformers silently falls back to without mm_token_type_ids) give another block
    with torch.no_grad():
        out = vlm(batch, tap_layers=(0,))
        flat = batch.attention_mask.cumsum(-1) - 1
        vlm.position_ids = lambda batch: flat  # instance attribute: this model only
        one_d = vlm(batch, tap_layers=(0,))
    assert (out.blocks[0].probs - one_d.blocks[0].probs).abs().max() > 1e-3


def test_student_block_sends_gradient_to_layer0_query_and_key_weights(qwen, demo_samples):
    vlm = load_vlm(qwen["student"])
    batch, _ = make_batch(vlm, _samples(demo_samples), template="chatml", max_length=512)
    out = vlm(batch, tap_layers=(0,))
    out.blocks[0].probs.square().sum().backward()
    attn = vlm.language_model.layers[0].self_attn
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0
    assert attn.k_proj.weight.grad is not None and attn.k_proj.weight.grad.abs().sum() > 0
    assert vlm.language_model.layers[1].self_attn.q_proj.weight.grad is None
    # the merger is the projector and trains; the ViT below it is frozen
    assert all(p.requires_grad for p in vlm.projector.parameters())
    assert not any(p.requires_grad for p in vlm.vision_tower.parameters())


def test_vision_features_are_the_mergers_output_for_each_image_alone(qwen, demo_samples):
    vlm = load_vlm(qwen["teacher"])
    samples = _samples(demo_samples)[:4]
    batch, _ = make_batch(vlm, samples, template="chatml", max_length=512, padding_side="left")
    with torch.no_grad():
        out = vlm(batch)
        embeds, _ = vlm.inputs_embeds(batch)
    assert out.vision_mask.sum(1).tolist() == batch.vision_lengths.tolist()
    for i, s in enumerate(samples):
        one = vlm.images([s.image])  # the image through the processor and the tower by itself
        with torch.no_grad():
            alone = vlm.hf.model.visual(one.pixel_values, grid_thw=one.extras["image_grid_thw"]).pooler_output
        nv = alone.shape[0]
        assert nv == vlm.images.count(s.image) == int(batch.vision_lengths[i])
        torch.testing.assert_close(out.vision_features[i, :nv], alone, atol=1e-5, rtol=1e-5)
        assert out.vision_features[i, nv:].abs().sum() == 0
        start = int(batch.vision_start[i])
        torch.testing.assert_close(embeds[i, start : start + nv], out.vision_features[i, :nv], rtol=0, atol=0)


def test_greedy_generation_matches_transformers_generate(qwen, demo_samples):
    vlm = load_vlm(qwen["teacher"])
    batch, _ = make_batch(vlm, _samples(demo_samples)[:3], template="chatml", max_length=512, padding_side="left",
                          for_generation=True)
    # the prompt ends in the assistant header ("\n" is no token of the word-level toy tokenizer)
    assert vlm.tokenizer.convert_ids_to_tokens(batch.input_ids[:, -2:].flatten().tolist()) == [
        "<|im_start|>", "assistant"] * 3
    steps = []
    logits = vlm.logits
    vlm.logits = lambda hidden: steps.append(logits(hidden)) or steps[-1]  # this model only: record each step's
    ours = vlm.generate(batch, GenerationSettings(max_new_tokens=6))
    with torch.no_grad():
        theirs = vlm.hf.generate(**_hf_inputs(vlm, batch), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                                 output_logits=True, return_dict_in_generate=True,
                                 eos_token_id=vlm.tokenizer.eos_token_id, pad_token_id=vlm.tokenizer.pad_token_id)
    eos = vlm.tokenizer.eos_token_id
    for row, new in zip(ours, theirs.sequences[:, batch.input_ids.shape[1]:].tolist()):
        expected = new[: new.index(eos)] if eos in new else new
        assert row == expected and len(row) > 0
    # every step's logits, not only the argmax: positions of new tokens follow M-RoPE's rule
    for mine, ref in zip(steps, theirs.logits):
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)
    assert len(steps) > 1


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_save_then_load_through_load_vlm_and_transformers(tiny_models, demo_samples, tmp_path, family):
    vlm = load_vlm(tiny_models[family]["student"])
    vlm.save_pretrained(tmp_path / "export")
    again = load_vlm(tmp_path / "export")
    theirs = FAMILY_CLASSES[family].from_pretrained(tmp_path / "export", dtype=torch.float32)
    a, b, c = vlm.state_dict(), again.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a["hf." + k], c[k]) for k in c)
    batch, _ = make_batch(vlm, _samples(demo_samples), template="chatml", max_length=512)
    with torch.no_grad():
        mine = vlm.logits(again(batch).hidden)
        ref = theirs(**_hf_inputs(vlm, batch)).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(mine[real], ref[real], atol=1e-4, rtol=1e-4)
    assert again.identity()["weights_fingerprint"] == load_vlm(tmp_path / "export").identity()["weights_fingerprint"]


@pytest.mark.bad_input
def test_a_processor_that_cuts_other_patches_than_the_tower_is_refused(qwen, tmp_path):
    folder = tmp_path / "teacher"
    shutil.copytree(qwen["teacher"], folder)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**pre, "merge_size": 1}))
    with pytest.raises(ModelError, match=r"the image processor's merge_size is 1, the vision tower's 2$"):
        load_vlm(folder)


def test_the_registry_builds_and_describes_qwen(qwen):
    from alignkd.models import describe_checkpoint

    summary = describe_checkpoint(qwen["teacher"])
    assert summary.family == "qwen2_5_vl" and summary.num_vision_tokens is None
    assert isinstance(load_vlm(qwen["student"]), Qwen2_5_VLVLM)


def test_the_teachers_top_k_never_names_a_padded_row_of_its_head(qwen, demo_samples):
    """Qwen2.5-VL's configs pad the head past the tokenizer (7B: 152064 rows, 3B: 151936, for
    151665 tokens); a padded id in the cache would lie outside a smaller student's head."""
    from alignkd.signals import teacher_signals

    vlm = load_vlm(qwen["teacher"])
    n = len(vlm.tokenizer)
    vlm.text_config.vocab_size = n + 8  # a head padded by 8 rows that would win every position
    logits = vlm.logits
    vlm.logits = lambda hidden: torch.cat([logits(hidden), torch.full((*hidden.shape[:-1], 8), 1e3)], -1)
    samples = _samples(demo_samples)
    batch, _ = make_batch(vlm, samples, template="chatml", max_length=512)
    with torch.no_grad():
        out = vlm(batch, tap_layers=(0,))
    records = teacher_signals(vlm, batch, out, samples, layers=(0,), topk=4)
    for r in records:
        assert r.topk_ids.max() < n
        # log-probs over the real tokens: with the tail they hold all the mass
        total = torch.logsumexp(torch.cat([torch.tensor(r.topk_logprobs), torch.tensor(r.tail_logmass)[:, None]], 1), 1)
        torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-5, rtol=0)
        assert r.vision_length == (vlm.images.count(next(s.image for s in samples if s.key == r.key))
                                   if r.vision_start >= 0 else 0)
        assert r.vision_features.shape[0] == r.vision_length and r.attention[0].shape[-1] == r.vision_length
