"""Version 3 of the teacher-signal cache layout: the single source of truth for what is on disk.

The cache is a directory tree of Zarr v3 groups and arrays, readable by any Zarr v3 client.
Metadata is JSON (Zarr attributes); signals are plain numeric arrays. Nothing is pickled.

    {cache}/                        zarr group; attributes = CacheMeta.to_dict()
      zarr.json
      teacher_slice/                only when CacheMeta.signals is "recompute" (see below)
        slice.safetensors           the teacher's tensors the two alignment signals depend on
                                    (with cache.slice_tower, the default, its vision tower too)
        slice.json                  SliceMeta.to_dict(): which teacher, how to rebuild the
                                    modules, the tower's fingerprint, the tensors' size and sha256
      shards/                       zarr group, no attributes
        .{name}.tmp-{hex}/          a shard being written, or left by a crash: never read,
                                    `remove_partial` deletes it (names starting with "." are
                                    not shards; generic Zarr clients should skip them)
        {name}/                     one complete shard; attributes = ShardMeta.to_dict(), whose
                                    `files` lists every file below (size and sha256) except
                                    this zarr.json itself
          ids_offsets          (N+1,)       int64    sample i's tokens: input_ids[ids_offsets[i]:ids_offsets[i+1]]
          input_ids            (T,)         ID       0 at the vision positions (read back as IMAGE_TOKEN, -200)
          resp_offsets         (N+1,)       int64    sample i's response rows: [resp_offsets[i]:resp_offsets[i+1]]
          response_positions   (R,)         POS      position t in the sample (the teacher predicted it at t - 1)
          topk_ids             (R, k)       ID
          topk_logprobs        (R, k)       codecs.logprobs: float16 | float32
          tail_logmass         (R,)         codecs.logprobs: float16 | float32 (-inf allowed)
          --- the arrays below down to `focus`, except the vision span, are there only when
              CacheMeta.signals is "cached" (RECOMPUTED_ARRAYS lists them) ---
          rows_offsets         (N+1,)       int64    sample i's attention rows (text queries): [rows_offsets[i]:...]
          attn_offsets         (N+1,)       int64    sample i's attention values: [attn_offsets[i]:attn_offsets[i+1]]
          attn_L{layer:02d}    (A,)         one array per cached layer: sample i's block, row-major
                                            (Lq_i, H, P_v_i) per_head or (Lq_i, P_v_i) mean, flattened
                                            codecs.attention: float32 | float16 | uint8 | uint4 | uint4b (uint8 holding two)
          attn_L{layer:02d}_scale (L, H) | (L,) float32, only for uint8 / uint4: value = q * scale;
                                            uint16 for uint4b (the scale's bfloat16 bits)
          vision_start         (N,)         int32    -1 for a text-only sample
          vision_length        (N,)         int32    N_v_i, the sample's vision tokens; 0 for a text-only one
          vision_grid          (N, 2)       int32    their grid (rows, columns) in the model's order; (0, 0) text-only
          vision_offsets       (N+1,)       int64    sample i's vision tokens: [vision_offsets[i]:vision_offsets[i+1]]
          vision_features      (V, P_d)     codecs.features: float32 | float16 | int8 | int8l44 | int4 (uint8 holding two)
          vision_features_scale (V,)        float32, only for int8 / int8l44 / int4
          focus                (V,)         float32  (never quantised: one float per vision token)

    N = samples in the shard; T, R, L, V = the sums over its samples of tokens, response
    positions, attention rows (Lq_i = T_i - vision_start_i - N_v_i for an image sample, 0 for a
    text-only one) and vision tokens; A = the sum of Lq_i * H * P_v_i (per_head) or Lq_i * P_v_i
    (mean); k = CacheMeta.topk; H = teacher.num_heads; D = teacher.hidden_size; P_v = N_v and
    P_d = D, except for the 4-bit codecs, which pack two values per byte: ceil(N_v / 2),
    ceil(D / 2). ID = uint16 when the teacher's vocabulary has at most 65536 ids, else uint32;
    POS = uint16 when max_length is at most 65536, else uint32 (`id_dtype`, `position_dtype`).

Two modes (`CacheMeta.signals`), one job file for the student either way:
  * "cached" (the default): every signal is stored per sample, as drawn above.
  * "recompute": the layer-0 attention block, P^T and the focus scores are not stored. They
    depend only on the teacher's token embeddings, its projector applied to the vision tower's
    features, and its layer-0 norm, query and key weights and rotary, and the student computes
    the tower's features anyway when both share one frozen tower (MobileVLM V2 1.7B and 7B).
    So those teacher tensors are written once, at teacher_slice/, and the student stage
    recomputes the three signals from them exactly (alignkd.recompute). Shards then hold the
    token ids, the top-k log-probs and the vision span only. Only layer 0 can be recomputed
    (deeper layers need the whole decoder below them): `layers` must be (0,). Where the
    student's tower is not the teacher's (other weights or preprocessing, or trained), the
    student stage runs the teacher's own tower from the slice on the teacher's own view of
    each image (SliceTower); the slice holds it unless the job says `cache.slice_tower = false`.
    (`SliceMeta.tower` came before any release, like version 1's `files`: a slice.json
    without it is refused; the same extract-teacher job rewrites the slice.)
  The slice is written under a temporary name and renamed (at a URL: slice.json uploaded
  last), so a slice.json beside its tensors means a complete slice; the tensors' sha256 is in
  slice.json and checked when the student stage loads them.

What changed from version 2, and why: the `signals` field (above). A version-2 cache is a
"cached" one (migrations.py fills the field); its shards are unchanged (`shard_layout` 2).

What changed from version 1 (v1.py), and why:
  * The number of vision tokens is per sample (`vision_length`, `vision_grid`): dynamic-
    resolution teachers (Qwen2.5-VL) give every image its own count. `CacheMeta.
    num_vision_tokens` is that count when it is the same for every image (MobileVLM, LLaVA),
    and None when it varies. Vision rows are therefore indexed by `vision_offsets` and a
    sample's attention block by `attn_offsets`; a text-only sample stores no vision rows at
    all (version 1 stored N_v zero rows).
  * Ids and positions are stored as narrow as is exact: Llama's 32000-id vocabulary fits
    uint16, Qwen's 151k needs uint32. The vision span of input_ids is stored as 0 (it is
    known from vision_start and vision_length) so that the ids need no sign.
Anything added later (other signals, narrower dtypes) is a new array or a new CacheMeta field
with a migration that fills it for older caches; nothing here changes meaning.

Per-sample attention (H, Lq, N_v) is stored as (Lq, H, N_v) so that its rows line up with the
per-row scales; the reader reshapes and transposes it back. Every array of a shard is listed,
with dtype and shape, by `shard_arrays(meta)`; the writer creates exactly these and the reader
checks them. `sample_nbytes` gives a sample's stored bytes per array from the same list.

At a URL (object storage, alignkd.cache.remote) the layout is the same, each file an object
under the same key. Nothing is renamed there, so no `.tmp-` names appear: a shard's own
zarr.json is uploaded after every other object of it and is its completion marker; a prefix
`shards/{name}/` without it is a partial upload, never read, and removed like a `.tmp-` one.

Integrity: `ShardMeta.files` maps every file of a shard directory (each array's zarr.json
and chunk files, by path relative to the shard with "/" separators) to its size and sha256,
taken when the shard was written. Zarr writes no chunk file for a chunk that is all zeros
(the fill value) and reads a missing chunk back as zeros, so a deleted chunk file would
otherwise read as valid data: the list is complete, and a file missing from it, or on disk
but not in it, is damage. The shard's own zarr.json holds the list and is checked by the
schema instead (strict keys and types, the list's sizes adding up to `nbytes`). Readers check
sizes when they open a shard and hashes of what they read; `alignkd verify-cache` checks all
(alignkd.cache.verify). How chunks are laid out is Zarr metadata, not this schema: shards
written since issue 16 pack an array's chunks into a few files with zarr's sharding codec and
a crc32c per chunk (a reader checks a chunk it reads by that, the file by its sha256 when it
reads it whole); older shards have a file per chunk. Both read the same. `files` was added to version 1 before any release; a cache written by earlier
development code lacks it and is refused with a message that says so: extract it again.

Codecs (alignkd.cache.codecs has the formulas): rows are the last axis.
    uint8 / uint4   attention in [0, 1]: scale = row max / 255 (or / 15), q = round(x / scale)
    uint4b          uint4 with the scale rounded to bfloat16 first, stored as its 16 bits
    int8 / int8l44 / int4   features: symmetric, scale = row absmax / 127 (or / 44, / 7),
                    q = round(x / scale); int8l44's codes (-44..44) are int8 bytes
    4-bit packing   element 2j in the low nibble of byte j, element 2j+1 in the high nibble; int4
                    stores q + 8 (so 1..15); an odd row length pads one zero nibble
    fp16 / fp32     plain casts

When two caches are "the same" (`CacheMeta.differences`): every field must be equal except the
bookkeeping ones in BOOKKEEPING_FIELDS: `created`, `job` (paths, batch sizes, Ray settings),
`alignkd_version` (the code version that wrote it; layout changes bump SCHEMA_VERSION instead)
and `teacher.path` (where the weights were read from: the same teacher may sit at different
mount points on different machines; `teacher.config_hash` and `teacher.weights_fingerprint`
say which teacher it is). Everything else (teacher identity and shape, tokenizer, template,
max_length, vision tokens and image preprocessing, layers, head mode, top-k and every codec
setting including the compressor) changes what or how shards store, so shards made under
different values never mix in one cache.

Usage:

    meta = CacheMeta(teacher=TeacherInfo(...), tokenizer_hash=..., ..., created=now_iso)
    meta.validate()                                   # raises CacheSchemaError
    attrs = meta.to_dict()                            # plain JSON data, stored as root attributes
    meta = CacheMeta.from_dict(attrs, source=path)    # migrates old versions, refuses newer ones
    meta.differences(other)                           # ["teacher.config_hash", "topk"]
    shard_arrays(meta)                                # {"input_ids": ArraySpec(...), ...}
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import re
from typing import Any, Literal

from alignkd.cache_schemas import v1
from alignkd.cache_schemas.common import (
    CODEC_STORAGE,
    SCALE_SUFFIX,
    ArraySpec,
    CacheSchemaError,
    CodecSpec,
    FileDigest,
    TeacherInfo,
    _check_types,
    _coded,
    _differences,
    _from_dict,
    _nested,
    _to_dict,
    attention_array,
)

__all__ = [
    "SCHEMA_VERSION",
    "SHARD_LAYOUT",
    "CacheMeta",
    "shard_arrays",
    "sample_nbytes",
    "id_dtype",
    "position_dtype",
    "packed_width",
    "RECOMPUTED_ARRAYS",
    "TEACHER_SLICE",
    "SLICE_TENSORS",
    "SLICE_META",
    "SliceMeta",
    "SliceTower",
]

SCHEMA_VERSION = 3
"""The metadata version this code writes and reads; older versions are migrated (migrations.py)."""

TEACHER_SLICE = "teacher_slice"
SLICE_TENSORS = "slice.safetensors"
SLICE_META = "slice.json"
"""The folder at the cache root holding a recompute-mode cache's teacher slice, and its two files."""

RECOMPUTED_ARRAYS = ("rows_offsets", "attn_offsets", "attn_L", "vision_offsets", "vision_features", "focus")
"""Arrays (by name, or name prefix for the per-layer attention and scale arrays) a "recompute"
cache does not store: the student stage rebuilds the signals they hold from the slice."""

SHARD_LAYOUT = 2
"""The shard arrays this code writes (the tree above); a cache migrated from version 1 says 1."""


def id_dtype(vocab_size: int) -> str:
    """The narrowest exact unsigned dtype for token ids of a vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def position_dtype(max_length: int) -> str:
    """The narrowest exact unsigned dtype for positions in sequences of up to max_length tokens."""
    return "uint16" if max_length <= 1 << 16 else "uint32"


def packed_width(codec: str, width: int) -> int:
    """Stored values per row of `width` values: half (rounded up) for the 4-bit codecs."""
    return (width + 1) // 2 if CODEC_STORAGE[codec].packed else width


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheMeta:
    """The cache's root attributes: everything needed to interpret its shards and to trace
    them to the job that made them (`job` is the resolved extraction job)."""

    schema_version: int = SCHEMA_VERSION
    shard_layout: int = SHARD_LAYOUT  # 1 for a cache migrated from version 1 (read only)
    teacher: TeacherInfo
    tokenizer_hash: str
    template: str
    max_length: int
    num_vision_tokens: int | None  # None: the count differs between images (per-sample vision_length)
    image_preprocessing: dict[str, Any]
    layers: tuple[int, ...]
    attention_heads: Literal["per_head", "mean"]
    signals: Literal["cached", "recompute"] = "cached"  # "recompute": attention, P^T, focus rebuilt from teacher_slice/
    topk: int
    codecs: CodecSpec
    job: dict[str, Any]
    alignkd_version: str
    created: str

    def validate(self) -> None:
        _check_types(self)
        if self.schema_version != SCHEMA_VERSION:
            raise CacheSchemaError(
                f"schema_version: this alignkd writes and reads {SCHEMA_VERSION}, got {self.schema_version}"
            )
        _nested(self.teacher.validate, "teacher")
        _nested(self.codecs.validate, "codecs")
        for name in ("tokenizer_hash", "template", "alignkd_version"):
            if not getattr(self, name):
                raise CacheSchemaError(f"{name}: must not be empty")
        if self.shard_layout not in (1, SHARD_LAYOUT):
            raise CacheSchemaError(f"shard_layout: {self.shard_layout} is not 1 or {SHARD_LAYOUT}")
        if self.max_length < 1:
            raise CacheSchemaError(f"max_length: must be at least 1, got {self.max_length}")
        if self.num_vision_tokens is not None and self.num_vision_tokens < 1:
            raise CacheSchemaError(f"num_vision_tokens: must be at least 1 or null, got {self.num_vision_tokens}")
        if self.num_vision_tokens is None and self.shard_layout == 1:
            raise CacheSchemaError("num_vision_tokens: a version-1 shard layout needs one fixed count")
        if not self.layers:
            raise CacheSchemaError("layers: at least one layer is needed")
        if self.signals == "recompute" and self.layers != (0,):
            raise CacheSchemaError(f"layers: a recompute cache rebuilds layer 0 only (deeper layers need the whole "
                                   f"decoder below them), got {list(self.layers)}")
        if self.signals == "recompute" and self.shard_layout != SHARD_LAYOUT:
            raise CacheSchemaError("signals: a recompute cache needs the current shard layout")
        if len(set(self.layers)) != len(self.layers):
            raise CacheSchemaError(f"layers: {list(self.layers)} has duplicates")
        for layer in self.layers:
            if not 0 <= layer < self.teacher.num_layers:
                raise CacheSchemaError(f"layers: {layer} is not a layer of a {self.teacher.num_layers}-layer teacher")
        if not 1 <= self.topk <= self.teacher.vocab_size:
            raise CacheSchemaError(f"topk: must be in 1..{self.teacher.vocab_size} (the vocabulary), got {self.topk}")
        try:
            _dt.datetime.fromisoformat(self.created)
        except ValueError:
            raise CacheSchemaError(f"created: {self.created!r} is not an ISO 8601 time") from None

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, raw: Any, *, source: str | None = None) -> CacheMeta:
        """Parse root attributes: older versions are migrated first, newer ones refused."""
        # Imported here: migrations.py imports this module for SCHEMA_VERSION and the error.
        from alignkd.cache_schemas.migrations import migrate

        try:
            raw = migrate(raw)
        except CacheSchemaError as e:
            raise CacheSchemaError(f"{source}: {e}" if source else str(e)) from None
        return _from_dict(cls, raw, source)

    def differences(self, other: CacheMeta) -> list[str]:
        """Dotted names of the fields that differ, bookkeeping fields excluded, sorted; inside
        dicts, the deepest key where they differ ("image_preprocessing.size")."""
        return _differences(self.to_dict(), other.to_dict())



@dataclasses.dataclass(frozen=True, kw_only=True)
class SliceTower:
    """SliceMeta.tower: the teacher's own vision tower and its view of an image, for a student
    whose tower is not the teacher's (other weights, other preprocessing, or trained). Its
    weights are in slice.safetensors under "vision_tower."; this says how to rebuild the
    modules offline (nothing is downloaded).

    kind              the tower's transformers class (only "CLIPVisionModel": MobileVLM, LLaVA)
    config            its config, as `config.to_dict()` gives it (a CLIPVisionConfig)
    image_processor   the teacher's image processor: {"class": its transformers class name,
                      "config": its JSON settings}; with `pad_images`, the teacher's exact pixels
    pad_images        whether the teacher pads images to a square with the mean colour first
    """

    kind: Literal["CLIPVisionModel"]
    config: dict[str, Any]
    image_processor: dict[str, Any]
    pad_images: bool

    def validate(self) -> None:
        _check_types(self)
        if set(self.image_processor) != {"class", "config"}:
            raise CacheSchemaError("tower.image_processor: expected the keys class and config")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SliceMeta:
    """teacher_slice/slice.json of a recompute cache: what the student stage needs to rebuild
    the layer-0 attention block and P^T from the slice's tensors (alignkd.recompute).

    family          the teacher's family (a key of alignkd.models.FAMILIES)
    teacher_config_hash, teacher_weights_fingerprint   the teacher's, as in CacheMeta.teacher
    dtype           of every stored tensor: the dtype the teacher ran in at extraction
    decoder         the decoder config entries layer 0's norm, query, key and rotary read
    projector       the family's projector spec (`VLM.projector_spec`): how to rebuild it, and
                    which tower features it reads ("input")
    tower_fingerprint   sha256 of the teacher's vision tower weights as float32: a student may
                    recompute from its own tower's features only when its tower has this one
    tower           the teacher's tower itself (SliceTower), for a student whose tower is not
                    the teacher's; None when the extraction left it out (cache.slice_tower =
                    false: 0.61 GB less for CLIP ViT-L/336, and only such a student can use it)
    tensors         slice.safetensors' size and sha256
    """

    family: str
    teacher_config_hash: str
    teacher_weights_fingerprint: str
    dtype: Literal["float32", "bfloat16", "float16"]
    decoder: dict[str, Any]
    projector: dict[str, Any]
    tower_fingerprint: str
    tower: SliceTower | None
    tensors: FileDigest

    def validate(self) -> None:
        _check_types(self)
        for name in ("family", "teacher_config_hash", "teacher_weights_fingerprint"):
            if not getattr(self, name):
                raise CacheSchemaError(f"{name}: must not be empty")
        for name, digest in (("tower_fingerprint", self.tower_fingerprint), ("tensors.sha256", self.tensors.sha256)):
            if not _SHA256.fullmatch(digest):
                raise CacheSchemaError(f"{name}: {digest!r} is not a sha256 hex digest")
        if self.tensors.size < 1:
            raise CacheSchemaError(f"tensors.size: must be at least 1, got {self.tensors.size}")
        if "input" not in self.projector:
            raise CacheSchemaError("projector: missing key input (the tower features the projector reads)")
        if self.tower is not None:
            self.tower.validate()

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, raw: Any, *, source: str | None = None) -> SliceMeta:
        return _from_dict(cls, raw, source)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def shard_arrays(meta: CacheMeta) -> dict[str, ArraySpec]:
    """Every array of a shard made under `meta`, by name, in the order the writer writes them
    (for a cache migrated from version 1, the arrays its shards have: v1.shard_arrays)."""
    if meta.shard_layout == 1:
        return v1.shard_arrays(meta)
    d, h, k = meta.teacher.hidden_size, meta.teacher.num_heads, meta.topk
    c = meta.codecs
    ids, positions = id_dtype(meta.teacher.vocab_size), position_dtype(meta.max_length)
    specs = [
        ArraySpec("ids_offsets", "int64", ("N+1",), signal="index"),
        ArraySpec("input_ids", ids, ("T",), signal="input_ids", offsets="ids_offsets"),
        ArraySpec("resp_offsets", "int64", ("N+1",), signal="index"),
        ArraySpec("response_positions", positions, ("R",), signal="response_positions", offsets="resp_offsets"),
        ArraySpec("topk_ids", ids, ("R", k), signal="topk_ids", offsets="resp_offsets"),
        *_coded("topk_logprobs", ("R",), k, c.logprobs, "resp_offsets"),
        # tail_logmass is one value per row: its "row" is the whole (R,) array, so it is (R,)
        # rather than (R, 1); fp16/fp32 have no per-row state, so nothing else changes.
        ArraySpec("tail_logmass", CODEC_STORAGE[c.logprobs].dtype, ("R",), signal="tail_logmass",
                  codec=c.logprobs, offsets="resp_offsets"),
        ArraySpec("rows_offsets", "int64", ("N+1",), signal="index"),
        ArraySpec("attn_offsets", "int64", ("N+1",), signal="index"),
    ]
    store = CODEC_STORAGE[c.attention]
    rows = ("L", h) if meta.attention_heads == "per_head" else ("L",)
    for layer in meta.layers:
        name = attention_array(layer)
        specs.append(ArraySpec(name, store.dtype, ("A",), signal=name, codec=c.attention, offsets="attn_offsets"))
        if store.scaled:
            specs.append(ArraySpec(name + SCALE_SUFFIX, store.scale_dtype, rows, signal=name, codec=c.attention,
                                   offsets="rows_offsets"))
    specs += [
        ArraySpec("vision_start", "int32", ("N",), signal="index"),
        ArraySpec("vision_length", "int32", ("N",), signal="index"),
        ArraySpec("vision_grid", "int32", ("N", 2), signal="index"),
        ArraySpec("vision_offsets", "int64", ("N+1",), signal="index"),
        *_coded("vision_features", ("V",), d, c.features, "vision_offsets"),
        ArraySpec("focus", "float32", ("V",), signal="focus", codec="fp32", offsets="vision_offsets"),
    ]
    if meta.signals == "recompute":
        specs = [s for s in specs if not s.name.startswith(RECOMPUTED_ARRAYS)]
    return {s.name: s for s in specs}


def sample_nbytes(meta: CacheMeta, *, tokens: int, responses: int, rows: int, vision: int) -> dict[str, int]:
    """Stored bytes of one sample per array of the current layout, before compression: a
    sample of `tokens` tokens, `responses` response positions, `rows` attention rows (text
    queries after the image) and `vision` vision tokens. The offsets' final entry is shared by
    the shard and not counted."""
    width = packed_width(meta.codecs.attention, vision)
    heads = meta.teacher.num_heads if meta.attention_heads == "per_head" else 1
    counts = {"N": 1, "N+1": 1, "T": tokens, "R": responses, "L": rows, "V": vision, "A": rows * heads * width}
    out = {}
    for name, spec in shard_arrays(dataclasses.replace(meta, shard_layout=SHARD_LAYOUT)).items():
        n = math.prod(counts[d] if isinstance(d, str) else d for d in spec.shape)
        out[name] = n * _ITEMSIZE[spec.dtype]
    return out


_ITEMSIZE = {"int64": 8, "int32": 4, "uint32": 4, "uint16": 2, "uint8": 1, "int8": 1, "float32": 4, "float16": 2}
