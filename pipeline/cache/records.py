"""One sample's teacher signals, as the extraction stage hands them to the cache writer and
the cache reader hands them back (dequantised). Shapes per sample:

    key                str      the webdataset __key__
    fingerprint        str      sha256 hex of the image bytes and the conversation JSON
    input_ids          (T,)     int32, IMAGE_TOKEN (-200) at the vision positions
    response_positions (R,)     int32, positions t whose token is a response token; the
                                teacher distribution for it is the one predicted at t - 1
    vision_start       int      first vision position (-1: no image)
    vision_length      int      N_v, this sample's vision tokens (0: no image); the same for
                                every image of a fixed-grid family, per image for dynamic ones
    attention          {layer: (H, Lq, N_v) or (Lq, N_v)} float32, text-query x vision-key
                                block of that layer; rows are positions vision_end .. T-1;
                                (Lq, N_v) when the job caches the head mean only; as
                                read from a "recompute" cache: {} (alignkd.recompute rebuilds it)
    vision_features    (N_v, D_T) float32, the teacher's projector output P^T ((0, D_T) as read
                                from a "recompute" cache, and focus (0,))
    focus              (N_v,)   float32, sum over text queries of the head-mean layer-0 attention
    topk_ids           (R, k)   int32, the teacher's k most likely next tokens at each R position
    topk_logprobs      (R, k)   float32, their log-probs (temperature 1), descending
    tail_logmass       (R,)     float32, log of the probability mass outside the top k
    vision_grid        (rows, columns) of the N_v tokens as the model lays them out, or None:
                                square when N_v is a square number, else one row (the reader
                                always fills it)

A text-only sample's vision arrays are empty: vision_features (0, D_T), focus (0,), and its
attention blocks have no rows (the writer also takes the zero-filled (N_v, ...) arrays that
fixed-grid producers give it).

An attention block or vision_features may instead be an `alignkd.cache.codecs.Quantised`
of those shapes: codes and row scales made on the teacher's device with the cache's codec
(extraction on a GPU), or as stored (`CacheReader.get(key, dequantise=False)`); their values
were checked where they were quantised, so only their shapes are checked here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alignkd.cache.codecs import Quantised
from alignkd.cache_schemas import IMAGE_TOKEN, CacheMeta, CacheSchemaError

_INT32 = np.iinfo(np.int32)

__all__ = ["SampleSignals", "vision_grid", "check_samples"]


@dataclass
class SampleSignals:
    key: str
    fingerprint: str
    input_ids: np.ndarray
    response_positions: np.ndarray
    vision_start: int
    vision_length: int
    attention: dict[int, np.ndarray]
    vision_features: np.ndarray
    focus: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logmass: np.ndarray
    vision_grid: tuple[int, int] | None = None


def vision_grid(s: SampleSignals) -> tuple[int, int]:
    """The sample's vision-token grid (rows, columns): its own when the model gave one, else
    square when N_v is a square number (MobileVLM's and LLaVA's), else one row; (0, 0) without image."""
    if s.vision_length == 0:
        return (0, 0)
    if s.vision_grid is not None:
        return (int(s.vision_grid[0]), int(s.vision_grid[1]))
    side = math.isqrt(int(s.vision_length))
    return (side, side) if side * side == s.vision_length else (1, int(s.vision_length))


def check_samples(
    samples: Sequence[SampleSignals], skipped: list[tuple[str, str]], meta: CacheMeta, where: str
) -> None:
    seen: set[str] = set()
    for s in samples:
        if not isinstance(s, SampleSignals):
            raise CacheSchemaError(f"{where}: expected SampleSignals, got {type(s).__name__}")
        if not isinstance(s.key, str) or not s.key:
            raise CacheSchemaError(f"{where}: sample key {s.key!r} is not a non-empty string")
        if s.key in seen:
            raise CacheSchemaError(f"{where}: sample {s.key} appears twice")
        seen.add(s.key)
        try:
            _check_sample(s, meta)
        except CacheSchemaError as e:
            raise CacheSchemaError(f"{where}: sample {s.key}: {e}") from None
    for key, _ in skipped:
        if key in seen:
            raise CacheSchemaError(f"{where}: sample {key} is both written and skipped")


def _check_sample(s: SampleSignals, meta: CacheMeta) -> None:
    """One sample against the cache's shapes (see alignkd.cache.records for their meaning)."""
    d, h, k = meta.teacher.hidden_size, meta.teacher.num_heads, meta.topk
    if not isinstance(s.fingerprint, str) or len(s.fingerprint) != 64 or set(s.fingerprint) - set("0123456789abcdef"):
        raise CacheSchemaError(f"fingerprint {s.fingerprint!r} is not a sha256 hex digest")

    ids = _ints(s.input_ids, "input_ids", ndim=1)
    t = len(ids)
    if t == 0:
        raise CacheSchemaError("input_ids is empty")
    if t > meta.max_length:
        raise CacheSchemaError(f"{t} tokens, more than the cache's max_length {meta.max_length}")
    vs, nv = s.vision_start, s.vision_length
    if not (isinstance(vs, int | np.integer) and isinstance(nv, int | np.integer)):
        raise CacheSchemaError("vision_start and vision_length must be integers")
    text = ids
    if vs == -1:
        if nv != 0:
            raise CacheSchemaError(f"text-only sample (vision_start -1) has vision_length {nv}, expected 0")
        lq = 0
    else:
        if meta.num_vision_tokens is not None and nv != meta.num_vision_tokens:
            raise CacheSchemaError(f"vision_length {nv}, the cache has {meta.num_vision_tokens} vision tokens")
        if nv < 1:
            raise CacheSchemaError(f"vision_length {nv}: an image sample needs at least one vision token")
        if not 0 <= vs <= t - nv:
            raise CacheSchemaError(f"vision span {vs}..{vs + nv} is outside the {t} tokens")
        if not (ids[vs:vs + nv] == IMAGE_TOKEN).all():
            raise CacheSchemaError(f"input_ids[{vs}:{vs + nv}] are not all IMAGE_TOKEN ({IMAGE_TOKEN})")
        text = np.concatenate([ids[:vs], ids[vs + nv:]])
        lq = t - (vs + nv)  # rows are the positions after the vision block
        grid = vision_grid(s)
        if grid[0] * grid[1] != nv or min(grid) < 1:
            raise CacheSchemaError(f"vision_grid {grid} does not hold its {nv} vision tokens")
    vocab = meta.teacher.vocab_size
    if text.size and (text.min() < 0 or text.max() >= vocab):
        raise CacheSchemaError(f"input_ids outside the vocabulary 0..{vocab - 1} (IMAGE_TOKEN only in the vision span)")

    resp = _ints(s.response_positions, "response_positions", ndim=1)
    r = len(resp)
    if r and (resp.min() < 1 or resp.max() >= t or (np.diff(resp) <= 0).any()):
        raise CacheSchemaError(f"response_positions must be increasing and within 1..{t - 1}")
    topk_ids = _ints(s.topk_ids, "topk_ids", shape=(r, k))
    if topk_ids.size and (topk_ids.min() < 0 or topk_ids.max() >= vocab):
        raise CacheSchemaError(f"topk_ids outside the vocabulary 0..{vocab - 1}")
    _floats(s.topk_logprobs, "topk_logprobs", (r, k), allow_neg_inf=True)
    _floats(s.tail_logmass, "tail_logmass", (r,), allow_neg_inf=True)

    if not isinstance(s.attention, dict) or sorted(s.attention) != sorted(meta.layers):
        got = sorted(s.attention) if isinstance(s.attention, dict) else type(s.attention).__name__
        raise CacheSchemaError(f"attention has layers {got}, the cache stores layers {list(meta.layers)}")
    for layer in meta.layers:
        shape = (h, lq, nv) if meta.attention_heads == "per_head" else (lq, nv)
        # A sample without image has no rows; producers may pad its empty block to any width.
        a = _floats(s.attention[layer], f"attention[{layer}]", shape, any_width=lq == 0)
        if a is not None and a.size and a.min() < 0:
            raise CacheSchemaError(f"attention[{layer}] has negative probabilities")

    feats = _floats(s.vision_features, "vision_features", (nv, d), any_rows=vs == -1)
    focus = _floats(s.focus, "focus", (nv,), any_rows=vs == -1)
    if vs == -1 and ((feats is None or feats.any()) or focus.any()):
        raise CacheSchemaError("text-only sample has non-zero vision_features or focus")


def _ints(a: object, name: str, ndim: int | None = None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise CacheSchemaError(f"{name} has dtype {a.dtype}, expected integers")
    if shape is not None and a.shape != shape:
        raise CacheSchemaError(f"{name} has shape {a.shape}, expected {shape}")
    if ndim is not None and a.ndim != ndim:
        raise CacheSchemaError(f"{name} has {a.ndim} dimensions, expected {ndim}")
    if a.size and (a.min() < _INT32.min or a.max() > _INT32.max):
        raise CacheSchemaError(f"{name} has values outside int32")
    return a


def _floats(a: object, name: str, shape: tuple[int, ...], allow_neg_inf: bool = False, *,
            any_width: bool = False, any_rows: bool = False) -> np.ndarray | None:
    """`any_width`: the last axis may have any length (an empty block); `any_rows`: the first
    may (a text-only sample's vision arrays, which are not stored). A Quantised array: its
    shape only, and None back (its values were checked when it was quantised)."""
    quantised = isinstance(a, Quantised)
    if not quantised:
        a = np.asarray(a)
        if a.dtype.kind != "f":
            raise CacheSchemaError(f"{name} has dtype {a.dtype}, expected floats")
    fits = len(a.shape) == len(shape) and all(
        got == want or (any_width and i == len(shape) - 1) or (any_rows and i == 0)
        for i, (got, want) in enumerate(zip(a.shape, shape)))
    if not fits:
        raise CacheSchemaError(f"{name} has shape {a.shape}, expected {shape}")
    if quantised:
        return None
    bad = np.isnan(a) | (np.isinf(a) & ~(allow_neg_inf & (a < 0)))
    if bad.any():
        raise CacheSchemaError(f"{name} has {'NaN or +inf' if allow_neg_inf else 'NaN or inf'} values")
    return a
