"""Look at what a model's Align-KD signals are on a few samples, before paying for extraction.

    alignkd probe --model models/teacher --data data/train -n 4
    alignkd probe --job jobs/mobilevlm_v2/probe_teacher.toml --set model.vision_tower=/models/clip

For each sample: sequence length, where the vision block sits, how many response tokens,
how much of layer 0's text-query attention goes to the image, the image tokens the text
focuses on most (focus_j = sum over text queries of the head-mean attention, ALIGN_KD.md),
and the size of the projector output. Useful to check a checkpoint, a vision-tower mapping
and a template against a data set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignkd.data import DataArgs
from alignkd.data.batching import make_batch
from alignkd.data.shards import read_samples
from alignkd.models import ModelArgs, load_model

__all__ = ["ProbeArgs", "ProbeRow", "probe"]


@dataclass
class ProbeArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    n: int = 4  # samples to look at (one batch)
    layer: int = 0  # the "shallow layer" to tap


@dataclass
class ProbeRow:
    key: str
    tokens: int
    vision_start: int
    vision_tokens: int
    response_tokens: int
    vision_attention: float  # mean over text queries and heads of the mass on vision keys
    top_focus: list[int]  # vision token indices, most focused first
    feature_norm: float  # mean L2 norm of the projector output tokens
    answer_logprob: float  # mean log-prob the model gives the response tokens


@torch.no_grad()
def probe(args: ProbeArgs) -> tuple[list[ProbeRow], list[tuple[str, str]]]:
    """Returns one row per usable sample and (key, reason) for the samples skipped."""
    samples, skipped = read_samples(args.data.shards, args.n)  # fails fast on a bad data path
    vlm = load_model(args.model)
    batch, not_encoded = make_batch(vlm, samples, template=args.data.template, max_length=args.data.max_length)
    skipped += not_encoded
    if batch is None:
        return [], skipped
    layer = args.layer
    batch = batch.to(vlm.device, dtype=vlm.dtype)
    out = vlm(batch, tap_layers=(layer,))
    block = out.blocks[layer]
    head_mean = block.probs.mean(dim=1)  # (B, Lq, Nv)
    focus = head_mean.sum(dim=1)  # (B, Nv)

    # Log-probs of the response tokens: logits at t-1 predict token t.
    targets = batch.response_mask[:, 1:]
    logprobs = torch.log_softmax(vlm.logits(out.hidden[:, :-1][targets]).float(), dim=-1)
    token_lp = logprobs.gather(1, batch.input_ids[:, 1:][targets][:, None]).squeeze(1)
    per_sample = torch.split(token_lp, targets.sum(1).tolist())

    rows = []
    img = 0
    for b, key in enumerate(batch.keys):
        q = block.query_mask[b]
        has_image = int(batch.vision_start[b]) >= 0
        rows.append(
            ProbeRow(
                key=key,
                tokens=int(batch.attention_mask[b].sum()),
                vision_start=int(batch.vision_start[b]),
                vision_tokens=batch.num_vision_tokens if has_image else 0,
                response_tokens=int(targets[b].sum()),
                vision_attention=float(head_mean[b][q].sum(-1).mean()) if q.any() else 0.0,
                top_focus=focus[b].topk(min(3, focus.shape[1])).indices.tolist() if has_image else [],
                feature_norm=float(out.vision_features[img].norm(dim=-1).mean()) if has_image else 0.0,
                answer_logprob=float(per_sample[b].mean()),
            )
        )
        img += int(has_image)
    return rows, skipped
