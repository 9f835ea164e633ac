"""Exact shallow-layer attention taps without eager attention.

Align-KD compares the text-query x vision-key block of a decoder layer's attention
probabilities (ALIGN_KD.md, L_attn). transformers returns no attention weights under fused
attention (SDPA, flash), and eager attention materialises every layer's full T x T map. So we
keep SDPA for the forward itself and, for the few layers asked for, record that layer's
queries and keys (after rotary embedding, exactly what the kernel sees) and rebuild only the
rows we need. The model adapters switch their decoder to TAP_ATTN (`VLM.use_tap_attention`)
and `VLM.forward` does the rest; by hand, with positions 1..3 of a tiny decoder's input taken
as the vision block:

>>> from alignkd.models import load_vlm
>>> from alignkd.models.tiny import write_tiny_models
>>> lm = load_vlm(write_tiny_models("models")["teacher"]).language_model
>>> lm.config._attn_implementation == TAP_ATTN
True
>>> ids, mask = torch.tensor([[1, 5, 6, 7, 8, 9]]), torch.ones(1, 6, dtype=torch.long)
>>> with capture_qk(layers=(0,)) as cap:
...     _ = lm(inputs_embeds=lm.embed_tokens(ids), attention_mask=mask, position_ids=torch.arange(6)[None])
>>> block = text_vision_block(cap.queries[0], cap.keys[0], cap.scaling[0], mask, torch.tensor([1]), num_vision=3)
>>> block.probs.shape          # (B, H, Lq, Nv): the queries at positions 4 and 5, onto keys 1..3
torch.Size([1, 8, 2, 3])

The captured tensors are the live ones, so the block carries gradients to the layer's
q_proj / k_proj weights (needed for the student side of L_attn).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["TAP_ATTN", "QKCapture", "capture_qk", "text_vision_block", "TextVisionBlock"]

TAP_ATTN = "alignkd_sdpa"

_ACTIVE: contextvars.ContextVar[QKCapture | None] = contextvars.ContextVar("alignkd_qk_capture", default=None)


@dataclass
class QKCapture:
    """Queries (B, H, T, d) and keys (B, H_kv, T, d) of the tapped layers, by layer index."""

    layers: frozenset[int]
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    scaling: dict[int, float] = field(default_factory=dict)


def _tap_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA, plus a copy of the (q, k) references for layers under an active capture."""
    cap = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if cap is not None and layer in cap.layers:
        cap.queries[layer] = query
        cap.keys[layer] = key
        cap.scaling[layer] = kwargs.get("scaling") or module.scaling
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


# Registered under our own name so that the model keeps transformers' SDPA masks and kernel.
AttentionInterface.register(TAP_ATTN, _tap_attention)
AttentionMaskInterface.register(TAP_ATTN, sdpa_mask)


@contextlib.contextmanager
def capture_qk(layers: tuple[int, ...] | list[int]) -> Iterator[QKCapture]:
    """Record queries and keys of `layers` for forwards run inside the block."""
    cap = QKCapture(layers=frozenset(layers))
    token = _ACTIVE.set(cap)
    try:
        yield cap
    finally:
        _ACTIVE.reset(token)


@dataclass
class TextVisionBlock:
    """Attention probabilities of text queries after the image onto the vision keys.

    probs: (B, H, Lq, Nv). Row i of sample b is the query at position vision_end[b] + i;
        columns are that sample's vision positions in order. Rows are the model's own
        softmax rows (normalised over ALL visible keys), restricted to the vision columns.
    query_mask: (B, Lq) bool, True where the row is a real (non-padding) text query.
    vision_mask: (B, Nv) bool, True at a sample's real vision columns. With a per-sample
        count (dynamic resolution) Nv is the batch's largest and the columns past a sample's
        own count are padding, zero in probs; with a fixed count it is True wherever the
        sample has an image.
    """

    probs: torch.Tensor
    query_mask: torch.Tensor
    vision_mask: torch.Tensor | None = None


def text_vision_block(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    attention_mask: torch.Tensor,
    vision_start: torch.Tensor,
    num_vision: int | torch.Tensor,
    *,
    chunk: int = 256,
) -> TextVisionBlock:
    """Rebuild A[:, Q, V] from one layer's queries and keys.

    query: (B, H, T, d) after rotary; key: (B, H_kv, T, d) after rotary (grouped-query
        attention: H_kv divides H, each key head serves H / H_kv query heads).
    attention_mask: (B, T) 1 for real tokens, 0 for padding (either side).
    vision_start: (B,) first vision position of each sample; < 0 for samples without image
        (their rows are all masked).
    num_vision: N_v, one int for every sample, or (B,) each sample's own count (its columns
        are padded to the largest; see TextVisionBlock.vision_mask).
    Scores are formed in float32 over the causal, non-padding keys, `chunk` query rows at a
    time, so memory is O(B * H * chunk * T) rather than the eager O(B * H * T * T).
    """
    bsz, heads, seq, _ = query.shape
    key = repeat_kv(key, heads // key.shape[1])
    device = query.device
    valid = attention_mask.to(device=device, dtype=torch.bool)
    has_image = (vision_start >= 0).to(device)
    vstart = vision_start.clamp(min=0).to(device)
    if isinstance(num_vision, torch.Tensor):
        lengths = num_vision.to(device=device, dtype=torch.long) * has_image
        width = int(lengths.max()) if bsz else 0
    else:
        lengths = torch.full((bsz,), num_vision, dtype=torch.long, device=device)
        width = num_vision
    vend = vstart + lengths

    # Query rows: positions vend .. T-1 (relative index i -> absolute vend + i).
    lq = int((seq - vend[has_image]).max().item()) if bool(has_image.any()) else 0
    lq = max(lq, 0)
    rel = torch.arange(lq, device=device)
    q_pos = vend[:, None] + rel[None, :]  # (B, Lq)
    in_range = q_pos < seq
    q_pos_c = q_pos.clamp(max=seq - 1)
    query_mask = in_range & valid.gather(1, q_pos_c) & has_image[:, None]

    cols = torch.arange(width, device=device)[None, :]
    vision_mask = (cols < lengths[:, None]) & has_image[:, None]  # (B, Nv)
    v_pos = (vstart[:, None] + cols).clamp(max=seq - 1)  # padded columns read a real key, then are zeroed
    key_pos = torch.arange(seq, device=device)

    out = []
    for lo in range(0, lq, chunk):
        qp = q_pos_c[:, lo : lo + chunk]  # (B, c)
        q = query.gather(2, qp[:, None, :, None].expand(bsz, heads, qp.shape[1], query.shape[-1]))
        scores = torch.matmul(q.float(), key.float().transpose(-1, -2)) * scaling  # (B, H, c, T)
        allowed = valid[:, None, :] & (key_pos[None, None, :] <= qp[:, :, None])  # (B, c, T)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        # Padding rows may have no allowed key at all; keep them finite, they are masked anyway.
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out.append(probs.gather(3, v_pos[:, None, None, :].expand(bsz, heads, qp.shape[1], width)))
    if out:
        probs = torch.cat(out, dim=2)
    else:
        probs = query.new_zeros((bsz, heads, 0, width), dtype=torch.float32)
    probs = probs * query_mask[:, None, :, None]
    if isinstance(num_vision, torch.Tensor):
        probs = probs * vision_mask[:, None, None, :]
    return TextVisionBlock(probs=probs, query_mask=query_mask, vision_mask=vision_mask)
