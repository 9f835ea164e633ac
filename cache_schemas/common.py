"""What every version of the cache layout shares: metadata types, codecs' storage, array
specs, shard names and the strict JSON (de)serialisation they all go through.

The version-specific parts (the current root metadata `CacheMeta`, which arrays a shard
holds) are in v3.py (current) and v1.py (read, no longer written); the package exports the
current version's names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

__all__ = [
    "BOOKKEEPING_FIELDS",
    "IMAGE_TOKEN",
    "SHARDS_GROUP",
    "SCALE_SUFFIX",
    "CODEC_STORAGE",
    "CacheSchemaError",
    "CodecSpec",
    "CodecStorage",
    "TeacherInfo",
    "FileDigest",
    "ShardMeta",
    "ArraySpec",
    "attention_array",
    "check_shard_name",
]

BOOKKEEPING_FIELDS = ("created", "job", "alignkd_version", "teacher.path")
"""CacheMeta fields that may differ between two runs writing into the same cache (see v3.py)."""

IMAGE_TOKEN = -200
"""The id at vision positions of input_ids, in the cache and in every batch (as in MobileVLM;
never a real token). alignkd.data.templates and alignkd.models take it from here."""

SHARDS_GROUP = "shards"
SCALE_SUFFIX = "_scale"
_TMP_MARK = ".tmp-"


class CacheSchemaError(ValueError):
    """Cache metadata or data that does not fit the schema; one line, naming the field (and the
    cache path, shard or sample key when known)."""


# ---------------------------------------------------------------------------- codecs


@dataclasses.dataclass(frozen=True)
class CodecStorage:
    """How a codec's output is stored: `dtype` of the value array, whether a float32 scale array
    (one per row) goes with it, and whether two values share a byte (4-bit codecs)."""

    dtype: str
    scaled: bool
    packed: bool
    scale_dtype: str = "float32"  # "uint16": bfloat16 bits

    @property
    def lossy(self) -> bool:
        return self.dtype != "float32"


CODEC_STORAGE: dict[str, CodecStorage] = {
    "fp32": CodecStorage("float32", scaled=False, packed=False),
    "fp16": CodecStorage("float16", scaled=False, packed=False),
    "uint8": CodecStorage("uint8", scaled=True, packed=False),
    "uint4": CodecStorage("uint8", scaled=True, packed=True),
    "uint4b": CodecStorage("uint8", scaled=True, packed=True, scale_dtype="uint16"),
    "int8": CodecStorage("int8", scaled=True, packed=False),
    "int4": CodecStorage("uint8", scaled=True, packed=True),
    "int8l44": CodecStorage("int8", scaled=True, packed=False),
}

_LEVELS = {"zstd": (1, 22), "blosc": (0, 9)}


@dataclasses.dataclass(frozen=True)
class CodecSpec:
    """Codec per signal and the lossless compressor on top. Also the `[cache.codecs]` section
    of an extraction job file, so it keeps a plain, defaulted, dataclass shape.

    attention   layer-0 text x vision attention rows (probabilities in [0, 1])
    features    the teacher's projector output P^T
    logprobs    top-k log-probs and the tail log-mass
    compressor  applied to every array's chunks; `level` is zstd's (1..22) or blosc's (0..9)

    The defaults (uint4b / int8l44 / fp16 + zstd 3) are the smallest set measured to keep every
    Align-KD term's gradient at cosine >= 0.99 against lossless signals (docs/codecs.md).
    """

    attention: Literal["fp32", "fp16", "uint8", "uint4", "uint4b"] = "uint4b"
    features: Literal["fp32", "fp16", "int8", "int8l44", "int4"] = "int8l44"
    logprobs: Literal["fp32", "fp16"] = "fp16"
    compressor: Literal["zstd", "blosc", "none"] = "zstd"
    level: int = 3

    def validate(self) -> None:
        _check_types(self)
        if self.compressor in _LEVELS:
            lo, hi = _LEVELS[self.compressor]
            if not lo <= self.level <= hi:
                raise CacheSchemaError(f"level: {self.level} is outside {self.compressor}'s range {lo}..{hi}")

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, raw: Any, *, source: str | None = None) -> CodecSpec:
        return _from_dict(cls, raw, source)



# ---------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class TeacherInfo:
    """Which teacher made the signals, and the shapes that follow from it."""

    family: str
    path: str
    config_hash: str
    weights_fingerprint: str
    vision_tower: str | None
    num_layers: int
    num_heads: int
    hidden_size: int
    vocab_size: int

    def validate(self) -> None:
        _check_types(self)
        for name in ("family", "config_hash", "weights_fingerprint"):
            if not getattr(self, name):
                raise CacheSchemaError(f"{name}: must not be empty")
        for name in ("num_layers", "num_heads", "hidden_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise CacheSchemaError(f"{name}: must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, raw: Any, *, source: str | None = None) -> TeacherInfo:
        return _from_dict(cls, raw, source)


@dataclasses.dataclass(frozen=True)
class FileDigest:
    """One file of a shard as written: its size in bytes and the sha256 hex digest of its bytes."""

    size: int
    sha256: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardMeta:
    """One shard's attributes. Lists are in row order: keys[i] is the sample at row i.

    skipped         samples of the input shard that have no signals: [{"key", "reason"}]
    codec_error     per lossy float signal (see ArraySpec.signal): {"max", "mean"} absolute
                    error of the decoded values against the float32 ones, measured at write time
    nbytes          per array name: bytes on disk of its directory (chunks and zarr.json)
    raw_fp16_bytes  per float signal: 2 bytes per value, what plain fp16 would have taken
    files           every file of the shard but its own zarr.json, by relative "/" path:
                    FileDigest(size, sha256) as written (see "Integrity" above)
    """

    name: str
    input_shard: str
    input_size: int
    keys: tuple[str, ...]
    fingerprints: tuple[str, ...]
    skipped: tuple[dict[str, str], ...]
    num_samples: int
    codec_error: dict[str, dict[str, float]]
    nbytes: dict[str, int]
    raw_fp16_bytes: dict[str, int]
    files: dict[str, FileDigest]

    _FINGERPRINT: ClassVar[re.Pattern] = re.compile(r"[0-9a-f]{64}")

    def validate(self) -> None:
        _check_types(self)
        check_shard_name(self.name)
        if self.input_size < 0:
            raise CacheSchemaError(f"input_size: must be >= 0, got {self.input_size}")
        if not len(self.keys) == len(self.fingerprints) == self.num_samples:
            raise CacheSchemaError(
                f"num_samples: {self.num_samples} samples but {len(self.keys)} keys "
                f"and {len(self.fingerprints)} fingerprints"
            )
        seen: set[str] = set()
        for key in self.keys:
            if not key:
                raise CacheSchemaError("keys: an empty key")
            if key in seen:
                raise CacheSchemaError(f"keys: {key!r} appears twice")
            seen.add(key)
        for key, fp in zip(self.keys, self.fingerprints):
            if not self._FINGERPRINT.fullmatch(fp):
                raise CacheSchemaError(f"fingerprints: sample {key}: {fp!r} is not a sha256 hex digest")
        for i, item in enumerate(self.skipped):
            if set(item) != {"key", "reason"}:
                raise CacheSchemaError(f"skipped[{i}]: must have exactly 'key' and 'reason', got {sorted(item)}")
            if item["key"] in seen:
                raise CacheSchemaError(f"skipped[{i}]: {item['key']!r} is also a stored sample")
        for signal, stats in self.codec_error.items():
            if set(stats) != {"max", "mean"}:
                raise CacheSchemaError(f"codec_error.{signal}: must have exactly 'max' and 'mean', got {sorted(stats)}")
            if not all(math.isfinite(v) and v >= 0 for v in stats.values()):
                raise CacheSchemaError(f"codec_error.{signal}: errors must be finite and >= 0, got {stats}")
        for field in ("nbytes", "raw_fp16_bytes"):
            for name, n in getattr(self, field).items():
                if n < 0:
                    raise CacheSchemaError(f"{field}.{name}: must be >= 0, got {n}")
        per_array: dict[str, int] = {}
        for path, digest in self.files.items():
            parts = path.split("/")
            if path == "zarr.json" or "" in parts or ".." in parts or "." in parts or "\\" in path:
                raise CacheSchemaError(f"files: {path!r} is not a file path inside the shard")
            if parts[0] not in self.nbytes:
                raise CacheSchemaError(f"files: {path!r} is not inside an array of the shard")
            if digest.size < 0 or not self._FINGERPRINT.fullmatch(digest.sha256):
                raise CacheSchemaError(f"files.{path}: needs a size >= 0 and a sha256 hex digest, got {digest}")
            per_array[parts[0]] = per_array.get(parts[0], 0) + digest.size
        for name, n in self.nbytes.items():
            if per_array.get(name, 0) != n:
                raise CacheSchemaError(f"files: the files of {name} add up to {per_array.get(name, 0)} bytes, "
                                       f"nbytes says {n}")

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, raw: Any, *, source: str | None = None) -> ShardMeta:
        if isinstance(raw, dict) and "files" not in raw and "keys" in raw:
            # The one field version 1 gained before release (see the module docstring).
            where = f"{source}: " if source else ""
            raise CacheSchemaError(f"{where}missing key files: the shard was written before per-file checksums "
                                   "(development code before the first release); extract it again")
        return _from_dict(cls, raw, source)



# ---------------------------------------------------------------------------- array layout


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One array of a shard. `shape[0]` is a symbol: "N" (one row per sample), "N+1" (offsets),
    or "T", "R", "L" (rows of all samples, sliced by `offsets`); the other axes are sizes.

    signal  what the array belongs to when bytes are counted: a float signal ("attn_L00",
            "vision_features", "focus", "topk_logprobs", "tail_logmass") with its scale array,
            "input_ids", "response_positions", "topk_ids", or "index" (offsets, vision span)
    codec   the CodecSpec value that made it (value and scale arrays of a float signal), else None
    """

    name: str
    dtype: str
    shape: tuple[str | int, ...]
    signal: str
    codec: str | None = None
    offsets: str | None = None


def attention_array(layer: int) -> str:
    """Name of the array holding one layer's attention rows."""
    return f"attn_L{layer:02d}"


def _coded(name: str, rows: tuple[str | int, ...], width: int, codec: str, offsets: str | None) -> list[ArraySpec]:
    """Value array (+ scale array) of a float signal whose last axis has `width` values."""
    store = CODEC_STORAGE[codec]
    last = (width + 1) // 2 if store.packed else width
    specs = [ArraySpec(name, store.dtype, (*rows, last), signal=name, codec=codec, offsets=offsets)]
    if store.scaled:
        specs.append(ArraySpec(name + SCALE_SUFFIX, store.scale_dtype, rows, signal=name, codec=codec, offsets=offsets))
    return specs



def check_shard_name(name: Any) -> str:
    """Return `name` if it can name a shard directory, else raise CacheSchemaError.

    Names starting with "." are reserved for temporary directories, and ".tmp-" inside a name
    would confuse `remove_partial_shard` for another shard."""
    if not isinstance(name, str) or not name or not name.isprintable():
        raise CacheSchemaError(f"shard name {name!r}: must be a non-empty printable string")
    if name.startswith(".") or "/" in name or "\\" in name or _TMP_MARK in name or name == SHARDS_GROUP:
        raise CacheSchemaError(f"shard name {name!r}: must not start with '.' or contain '/', '\\' or '{_TMP_MARK}'")
    return name


# ---------------------------------------------------------------------------- generic (de)serialisation

_MISSING = object()


def _nested(validate: Any, prefix: str) -> None:
    try:
        validate()
    except CacheSchemaError as e:
        raise CacheSchemaError(f"{prefix}.{e}") from None


def _to_dict(obj: Any) -> Any:
    """Plain JSON data: dataclasses -> dicts, tuples -> lists, dicts copied."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_dict(v) for k, v in obj.items()}
    return obj


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths where two metadata dicts differ, skipping BOOKKEEPING_FIELDS."""
    out = []
    for k in sorted(set(a) | set(b)):
        name = prefix + k
        if name in BOOKKEEPING_FIELDS:
            continue
        x, y = a.get(k, _MISSING), b.get(k, _MISSING)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, name + ".")
        elif x != y:
            out.append(name)
    return sorted(out)


def _from_dict(cls: type, raw: Any, source: str | None) -> Any:
    try:
        obj = _build(cls, raw, "")
        obj.validate()
    except CacheSchemaError as e:
        raise CacheSchemaError(f"{source}: {e}" if source else str(e)) from None
    return obj


def _build(cls: type, raw: Any, where: str) -> Any:
    """Dataclass `cls` from JSON data: every field present, nothing else, each of its type."""
    if not isinstance(raw, dict):
        raise CacheSchemaError(f"{where or cls.__name__}: expected an object, got {type(raw).__name__}")
    prefix = f"{where}." if where else ""
    names = [f.name for f in dataclasses.fields(cls)]
    for name in names:
        if name not in raw:
            raise CacheSchemaError(f"missing key {prefix}{name}")
    for name in raw:
        if name not in names:
            raise CacheSchemaError(f"unknown key {prefix}{name} (known: {', '.join(names)})")
    hints = get_type_hints(cls)
    return cls(**{name: _parse(hints[name], raw[name], prefix + name) for name in names})


def _check_types(obj: Any) -> None:
    """The type check of `from_dict`, for objects built in code (validate() runs it)."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        _parse(hints[f.name], getattr(obj, f.name), f.name)


def _parse(tp: Any, value: Any, where: str) -> Any:
    """`value` as type `tp` (lists become tuples where the field is a tuple), or raise."""
    origin = get_origin(tp)
    if tp is Any:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise CacheSchemaError(f"{where}: not plain JSON data") from None
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise CacheSchemaError(f"{where}: must not be null")
        (inner,) = [a for a in args if a is not type(None)]
        return _parse(inner, value, where)
    if origin is Literal:
        allowed = get_args(tp)
        if not isinstance(value, str) or value not in allowed:
            raise CacheSchemaError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise CacheSchemaError(f"{where}: expected a list, got {value!r}")
        item = get_args(tp)[0]
        items = [_parse(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise CacheSchemaError(f"{where}: expected an object, got {value!r}")
        _, val_tp = get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CacheSchemaError(f"{where}: key {k!r} is not a string")
            out[k] = _parse(val_tp, v, f"{where}.{k}")
        return out
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CacheSchemaError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CacheSchemaError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise CacheSchemaError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise CacheSchemaError(f"{where}: expected true or false, got {value!r}")
        return value
    raise TypeError(f"{where}: no parser for type {tp!r}")  # a schema bug, not bad data
