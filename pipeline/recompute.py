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
    data = DistillDataset(..., teacher_images=teacher_slice.images)          # the teacher's pixels, where needed
    with projector_inputs(student) as seen:                                 # the student's tower features
        out = student(batch, tap_layers=(0,))
    teacher = teacher_slice.complete(teacher, batch, seen)                  # the TeacherBatch a cached cache gives

`train.compute_losses(..., teacher_slice=...)` does exactly this. The result has the cached
path's shapes, dtypes (float32) and masks, so the losses are untouched.

What it needs: a teacher whose decoder is Llama's (MobileVLM V2, LLaVA; `VLM.projector_spec`
says whether a family can be sliced: Qwen2.5-VL and InternVL cannot yet). Two ways to P^T's input:

  shared tower   the student's frozen tower has the teacher's weights (by fingerprint), its
                 projector reads the same tower layer and its image preprocessing is the
                 teacher's exactly: then its projector's input is the teacher's projector's
                 input, recorded by a hook (`projector_inputs`), and no tower runs twice.
  teacher tower  otherwise (other weights, another resolution or preprocessing, or
                 optim.train_vision_tower on): the slice's own copy of the teacher's tower
                 (written unless cache.slice_tower = false) runs, frozen and in the teacher's
                 dtype, on the teacher's view of each image. Where the student's pixels are
                 not the teacher's, `teacher_slice.images` is the teacher's image preparation
                 and the DataLoader adds its pixel values to the TeacherBatch
                 (`DistillDataset(..., teacher_images=teacher_slice.images)`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from alignkd.cache_schemas import IMAGE_TOKEN, CacheMeta, CacheSchemaError
from alignkd.data.images import SquareImages
from alignkd.models import family_class
from alignkd.models.base import VLM, ModelError, VLMBatch, clip_patch_features, text_positions
from alignkd.models.tap import text_vision_block

__all__ = ["TeacherSlice", "slice_tensors", "slice_fields", "tower_fingerprint", "tower_spec", "load_teacher_slice",
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
    """The teacher's embedding table, layer-0 norm and q/k projections, rotary and projector,
    and, with `tower` (SliceTower's fields), its vision tower.

    Submodule names give the teacher decoder's own state-dict keys (`embed_tokens.weight`,
    `layers.0.self_attn.q_proj.weight`, ...), `projector.*` its projector's and `vision_tower.*`
    its tower's, so the slice is cut from the teacher by name (`slice_tensors`) and loaded back
    strictly. Without a tower (`vision_tower` None) P^T is computed from the student's projector
    input; `images`, set by `load_teacher_slice`, is the teacher's image preparation where the
    student's pixels are not the teacher's (None: the batch's own pixel values serve).
    """

    def __init__(self, family: str, decoder: dict[str, Any], projector: dict[str, Any], *,
                 attention_heads: str = "per_head", tower: dict[str, Any] | None = None):
        super().__init__()
        config = LlamaConfig(**decoder)
        self.family, self.attention_heads = family, attention_heads
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([_Layer0(config)])
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.projector = family_class(family).build_projector(projector)
        self.feature_input = projector["input"]  # the tower layer the projector reads, CLS dropped or not
        self.vision_tower = _build_tower(tower) if tower is not None else None
        self.images: SquareImages | None = None

    @property
    def reads_student_features(self) -> bool:
        """Whether P^T comes from the student's projector input (`projector_inputs`), i.e. the
        shared-tower path; False when the slice runs the teacher's own tower."""
        return self.vision_tower is None

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
        `seen`: what `projector_inputs` recorded during the student's forward of `batch` (the
        shared-tower path; ignored when the slice holds the teacher's tower, which then runs on
        `teacher.pixel_values`, the teacher's view of the images, or on the batch's own)."""
        weight = self.embed_tokens.weight
        device, dtype = weight.device, weight.dtype
        vision = batch.input_ids == IMAGE_TOKEN
        # The teacher ran in its own dtype, without autocast: so does its slice.
        with torch.autocast(device.type, enabled=False):
            tower_out = seen[-1] if seen and self.vision_tower is None else None
            if self.vision_tower is not None and vision.any():
                pixels = teacher.pixel_values if self.images is not None else batch.pixel_values
                if pixels is None:
                    raise ModelError(f"batch {batch.keys[:3]}...: the teacher's tower needs the teacher's pixel values, "
                                     f"which this batch lacks (build the data set with teacher_images=teacher_slice.images)")
                tower_out = clip_patch_features(self.vision_tower, pixels.to(device=device, dtype=dtype),
                                                layer=self.feature_input["feature_layer"],
                                                drop_cls=self.feature_input["drop_cls"])
            if bool(vision.any()) != (tower_out is not None):
                raise ModelError(f"batch {batch.keys[:3]}...: {len(seen or [])} projector inputs recorded for a batch "
                                 f"{'with' if vision.any() else 'without'} vision positions")
            embeds = self.embed_tokens(batch.input_ids.masked_fill(vision, 0))
            feats = None
            if tower_out is not None:
                feats = self.projector(tower_out.to(device=device, dtype=dtype))  # P^T: (B_img, Nv, D_T)
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


def estimate_slice_bytes(family: str, text_config: Any, projector_spec: dict[str, Any], dtype: str,
                         vision_config: Any = None) -> int:
    """Bytes of the slice's tensors for a teacher of this config, stored in `dtype` (the
    safetensors header and slice.json add a few KiB), with the teacher's tower when its
    `vision_config` (a CLIPVisionConfig) is given: from the modules' shapes, no weights."""
    tower = None if vision_config is None else {"kind": "CLIPVisionModel", "config": vision_config.to_dict()}
    empty = TeacherSlice.build_empty(family, decoder_config(text_config, family), projector_spec, tower=tower)
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


def tower_spec(vlm: VLM) -> dict[str, Any]:
    """SliceTower's fields for a loaded teacher: what rebuilds its vision tower and its exact
    pixels offline (the tower's config, the image processor's settings, the padding)."""
    kind = type(vlm.vision_tower).__name__
    if kind not in _TOWER_KINDS:
        raise ModelError(f"the teacher slice can hold a CLIP tower only, this {vlm.family} teacher's is {kind}: "
                         f"set cache.slice_tower = false (students with the teacher's own tower) or use 'cached'")
    config = json.loads(vlm.vision_tower.config.to_json_string(use_diff=False))
    for key in ("_name_or_path", "transformers_version"):  # where it was loaded from, and by what: not the tower
        config.pop(key, None)
    return {"kind": kind, "config": config, "image_processor": _processor_record(vlm.image_processor),
            "pad_images": bool(vlm.pad_images)}


def slice_fields(vlm: VLM, *, tower: bool = True) -> dict[str, Any]:
    """SliceMeta's fields, except the tensors' digest, for a loaded teacher; `tower`: whether
    the slice holds its vision tower (cache.slice_tower)."""
    ident = vlm.identity()
    return {"family": vlm.family, "teacher_config_hash": ident["config_hash"],
            "teacher_weights_fingerprint": ident["weights_fingerprint"], "dtype": str(vlm.dtype).removeprefix("torch."),
            "decoder": decoder_config(vlm.text_config, vlm.family), "projector": vlm.projector_spec(),
            "tower_fingerprint": tower_fingerprint(vlm.vision_tower), "tower": tower_spec(vlm) if tower else None}


def slice_tensors(vlm: VLM, *, tower: bool = True) -> dict[str, torch.Tensor]:
    """The teacher's own tensors the slice holds, by the slice's names (its decoder's keys,
    `projector.*`, and with `tower` `vision_tower.*`)."""
    fields = slice_fields(vlm, tower=tower)
    names = TeacherSlice.build_empty(vlm.family, fields["decoder"], fields["projector"], tower=fields["tower"]).state_dict()
    parts = {"projector.": vlm.projector.state_dict(), "vision_tower.": vlm.vision_tower.state_dict()}
    decoder = vlm.language_model.state_dict()
    out = {}
    for name in names:
        prefix = next((p for p in parts if name.startswith(p)), None)
        out[name] = parts[prefix][name.removeprefix(prefix)] if prefix else decoder[name]
    return out


def load_teacher_slice(cache: Any, student: VLM, *, train_tower: bool) -> TeacherSlice:
    """The slice of a recompute cache (a CacheReader), on the student's device, after checking
    that it belongs to the cache's teacher, and which way it serves this student: from the
    student's own projector input where it is the teacher's (shared frozen tower, same pixels),
    else with the teacher's tower from the slice. Every refusal is one ValueError line naming
    what differs."""
    from alignkd.cache.teacher_slice import read_teacher_slice

    meta: CacheMeta = cache.meta
    try:
        tensors, info = read_teacher_slice(cache.path)
    except CacheSchemaError as e:
        raise ValueError(str(e)) from None
    where = f"cache {cache.path}: teacher slice"
    if (info.teacher_config_hash, info.teacher_weights_fingerprint) != (meta.teacher.config_hash,
                                                                        meta.teacher.weights_fingerprint):
        raise ValueError(f"{where} was cut from another teacher than the cache's signals (config or weights differ)")
    differs = _tower_differences(student, info, meta, train_tower)
    tower = dataclasses.asdict(info.tower) if differs and info.tower is not None else None
    if differs and tower is None:
        raise ValueError(f"{where} holds no vision tower (extracted with cache.slice_tower = false), and "
                         f"{'; '.join(differs)}: P^T needs the teacher's tower features; use a student with the "
                         f"teacher's frozen tower and preprocessing, or extract with cache.slice_tower = true, or "
                         f"use a cache with cache.signals = 'cached'")
    if tower is None:  # the shared path: the slice's copy of the tower (if any) is not needed
        tensors = {k: v for k, v in tensors.items() if not k.startswith("vision_tower.")}
    teacher_slice = TeacherSlice.build_empty(info.family, info.decoder, info.projector,
                                             attention_heads=meta.attention_heads, tower=tower)
    try:
        teacher_slice.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{where}: its tensors do not fit slice.json ({str(e).splitlines()[0][:200]})") from None
    # Derived buffers are not stored: build them again off the meta device (the rotary's,
    # and the position ids CLIP's embeddings keep as a non-persistent buffer).
    teacher_slice.rotary_emb = LlamaRotaryEmbedding(LlamaConfig(**info.decoder))
    if teacher_slice.vision_tower is not None:
        tower_model = teacher_slice.vision_tower
        embeddings = getattr(tower_model, "vision_model", tower_model).embeddings  # transformers 4 nests it
        embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions)[None], persistent=False)
        if (_processor_record(student.image_processor), bool(student.pad_images)) != (tower["image_processor"],
                                                                                       tower["pad_images"]):
            teacher_slice.images = SquareImages(_processor_from_record(tower["image_processor"], where),
                                                tower["pad_images"], meta.num_vision_tokens)
    left = [n for n, t in (*teacher_slice.named_parameters(), *teacher_slice.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{where}: {left[:3]} not restored from the slice (no tensor, no rule to derive it)")
    return teacher_slice.to(device=student.device).eval().requires_grad_(False)  # tensors keep the teacher's dtype


def _tower_differences(student: VLM, info: Any, meta: CacheMeta, train_tower: bool) -> list[str]:
    """Why the student's projector input is not the teacher's (empty: the shared-tower path serves)."""
    from alignkd.signals import image_preprocessing

    out = []
    if train_tower:
        out.append("optim.train_vision_tower is on (the student's tower will leave the teacher's)")
    try:
        spec = student.projector_spec()
        if spec["input"] != info.projector["input"]:
            out.append(f"the student's projector reads tower features {spec['input']}, the teacher's "
                       f"{info.projector['input']}")
    except ModelError as e:
        out.append(f"the student's projector input cannot be checked ({e})")
    if image_preprocessing(student) != meta.image_preprocessing:
        out.append("the student's image preprocessing differs from the teacher's")
    mine = tower_fingerprint(student.vision_tower)
    if mine != info.tower_fingerprint:
        out.append(f"the student's vision tower (weights {mine[:12]}) is not the teacher's ({info.tower_fingerprint[:12]})")
    return out


_TOWER_KINDS = {"CLIPVisionModel": (CLIPVisionModel, CLIPVisionConfig)}
"""Vision towers a slice can hold (SliceTower.kind): their module and config classes."""


def _build_tower(tower: dict[str, Any]) -> nn.Module:
    model, config = _TOWER_KINDS[tower["kind"]]
    return model(config.from_dict(tower["config"]))


def _processor_record(processor: Any) -> dict[str, Any]:
    """An image processor as SliceTower.image_processor records it: class and JSON settings."""
    return {"class": type(processor).__name__, "config": json.loads(processor.to_json_string())}


def _processor_from_record(record: dict[str, Any], where: str) -> Any:
    name = record["class"]
    cls = getattr(transformers, name, None) if name.endswith(("ImageProcessor", "ImageProcessorPil",
                                                              "ImageProcessorFast")) else None
    if cls is None:
        raise ValueError(f"{where}: the teacher's image processor {name!r} is not one this transformers has")
    return cls.from_dict(record["config"])


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
