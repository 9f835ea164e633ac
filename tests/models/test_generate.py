"""VLM.generate (one prompt forward, then one token per step against the KV cache) against a
reference that recomputes the whole sequence for every token, for every family."""

from __future__ import annotations

import pytest
import torch

from alignkd.data.batching import make_batch
from alignkd.models import ModelError, load_vlm
from alignkd.models.base import GenerationSettings, VLMBatch
from conftest import CHAT_TEMPLATE, FAMILIES


def _prompts(vlm, samples, padding_side="left"):
    questions = [s for s in samples if s.meta.get("task") != "caption"][:5]
    batch, _ = make_batch(vlm, questions, template=CHAT_TEMPLATE[vlm.family], max_length=512, for_generation=True, padding_side=padding_side)
    return batch


def _recompute_logits(vlm, batch, tokens):
    """Next-token logits of every row after appending `tokens` (B, n), from a full forward."""
    ids = torch.cat([batch.input_ids, tokens], dim=1)
    mask = torch.cat([batch.attention_mask, torch.ones_like(tokens)], dim=1)
    step = VLMBatch(keys=batch.keys, input_ids=ids, attention_mask=mask, response_mask=torch.zeros_like(mask).bool(),
                    vision_start=batch.vision_start, num_vision_tokens=batch.num_vision_tokens,
                    pixel_values=batch.pixel_values, vision_lengths=batch.vision_lengths,
                    image_inputs=batch.image_inputs)
    return vlm.logits(vlm(step).hidden[:, -1])


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_decoding_equals_full_recompute(tiny_models, demo_samples, family):
    vlm = load_vlm(tiny_models[family]["teacher"]).eval()
    batch = _prompts(vlm, demo_samples)
    assert len(set(batch.attention_mask.sum(1).tolist())) > 1, "prompts of one length would not test the padding"
    n = 6
    rows = vlm.generate(batch, GenerationSettings(max_new_tokens=n))
    eos = vlm.tokenizer.eos_token_id
    # The reference: argmax of a full forward after each chosen token, rows that ended padded with eos.
    tokens = torch.empty(batch.input_ids.shape[0], 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(n):
            logits = _recompute_logits(vlm, batch, tokens)
            ended = (tokens == eos).any(1) if tokens.shape[1] else torch.zeros(len(rows), dtype=torch.bool)
            nxt = torch.where(ended, torch.full_like(logits[:, 0], eos, dtype=torch.long), logits.argmax(-1))
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    expected = [row[: row.index(eos)] if eos in row else row for row in tokens.tolist()]
    assert rows == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_settings(tiny_models, demo_samples, family):
    vlm = load_vlm(tiny_models[family]["student"]).eval()
    batch = _prompts(vlm, demo_samples)
    greedy = vlm.generate(batch, GenerationSettings(max_new_tokens=4))
    # top_k=1 and a vanishing top_p leave only the most likely token: greedy, at any temperature
    assert vlm.generate(batch, GenerationSettings(max_new_tokens=4, do_sample=True, top_k=1, temperature=5.0)) == greedy
    assert vlm.generate(batch, GenerationSettings(max_new_tokens=4, do_sample=True, top_p=1e-6, temperature=5.0)) == greedy
    hot = GenerationSettings(max_new_tokens=4, do_sample=True, temperature=50.0, seed=3)
    first = vlm.generate(batch, hot)
    assert vlm.generate(batch, hot) == first  # a seed makes sampling repeat
    assert first != greedy  # at temperature 50 a random tiny model's choice is close to uniform
    assert all(len(row) <= 4 for row in first)


def test_stop_strings_end_a_row_where_the_string_is_completed(tiny_models, demo_samples):
    vlm = load_vlm(tiny_models["mobilevlm"]["teacher"]).eval()
    batch = _prompts(vlm, demo_samples)
    greedy = vlm.generate(batch, GenerationSettings(max_new_tokens=6))
    row = next(i for i, r in enumerate(greedy) if len(r) >= 3)
    stop = vlm.tokenizer.decode(greedy[row][1:2], skip_special_tokens=True).strip()
    assert stop, "the second token decodes to nothing: pick another row"
    stopped = vlm.generate(batch, GenerationSettings(max_new_tokens=6, stop_strings=(stop,)))
    text = vlm.tokenizer.decode(greedy[row], skip_special_tokens=True)
    upto = next(k for k in range(1, len(greedy[row]) + 1)
                if stop in vlm.tokenizer.decode(greedy[row][:k], skip_special_tokens=True))
    assert stop in text and stopped[row] == greedy[row][:upto]
    for a, b in zip(stopped, greedy):  # every row is the greedy row, cut no later
        assert b[: len(a)] == a


def test_right_padded_prompts_and_bad_settings_are_refused(tiny_models, demo_samples):
    vlm = load_vlm(tiny_models["mobilevlm"]["student"]).eval()
    right = _prompts(vlm, demo_samples, padding_side="right")
    with pytest.raises(ModelError, match="left-padded"):
        vlm.generate(right)
    for bad in (dict(max_new_tokens=0), dict(do_sample=True, temperature=0.0), dict(top_p=0.0), dict(top_k=-1)):
        with pytest.raises(ValueError):
            GenerationSettings(**bad)
