"""The layer-0 text x vision block from queries and keys, against transformers' own eager
attention weights (the reference), for every family, each of its templates and both padding sides."""

import pytest
import torch

from alignkd.data.batching import make_batch
from alignkd.models import load_vlm
from conftest import CHAT_TEMPLATE, FAMILIES

LAYERS = (0, 1)


def _mixed_batch(vlm, samples, template, padding_side):
    # Captions and questions of different lengths, so rows are padded and vision spans move.
    picked = [s for s in samples if s.meta["task"] == "caption"][:2] + [
        s for s in samples if s.meta["task"] != "caption"
    ][:2]
    batch, skipped = make_batch(vlm, picked, template=template, max_length=512, padding_side=padding_side)
    assert not skipped
    return batch


def _sharpen(*vlms, factor=6.0):
    """Random-init attention is nearly uniform, which would hide wrong positions or masks;
    scaling the tapped layers' query and key weights makes it peaked (identically in each model)."""
    with torch.no_grad():
        for vlm in vlms:
            for layer in LAYERS:
                attn = vlm.language_model.layers[layer].self_attn
                attn.q_proj.weight.mul_(factor)
                attn.k_proj.weight.mul_(factor)


def _eager_attentions(eager, batch):
    embeds, _ = eager.inputs_embeds(batch)
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = eager.language_model(
        inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=position_ids, output_attentions=True
    )
    return out.attentions


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize(("family", "template"), [("mobilevlm", "plain"), ("mobilevlm", "v1"), ("llava", "plain"),
                                                  ("llava", "v1"), ("internvl", "chatml")])
def test_tapped_block_equals_eager_attention_weights(tiny_models, demo_samples, family, template, padding_side):
    path = tiny_models[family]["teacher"]
    tap = load_vlm(path)
    eager = load_vlm(path, attn_implementation="eager")
    _sharpen(tap, eager)
    batch = _mixed_batch(tap, demo_samples, template, padding_side)
    starts = batch.vision_start.tolist()
    assert len(set(starts)) > 1 or padding_side == "right"

    with torch.no_grad():
        out = tap(batch, tap_layers=LAYERS)
        ref = _eager_attentions(eager, batch)

    nv = batch.num_vision_tokens
    # the comparison has teeth only if attention is far from uniform
    assert max(float(out.blocks[layer].probs.max()) for layer in LAYERS) > 0.3
    for layer in LAYERS:
        block = out.blocks[layer]
        for b, start in enumerate(starts):
            real = batch.attention_mask[b].nonzero().flatten()
            last = int(real.max())
            vend = start + nv
            n_rows = last - vend + 1
            assert int(block.query_mask[b].sum()) == n_rows
            for i in range(n_rows):
                expected = ref[layer][b, :, vend + i, start:vend]
                torch.testing.assert_close(block.probs[b, :, i], expected, atol=1e-5, rtol=0)
            # rows beyond the sample's last real token are padding and carry nothing
            assert block.probs[b, :, n_rows:].abs().sum() == 0


def test_tap_keeps_fused_attention_and_returns_no_attention_maps(tiny_models, demo_samples):
    vlm = load_vlm(tiny_models["mobilevlm"]["teacher"])
    assert vlm.language_model.config._attn_implementation == "alignkd_sdpa"
    batch = _mixed_batch(vlm, demo_samples, "v1", "right")
    embeds, _ = vlm.inputs_embeds(batch)
    out = vlm.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask)
    assert not out.attentions  # the hot path never materialises attention maps


@pytest.mark.parametrize("family", FAMILIES)
def test_student_block_sends_gradient_to_layer0_query_and_key_weights(tiny_models, demo_samples, family):
    vlm = load_vlm(tiny_models[family]["student"])
    batch = _mixed_batch(vlm, demo_samples, CHAT_TEMPLATE[family], "right")
    out = vlm(batch, tap_layers=(0,))
    out.blocks[0].probs.square().sum().backward()
    attn = vlm.language_model.layers[0].self_attn
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0
    assert attn.k_proj.weight.grad is not None and attn.k_proj.weight.grad.abs().sum() > 0
    # layers above the tapped one get no gradient from this term
    assert vlm.language_model.layers[1].self_attn.q_proj.weight.grad is None


def test_vision_block_offset_follows_the_template(tiny_models, demo_samples):
    vlm = load_vlm(tiny_models["llava"]["teacher"])
    plain = _mixed_batch(vlm, demo_samples, "plain", "right")
    v1 = _mixed_batch(vlm, demo_samples, "v1", "right")
    assert plain.vision_start.tolist() == [1] * 4  # <s> then the image
    assert min(v1.vision_start.tolist()) > 10  # after the system prompt and "USER:"
