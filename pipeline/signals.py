"""The teacher's Align-KD signals for one batch, per sample, ready for the cache.

    out = teacher(batch, tap_layers=layers)
    records = teacher_signals(teacher, batch, out, samples, layers=(0,), topk=64)
    records = teacher_signals(teacher, batch, out, samples, layers=(0,), topk=64, codecs=CodecSpec())  # on the device

What is kept (ALIGN_KD.md, notation):
  attention   A^T[:, Q, V] of each tapped layer (per head, or the head mean when the job
              caches only what the `mean` L_attn variant needs);
  features    P^T, the projector output, for L_V_all / L_V_focus;
  focus       focus_j = sum_{i in Q} mean_h A^T[h, i, j] of the first tapped layer, for the
              top-k tokens of L_V_focus;
  top-k       the teacher's k most likely next tokens at every response position with their
              log-probs and the log of the remaining mass, for L_logit over k + 1 bins.

With `codecs`, attention and features of a scaled codec (uint8 / uint4 / uint4b / int8 / int8l44 / int4) are
quantised where the forward ran (alignkd.cache.codecs.quantise: the numpy encoder's codes and
scales, bit for bit) and only the codes and scales are copied to the host, a quarter of the
float32 bytes: what an extraction worker on a GPU does. A block the codec cannot hold (NaN,
inf, negative attention) is copied as floats instead, for the writer to refuse it naming the
sample, exactly as without `codecs`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

from alignkd.cache.codecs import Quantised, get_codec, quantise, quantised_error
from alignkd.cache.records import SampleSignals
from alignkd.cache_schemas import CodecSpec
from alignkd.data.shards import Sample, sample_fingerprint
from alignkd.models.base import VLM, VLMBatch, VLMOutput

__all__ = ["teacher_signals", "topk_with_tail", "sample_fingerprint", "tokenizer_hash", "image_preprocessing",
           "image_view"]


def tokenizer_hash(tokenizer: Any) -> str:
    """Identity of a tokenizer by what it does: its vocabulary and special ids."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id],
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def image_preprocessing(vlm: VLM) -> dict[str, Any]:
    """The image processor's settings, as the cache records them; a tiling processor adds
    whether it tiles (InternVL's `crop_to_patches`, `max_patches`), and a dynamic-resolution
    family its token-grid settings (`VLM.images.settings()`, Qwen2.5-VL: "grid" with min/max
    pixels, patch, merge and temporal patch sizes)."""
    proc = vlm.image_processor
    record = {
        "pad_to_square": bool(vlm.pad_images),
        "processor": type(proc).__name__,
        "image_mean": list(proc.image_mean),
        "image_std": list(proc.image_std),
        "size": dict(proc.size) if proc.size else None,
        "crop_size": dict(proc.crop_size) if getattr(proc, "crop_size", None) else None,
    }
    if hasattr(proc, "crop_to_patches"):  # only where the processor can tile: older records stay as they were
        record["tiles"] = {"crop_to_patches": bool(proc.crop_to_patches),
                           "max_patches": int(proc.max_patches) if proc.crop_to_patches else None}
    images = getattr(vlm, "images", None)
    return {**record, **(images.settings() if images is not None else {})}


def image_view(preprocessing: dict[str, Any]) -> dict[str, Any]:
    """What part of an image the vision tokens cover, from an `image_preprocessing` record:
    padded to a square or not; how it is resized ("shortest_edge": the aspect ratio kept and
    the long side cropped, as CLIP does; "stretch": straight to a fixed height and width, as
    InternVL's tiles); the fraction of the resized image a centre crop keeps (height, width;
    1.0 without a crop); tiling, where the processor can tile; and for a dynamic-resolution
    processor its "grid" (the image's resized size and so its token grid follow from min/max
    pixels, patch and merge sizes: equal settings give both models the same grid for the same
    image). Teacher and student must agree on it for their vision tokens to mean the same
    regions; mean, std and (fixed) resolution may differ."""
    size, crop = preprocessing.get("size") or {}, preprocessing.get("crop_size") or {}
    edge = size.get("shortest_edge")
    if crop and edge:
        fraction = [crop["height"] / edge, crop["width"] / edge]
    elif crop and {"height", "width"} <= size.keys():
        fraction = [crop["height"] / size["height"], crop["width"] / size["width"]]
    else:
        fraction = [1.0, 1.0]
    resize = "shortest_edge" if edge else "stretch" if {"height", "width"} <= size.keys() else None
    view = {"pad_to_square": preprocessing.get("pad_to_square"), "resize": resize,
            "crop_fraction": [round(f, 6) for f in fraction]}
    for key in ("tiles", "grid"):
        if preprocessing.get(key) is not None:
            view[key] = preprocessing[key]
    return view


def topk_with_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, V) logits -> top-k ids (R, k), their log-probs (R, k) and log tail mass (R,).

    The tail is log(1 - sum_k p) computed as log1p(-exp(logsumexp(top-k log-probs))), in
    float32; it is -inf when the top k hold all the mass (k = V)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top_lp, top_ids = logprobs.topk(k, dim=-1)
    covered = torch.logsumexp(top_lp, dim=-1).clamp(max=0.0)
    tail = torch.log1p(-torch.exp(covered))
    if k == logits.shape[-1]:
        tail = torch.full_like(tail, float("-inf"))
    return top_ids, top_lp, tail


@torch.no_grad()
def teacher_signals(
    vlm: VLM,
    batch: VLMBatch,
    out: VLMOutput,
    samples: list[Sample],
    *,
    layers: tuple[int, ...] | list[int],
    topk: int,
    attention_heads: str = "per_head",
    logit_chunk: int = 1024,
    codecs: CodecSpec | None = None,
) -> list[SampleSignals]:
    """Split one batch's teacher outputs into per-sample records (float32 numpy, or with
    `codecs` Quantised attention and features, see the module docstring), each with its own
    image's vision-token count (the padded columns of a ragged batch dropped)."""
    # "fp32": copy the floats; the writer quantises them (a CPU teacher, or no codecs given)
    attention_codec, features_codec = (codecs.attention, codecs.features) if codecs is not None else ("fp32", "fp32")

    by_key = {s.key: s for s in samples}
    nv = batch.num_vision_tokens  # None: per image; a text-only sample then stores 0 tokens
    empty = nv if nv is not None else 0
    first = out.blocks[layers[0]]
    focus = first.probs.mean(dim=1).sum(dim=1)  # (B, Nv): sum over text queries of the head mean

    # Response positions t predict from hidden[t - 1]; gather those rows and score them in chunks
    # so the (R, V) logits never exist for the whole batch at once.
    resp = batch.response_mask.clone()
    resp[:, 0] = False
    b_idx, t_idx = resp.nonzero(as_tuple=True)
    # Only the tokenizer's ids are tokens: a config may pad the head past them (Qwen2.5-VL: 152064
    # rows in the 7B, 151936 in the 3B, for 151665 tokens), and a padded id among the top k would
    # lie outside a smaller student's head. Where the two agree (MobileVLM) nothing is cut.
    vocab = min(len(vlm.tokenizer), vlm.text_config.vocab_size)
    ids_parts, lp_parts, tail_parts = [], [], []
    for lo in range(0, b_idx.numel(), logit_chunk):
        rows = out.hidden[b_idx[lo : lo + logit_chunk], t_idx[lo : lo + logit_chunk] - 1]
        ids, lp, tail = topk_with_tail(vlm.logits(rows)[..., :vocab], topk)
        ids_parts.append(ids)
        lp_parts.append(lp)
        tail_parts.append(tail)
    top_ids = torch.cat(ids_parts).cpu().numpy().astype(np.int32)
    top_lp = torch.cat(lp_parts).cpu().numpy().astype(np.float32)
    tails = torch.cat(tail_parts).cpu().numpy().astype(np.float32)
    per_sample_r = resp.sum(dim=1).tolist()
    r_offsets = np.concatenate([[0], np.cumsum(per_sample_r)]).astype(np.int64)

    records = []
    img = 0
    grids = vlm.vision_grids(batch)  # None: a fixed square grid
    for b, key in enumerate(batch.keys):
        valid = batch.attention_mask[b].bool()
        positions = valid.nonzero().flatten()
        lo, hi = int(positions.min()), int(positions.max()) + 1
        start = int(batch.vision_start[b])
        has_image = start >= 0
        n_rows = int(first.query_mask[b].sum())
        n_vis = int(batch.vision_lengths[b]) if has_image else empty
        attention = {}
        for layer in layers:
            rows = out.blocks[layer].probs[b, :, :n_rows, :n_vis]  # (H, Lq, Nv)
            if attention_heads == "mean":
                rows = rows.mean(dim=0)
            attention[layer] = _to_host(rows.float(), attention_codec)
        grid = None
        if has_image:
            feats = _to_host(out.vision_features[img, :n_vis].float(), features_codec)
            grid = grids[img] if grids is not None else None
            img += 1
        else:
            feats = np.zeros((empty, vlm.hidden_size), dtype=np.float32)
        r0, r1 = r_offsets[b], r_offsets[b + 1]
        records.append(
            SampleSignals(
                key=key,
                fingerprint=sample_fingerprint(by_key[key]),
                input_ids=batch.input_ids[b, lo:hi].cpu().numpy().astype(np.int32),
                response_positions=(t_idx[r0:r1] - lo).cpu().numpy().astype(np.int32),
                vision_start=start - lo if has_image else -1,
                vision_length=n_vis if has_image else 0,
                attention=attention,
                vision_features=feats,
                focus=focus[b, :n_vis].float().cpu().numpy() if has_image else np.zeros(empty, dtype=np.float32),
                topk_ids=top_ids[r0:r1],
                topk_logprobs=top_lp[r0:r1],
                tail_logmass=tails[r0:r1],
                vision_grid=grid,
            )
        )
    return records


def _to_host(x: torch.Tensor, codec: str) -> np.ndarray | Quantised:
    """A float32 block on the teacher's device -> the host: its codes and scales for a scaled
    codec (with the codec error the writer records), else the floats."""
    if not get_codec(codec).scaled:
        return x.cpu().numpy()
    try:
        q = quantise(codec, x)
    except ValueError:  # NaN, inf, negative attention: the writer refuses the floats, naming the sample
        return x.cpu().numpy()
    return Quantised(codec, q.values, q.scale, q.length, quantised_error(x, q)).numpy()
