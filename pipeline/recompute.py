"""Recompute mode (`cache.signals = "recompute"`): the two alignment signals rebuilt from a
small slice of the teacher in the student stage, instead of being stored per sample.

The teacher's layer-0 attention depends only on its layer-0 input (its token embeddings with
its projected vision tokens spliced in) and on its layer-0 norm, query and key weights and
rotary; P^T depends only on its projector applied to the vision tower's features, which the
student computes anyway when both share one frozen tower (MobileVLM V2 1.7B and 7B do). So
extraction writes those teacher tensors once (`slice_tensors`, alignkd.cache.teacher_slice:
0.37 GB for the 7B in bf16, against 14 GB for the whole teacher) and the student stage rebuilds
the attention block, P^T and the focus scores from them, on its own device and under no_grad,
with the teacher's own module classes (transformers' LlamaRMSNorm, LlamaAttention's q/k
projections and scaling, LlamaRotaryEmbedding and apply_rotary_pos_emb, the family's
projector) and the same tap extraction uses (models/tap.py). The 7B itself never runs.

    teacher_slice = load_teacher_slice(cache, student, train_tower=False)  # files, tower, inputs checked
    with projector_inputs(student) as seen:                                 # the student's tower features
        out = student(batch, tap_layers=(0,))
    teacher = teacher_slice.complete(teacher, batch, seen)                  # the TeacherBatch a cached cache gives

`train.compute_losses(..., teacher_slice=...)` does exactly this. The result has the cached
path's shapes, dtypes (float32) and masks, so the losses are untouched.

What it needs: a teacher whose decoder is Llama's (MobileVLM V2, LLaVA; `VLM.projector_spec`
says whether a family can be sliced: Qwen2.5-VL and InternVL cannot yet), and a student whose
frozen tower has the teacher's weights (by fingerprint), whose projector reads the same tower
layer, and whose image preprocessing is the teacher's exactly: then its projector's input is
the teacher's projector's input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from alignkd.cache_schemas import IMAGE_TOKEN, CacheMeta, CacheSchemaError
from alignkd.models import family_class
from alignkd.models.base import VLM, ModelError, VLMBatch, text_positions
from alignkd.models.tap import text_vision_block

__all__ = ["TeacherSlice", "slice_tensors", "slice_fields", "tower_fingerprint", "load_teacher_slice",
           "projector_inputs", "decoder_config", "estimate_slice_bytes", "DECODER_KEYS"]

DECODER_KEYS = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rms_norm_eps", "attention_bias", "max_position_embeddings", "rope_parameters")
"""The decoder config entries layer 0's embedding, norm, q/k projections and rotary read."""


class _Layer0(nn.Module):
    """Layer 0 of a Llama decoder, as far as its attention probabilities need it: the norm and
    the attention's q/k projections (transformers' own LlamaAttention, its v/o projections
    dropped)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx=0)
        del self.self_attn.v_proj, self.self_attn.o_proj


class TeacherSlice(nn.Module):
    """The teacher's embedding table, layer-0 norm and q/k projections, rotary and projector.

    Submodule names give the teacher decoder's own state-dict keys (`embed_tokens.weight`,
    `layers.0.self_attn.q_proj.weight`, ...) and `projector.*` its projector's, so the slice is
    cut from the teacher by name (`slice_tensors`) and loaded back strictly.
    """

    def __init__(self, family: str, decoder: dict[str, Any], projector: dict[str, Any], *,
                 attention_heads: str = "per_head"):
        super().__init__()
        config = LlamaConfig(**decoder)
        self.family, self.attention_heads = family, attention_heads
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([_Layer0(config)])
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.projector = family_class(family).build_projector(projector)

    @classmethod
    def build_empty(cls, family: str, decoder: dict[str, Any], projector: dict[str, Any], **kwargs: Any) -> TeacherSlice:
        """Its modules on the meta device: names and shapes, no memory (for sizes and names)."""
        with torch.device("meta"):
            return cls(family, decoder, projector, **kwargs)

    @torch.no_grad()
    def complete(self, teacher: Any, batch: VLMBatch, seen: list[torch.Tensor]) -> Any:
        """`teacher` (a TeacherBatch from a recompute cache, on the student's device: ids,
        top-k and masks, no attention, P^T or focus) with the three recomputed, in float32 and
        in the cached path's shapes: attention {0: (B, H_T, Lq, Nv) or (B, Lq, Nv)},
        vision_features (B, Nv, D_T) (zeros for a text-only sample), focus (B, Nv).
        `seen`: what `projector_inputs` recorded during the student's forward of `batch`."""
        weight = self.embed_tokens.weight
        device, dtype = weight.device, weight.dtype
        vision = batch.input_ids == IMAGE_TOKEN
        if bool(vision.any()) != bool(seen):
            raise ModelError(f"batch {batch.keys[:3]}...: {len(seen)} projector inputs recorded for a batch "
                             f"{'with' if vision.any() else 'without'} vision positions")
        # The teacher ran in its own dtype, without autocast: so does its slice.
        with torch.autocast(device.type, enabled=False):
            embeds = self.embed_tokens(batch.input_ids.masked_fill(vision, 0))
            feats = None
            if seen:
                feats = self.projector(seen[-1].to(device=device, dtype=dtype))  # P^T: (B_img, Nv, D_T)
                embeds = embeds.masked_scatter(vision[..., None], feats.to(embeds.dtype))
            layer = self.layers[0]
            hidden = layer.input_layernorm(embeds)
            attn = layer.self_attn
            shape = (*hidden.shape[:-1], -1, attn.head_dim)
            query = attn.q_proj(hidden).view(shape).transpose(1, 2)
            key = attn.k_proj(hidden).view(shape).transpose(1, 2)
            cos, sin = self.rotary_emb(hidden, text_positions(batch.attention_mask))
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            num_vision = batch.num_vision_tokens if batch.num_vision_tokens is not None else batch.vision_lengths
            block = text_vision_block(query, key, attn.scaling, batch.attention_mask, batch.vision_start, num_vision)
        probs = block.probs  # (B, H_T, Lq, Nv) float32, zero at padding rows
        if not torch.equal(block.query_mask, teacher.query_mask):
            raise ModelError(f"batch {batch.keys[:3]}...: recomputed and cached query rows do not line up")
        features = torch.zeros((*teacher.vision_mask.shape, weight.shape[1]), dtype=torch.float32, device=device)
        if feats is not None:
            features[teacher.image_mask] = feats.float()
        return dataclasses.replace(
            teacher,
            attention={0: probs.mean(dim=1) if self.attention_heads == "mean" else probs},
            vision_features=features,
            focus=probs.mean(dim=1).sum(dim=1),  # as signals.teacher_signals: over text queries, head mean
        )


def decoder_config(text_config: Any, family: str) -> dict[str, Any]:
    """SliceMeta.decoder of a teacher's decoder config (a ModelError unless it is Llama's)."""
    kind = getattr(text_config, "model_type", None)
    if kind != "llama":
        raise ModelError(f"cache.signals 'recompute' needs a Llama decoder in the teacher; this {family} "
                         f"teacher's is {kind!r}: use 'cached'")
    return {k: getattr(text_config, k) for k in DECODER_KEYS if getattr(text_config, k, None) is not None}


def estimate_slice_bytes(family: str, text_config: Any, projector_spec: dict[str, Any], dtype: str) -> int:
    """Bytes of the slice's tensors for a teacher of this config, stored in `dtype` (the
    safetensors header and slice.json add a few KiB): from the module's shapes, no weights."""
    empty = TeacherSlice.build_empty(family, decoder_config(text_config, family), projector_spec)
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return sum(t.numel() for t in empty.state_dict().values()) * itemsize


def tower_fingerprint(tower: nn.Module) -> str:
    """sha256 of a vision tower's weights as float32, by name: equal for the teacher's bf16
    tower and a student's float32 copy of it."""
    h = hashlib.sha256()
    for name, t in sorted(tower.state_dict().items()):
        h.update(f"{name}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def slice_fields(vlm: VLM) -> dict[str, Any]:
    """SliceMeta's fields, except the tensors' digest, for a loaded teacher."""
    ident = vlm.identity()
    return {"family": vlm.family, "teacher_config_hash": ident["config_hash"],
            "teacher_weights_fingerprint": ident["weights_fingerprint"], "dtype": str(vlm.dtype).removeprefix("torch."),
            "decoder": decoder_config(vlm.text_config, vlm.family), "projector": vlm.projector_spec(),
            "tower_fingerprint": tower_fingerprint(vlm.vision_tower)}


def slice_tensors(vlm: VLM) -> dict[str, torch.Tensor]:
    """The teacher's own tensors the slice holds, by the slice's names (its decoder's keys)."""
    fields = slice_fields(vlm)
    names = TeacherSlice.build_empty(vlm.family, fields["decoder"], fields["projector"]).state_dict()
    decoder, projector = vlm.language_model.state_dict(), vlm.projector.state_dict()
    return {name: projector[name.removeprefix("projector.")] if name.startswith("projector.") else decoder[name]
            for name in names}


def load_teacher_slice(cache: Any, student: VLM, *, train_tower: bool) -> TeacherSlice:
    """The slice of a recompute cache (a CacheReader), on the student's device, after checking
    that it belongs to the cache's teacher and that this student's projector input is the
    teacher's. Every refusal is one ValueError line naming what differs."""
    from alignkd.cache.teacher_slice import read_teacher_slice
    from alignkd.signals import image_preprocessing

    meta: CacheMeta = cache.meta
    try:
        tensors, info = read_teacher_slice(cache.path)
    except CacheSchemaError as e:
        raise ValueError(str(e)) from None
    where = f"cache {cache.path}: teacher slice"
    if (info.teacher_config_hash, info.teacher_weights_fingerprint) != (meta.teacher.config_hash,
                                                                        meta.teacher.weights_fingerprint):
        raise ValueError(f"{where} was cut from another teacher than the cache's signals (config or weights differ)")
    if train_tower:
        raise ValueError(f"{where}: optim.train_vision_tower is on, but recomputing P^T needs the student's tower "
                         f"to stay the teacher's; keep it frozen or use a cache with cache.signals = 'cached'")
    try:
        spec = student.projector_spec()
    except ModelError as e:
        raise ValueError(f"{where}: the student's projector input cannot be checked ({e})") from None
    if spec["input"] != info.projector["input"]:
        raise ValueError(f"{where}: the student's projector reads tower features {spec['input']}, the teacher's "
                         f"{info.projector['input']}; recompute mode needs the same ones")
    if image_preprocessing(student) != meta.image_preprocessing:
        raise ValueError(f"{where}: the student's image preprocessing differs from the teacher's; recompute mode "
                         f"needs the teacher's exact pixels")
    mine = tower_fingerprint(student.vision_tower)
    if mine != info.tower_fingerprint:
        raise ValueError(f"{where}: the student's vision tower (weights {mine[:12]}) is not the teacher's "
                         f"({info.tower_fingerprint[:12]}), whose features P^T is computed from; use a student with "
                         f"the teacher's tower, or a cache with cache.signals = 'cached'")
    teacher_slice = TeacherSlice.build_empty(info.family, info.decoder, info.projector,
                                             attention_heads=meta.attention_heads)
    try:
        teacher_slice.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{where}: its tensors do not fit slice.json ({str(e).splitlines()[0][:200]})") from None
    # The rotary buffers are derived, not stored: build them again off the meta device.
    teacher_slice.rotary_emb = LlamaRotaryEmbedding(LlamaConfig(**info.decoder))
    return teacher_slice.to(device=student.device).eval().requires_grad_(False)  # tensors keep the teacher's dtype


@contextlib.contextmanager
def projector_inputs(student: VLM) -> Iterator[list[torch.Tensor]]:
    """Record what the student's projector is called on (its tower's features) while the
    block runs: recompute mode feeds them to the teacher's projector instead of running the
    shared tower a second time."""
    seen: list[torch.Tensor] = []
    handle = student.projector.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()
