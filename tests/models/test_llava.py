"""The LLaVA family through the VLM interface: save/load round trip, the splice of the
projector output into the sequence, and load_vlm's dispatch and refusals."""

import json

import pytest
import torch

from alignkd.data.batching import make_batch
from alignkd.models import ModelError, load_vlm
from alignkd.models.base import IMAGE_TOKEN
from alignkd.models.llava import LlavaVLM
from conftest import CHAT_TEMPLATE, FAMILIES


def test_llava_save_then_load_round_trips(tiny_models, demo_samples, tmp_path):
    vlm = load_vlm(tiny_models["llava"]["teacher"])
    assert isinstance(vlm, LlavaVLM)
    vlm.save_pretrained(tmp_path / "again")
    again = load_vlm(tmp_path / "again")
    a, b = vlm.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    batch, _ = make_batch(vlm, demo_samples[:3], template="v1", max_length=512)
    with torch.no_grad():
        torch.testing.assert_close(vlm(batch).hidden, again(batch).hidden, rtol=0, atol=0)
    assert again.identity()["weights_fingerprint"] == vlm.identity()["weights_fingerprint"]


@pytest.mark.parametrize("family", FAMILIES)
def test_projector_output_is_what_the_first_hidden_state_holds_at_vision_positions(tiny_models, demo_samples, family):
    vlm = load_vlm(tiny_models[family]["student"])
    batch, _ = make_batch(vlm, demo_samples[:3], template=CHAT_TEMPLATE[family], max_length=512, padding_side="left")
    with torch.no_grad():
        embeds, _ = vlm.inputs_embeds(batch)
        first = vlm.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                   output_hidden_states=True).hidden_states[0]
        projected = vlm.encode_images(batch.pixel_values, **batch.image_inputs)  # computed separately
    for b, (start, nv) in enumerate(zip(batch.vision_start.tolist(), batch.vision_lengths.tolist())):
        assert nv == (vlm.num_vision_tokens or vlm.images.count(demo_samples[b].image))
        torch.testing.assert_close(first[b, start : start + nv], projected[b, :nv], rtol=0, atol=0)
        text = batch.input_ids[b] != IMAGE_TOKEN
        # text positions hold the token embeddings, untouched by the splice
        torch.testing.assert_close(first[b][text], vlm.embed(batch.input_ids[b][text]), rtol=0, atol=0)


def test_llava_vision_token_count_follows_the_select_strategy(tiny_models):
    vlm = load_vlm(tiny_models["llava"]["teacher"])
    vc = vlm.hf.config.vision_config
    assert vlm.num_vision_tokens == (vc.image_size // vc.patch_size) ** 2  # CLS dropped ("default")
    pixels = torch.zeros(1, 3, vc.image_size, vc.image_size)
    assert vlm.encode_images(pixels).shape == (1, vlm.num_vision_tokens, vlm.hidden_size)


@pytest.mark.bad_input
def test_load_vlm_refuses_unknown_families_and_non_checkpoints(tmp_path):
    with pytest.raises(ModelError, match="config.json: not found"):
        load_vlm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError, match="model_type 'bert' is not supported"):
        load_vlm(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_vlm(tmp_path)
