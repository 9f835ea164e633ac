"""Quantisers for the cached teacher signals, one per CodecSpec value: numpy for the cache
writer and reader, and exact torch counterparts for the training step's device.

    codec = get_codec("uint8")
    parts = codec.encode(x)              # {"values": uint8 array, "scale": float32 array}
    y = codec.decode(parts, length=x.shape[-1])   # float32, same shape as x
    error_stats(x, y)                    # {"max": ..., "mean": ...} absolute error

A "row" is the last axis: one attention row over the N_v vision keys, or one vision token's D
features. Scaled codecs keep one scale per row (float32; uint4b's rounded to bfloat16), so the
error bound of every element depends only on its own row:

    uint8   (attention, x >= 0)  scale = max(row) / 255   q = round(x / scale) in 0..255    |x - q*scale| <= scale/2
    uint4   (attention, x >= 0)  scale = max(row) / 15    q = round(x / scale) in 0..15     |x - q*scale| <= scale/2
    uint4b  (attention, x >= 0)  scale = bf16(max(row) / 15), then as uint4                 |x - q*scale| <= scale/2
    int8    (features)           scale = max|row| / 127   q = round(x / scale) in -127..127 |x - q*scale| <= scale/2
    int8l44 (features)           scale = max|row| / 44    q = round(x / scale) in -44..44   |x - q*scale| <= scale/2
    int4    (features)           scale = max|row| / 7     q = round(x / scale) in -7..7     |x - q*scale| <= scale/2
    fp16 / fp32                  plain casts (fp32 is exact)

uint4b is uint4 with its row scales rounded to the nearest bfloat16 (ties to even) and stored
as those 16 bits (a uint16 scale array): half the scale bytes, which at the paper's 144-key
rows are 5% of the attention. bf16 keeps float32's range, so rows whose vision mass is tiny
(fp16's subnormals) keep their scale; its 8-bit mantissa moves a row's scale by at most 0.2%,
a tenth of uint4's own rounding step. The values are quantised with the rounded scale, so the
bound above holds for the stored scale. `encode` and `decode` (and the torch twins) carry
scales as float32 either way; `stored_scale` / `loaded_scale` turn them into the scale array's
stored dtype and back (the writer and reader call them). int8l44 stores int8 bytes holding 89 codes: its step
is 127/44 = 2.9 times int8's, and zstd, not the container, takes out the unused bits (its
codes compress to about 0.68 of int8's bytes on the demo, int8's to 0.90). Why 44 and not
another count: docs/codecs.md (the smallest cache whose every Align-KD gradient stays at
cosine >= 0.99 on the demo).

`round` is numpy's round-half-to-even; the decoded value is q * scale in float32 (so the bounds
hold up to float32 rounding, about 1e-7 relative). A row of zeros has scale 0 and decodes to
exact zeros (no division by zero). The 4-bit codecs pack two values per byte: element 2j in the
low nibble of byte j, element 2j+1 in the high nibble; int4 stores q + 8 (1..15); an odd row
pads one zero nibble, which is why `decode` needs the row length for them.

Input checks (ValueError): NaN anywhere; +-inf in a quantised signal; negative attention for the
unsigned codecs; a finite value that fp16 cannot hold (it would silently become inf). -inf passes
through the float casts (a tail log-mass is -inf when the top k hold all the mass).

Dequantising on the student's device (issue 16, item 3: the cast and scale were the largest
cost of a cache read). The reader can hand back a scaled codec's parts as stored, a
`Quantised` (codes + row scales + the row length); collate pads and stacks those, the batch
moves to the device as uint8 / int8, and `dequantise` turns each array into float32 there in
one op, with the same bits as `Codec.decode` (one float32 multiply of the same two operands):

    q = Quantised("uint8", values, scale, length)   # numpy (a record) or torch (a batch)
    x = dequantise(q.to("cuda"))                    # torch float32, equal to codec.decode(...)

`zero_code(name)` is the stored byte that decodes to 0 (int4 stores q + 8), what padding holds.

Quantising on the teacher's device (issue 16, item 1): `quantise(name, x)` is the torch
counterpart of `Codec.encode` for the scaled codecs, the same codes and scales bit for bit
(the same float32 max, division and round-half-to-even), so the extraction worker can copy
uint8 / int8 codes to the host instead of float32 blocks; `quantised_error` gives the codec
error the writer records for it (max exact; the sum in float64, in torch's order, so the
shard's mean error agrees with the numpy path's to float64 rounding, not bit for bit).

The layout (which arrays hold "values" and "scale", their dtypes) is in alignkd.cache_schemas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Codec", "CODECS", "Quantised", "get_codec", "error_stats", "stored_bytes", "dequantise", "quantise",
           "quantised_error", "zero_code", "float_to_bf16", "bf16_to_float"]

Parts = dict[str, np.ndarray]


@dataclass(frozen=True)
class Codec:
    """One codec. `levels` is 0 for the float casts; `signed` picks the symmetric quantiser;
    `packed` stores two 4-bit values per byte; `bf16_scale` rounds each row scale to bfloat16
    (stored as its 16 bits) before the values are quantised with it."""

    name: str
    dtype: str  # of the stored "values"
    levels: int = 0
    signed: bool = False
    packed: bool = False
    bf16_scale: bool = False  # row scales rounded to bfloat16 and stored as its 16 bits (uint16)

    @property
    def lossy(self) -> bool:
        return self.name != "fp32"

    @property
    def scaled(self) -> bool:
        return self.levels > 0

    def encode(self, x: np.ndarray) -> Parts:
        """float array -> {"values"} (float casts) or {"values", "scale"} (quantisers);
        scale has x's shape without the last axis."""
        x = np.asarray(x, dtype=np.float32)
        if np.isnan(x).any():
            raise ValueError(f"{self.name}: input has NaN")
        if not self.scaled:
            with np.errstate(over="ignore"):  # overflow is reported below, in one line
                values = x.astype(self.dtype)
            if np.isinf(values).sum() != np.isinf(x).sum():
                raise ValueError(f"{self.name}: input has finite values beyond the {self.dtype} range")
            return {"values": values}
        if not np.isfinite(x).all():
            raise ValueError(f"{self.name}: input has inf")
        if not self.signed and x.size and x.min() < 0:
            raise ValueError(f"{self.name}: input has negative values ({x.min():g}); this codec is for probabilities")
        # Row max (unsigned) or absmax (signed); an empty row has nothing to scale.
        if x.shape[-1] == 0:
            top = np.zeros(x.shape[:-1], dtype=np.float32)
        else:
            top = np.abs(x).max(axis=-1) if self.signed else x.max(axis=-1)
        scale = (top / np.float32(self.levels)).astype(np.float32)
        if self.bf16_scale:
            scale = bf16_to_float(float_to_bf16(scale))
        # Zero rows: divide by 1 instead of 0; their q is 0 and they decode to exact zeros.
        safe = np.where(scale > 0, scale, np.float32(1))
        lo = -self.levels if self.signed else 0
        q = np.clip(np.rint(x / safe[..., None]), lo, self.levels)
        if self.packed:
            nibbles = (q + 8 if self.signed else q).astype(np.uint8)
            return {"values": _pack4(nibbles), "scale": scale}
        return {"values": q.astype(self.dtype), "scale": scale}

    def decode(self, parts: Parts, length: int | None = None) -> np.ndarray:
        """Stored parts -> float32 array. `length` (the original last-axis size) is required for
        the packed codecs, which cannot tell an odd row from its padding; others check it."""
        values = np.asarray(parts["values"])
        if self.packed:
            if length is None:
                raise ValueError(f"{self.name}: decode needs the row length (4-bit rows may be padded)")
            if values.shape[-1] != (length + 1) // 2:
                raise ValueError(f"{self.name}: {values.shape[-1]} bytes per row cannot hold {length} values")
            q = _unpack4(values, length).astype(np.float32)
            if self.signed:
                q -= 8
        else:
            if length is not None and values.shape[-1] != length:
                raise ValueError(f"{self.name}: rows have {values.shape[-1]} values, expected {length}")
            if not self.scaled:
                return values.astype(np.float32)
            q = values  # cast and scaled in one pass below (a cache read's largest cost)
        scale = np.asarray(parts["scale"], dtype=np.float32)
        if scale.shape != q.shape[:-1]:
            raise ValueError(f"{self.name}: scale shape {scale.shape} does not match values {q.shape}")
        return np.multiply(q, scale[..., None], dtype=np.float32)

    def stored_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes the encoded parts of an array of `shape` take, before lossless compression."""
        rows = math.prod(shape[:-1])
        width = (shape[-1] + 1) // 2 if self.packed else shape[-1]
        values = rows * width * np.dtype(self.dtype).itemsize
        return values + ((2 if self.bf16_scale else 4) * rows if self.scaled else 0)

    def stored_scale(self, scale: np.ndarray) -> np.ndarray:
        """float32 row scales (as `encode` gives them) -> the scale array as stored."""
        scale = np.asarray(scale, dtype=np.float32)
        return float_to_bf16(scale) if self.bf16_scale else scale

    def loaded_scale(self, stored: np.ndarray) -> np.ndarray:
        """The scale array as stored -> float32 row scales, as `decode` takes them."""
        return bf16_to_float(stored) if self.bf16_scale else np.asarray(stored, dtype=np.float32)


CODECS: dict[str, Codec] = {
    "fp32": Codec("fp32", "float32"),
    "fp16": Codec("fp16", "float16"),
    "uint8": Codec("uint8", "uint8", levels=255),
    "uint4": Codec("uint4", "uint8", levels=15, packed=True),
    "uint4b": Codec("uint4b", "uint8", levels=15, packed=True, bf16_scale=True),
    "int8": Codec("int8", "int8", levels=127, signed=True),
    "int4": Codec("int4", "uint8", levels=7, signed=True, packed=True),
    "int8l44": Codec("int8l44", "int8", levels=44, signed=True),
}
"""By CodecSpec value. Names are unique across signals, so one table serves all of them."""


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r} (known: {', '.join(CODECS)})") from None


def stored_bytes(codec: str, shape: tuple[int, ...]) -> int:
    """Bytes that `codec` stores for an array of `shape` (rows on the last axis), uncompressed."""
    return get_codec(codec).stored_bytes(tuple(shape))


def error_stats(x: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """{"max", "mean"} of |x - decoded| over all elements (0.0 for an empty array). Elements
    equal on both sides count as 0 error, so matching infinities (-inf tails) are fine."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(decoded, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"error_stats: shapes {a.shape} and {b.shape} differ")
    if a.size == 0:
        return {"max": 0.0, "mean": 0.0}
    with np.errstate(invalid="ignore"):
        err = np.abs(a - b)
        undefined = np.isnan(err)  # inf - inf (or a NaN): 0 where both sides are the same infinity
        if undefined.any():
            err[undefined & (a == b)] = 0.0
    return {"max": float(err.max()), "mean": float(err.mean())}


def float_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 (finite) -> the upper 16 bits of the nearest bfloat16, ties to even, as uint16."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def bf16_to_float(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _pack4(nibbles: np.ndarray) -> np.ndarray:
    """(..., n) values 0..15 -> (..., ceil(n/2)) bytes, element 2j low nibble, 2j+1 high."""
    if nibbles.shape[-1] % 2:
        pad = np.zeros((*nibbles.shape[:-1], 1), dtype=np.uint8)
        nibbles = np.concatenate([nibbles, pad], axis=-1)
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)


def _unpack4(packed: np.ndarray, length: int) -> np.ndarray:
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :length]


# ---------------------------------------------------------------------------- on the device


@dataclass(frozen=True)
class Quantised:
    """One array as a scaled codec stores it, not yet dequantised: `values` (..., P) codes (P
    bytes per row for the 4-bit codecs, else the row itself), `scale` (...) float32 per row,
    `length` the row length of the float array it stands for. Arrays are numpy (a cache
    record) or torch (a collated batch); `shape` is the decoded array's."""

    codec: str
    values: Any
    scale: Any
    length: int
    error: tuple[float, float] | None = None  # (max, sum) of |x - decoded| over x, where x was known

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.values.shape[:-1], self.length)

    def to(self, device: Any) -> Quantised:
        """The torch payload moved as stored (codes stay uint8 / int8)."""
        return Quantised(self.codec, self.values.to(device), self.scale.to(device), self.length, self.error)

    def numpy(self) -> Quantised:
        """A torch payload copied to the host as numpy arrays (the codes, not floats)."""
        return Quantised(self.codec, self.values.cpu().numpy(), self.scale.cpu().numpy(), self.length, self.error)


def zero_code(name: str) -> int:
    """The stored byte that decodes to 0 (int4 keeps q + 8 in both nibbles; the others 0)."""
    codec = get_codec(name)
    return 0x88 if codec.packed and codec.signed else 0


def dequantise(q: Quantised):
    """The torch counterpart of `Codec.decode` for torch payloads: float32 on q's device, bit
    for bit what the numpy decode gives (the same float32 product q * scale)."""
    import torch

    codec = get_codec(q.codec)
    if not codec.scaled:
        raise ValueError(f"{codec.name}: not a scaled codec, nothing to dequantise")
    values, scale = q.values, q.scale.to(torch.float32)
    if codec.packed:
        if values.shape[-1] != (q.length + 1) // 2:
            raise ValueError(f"{codec.name}: {values.shape[-1]} bytes per row cannot hold {q.length} values")
        codes = torch.stack([values & 0x0F, values >> 4], dim=-1).flatten(-2)[..., : q.length]
        if codec.signed:
            codes = codes.to(torch.int16) - 8
    else:
        if values.shape[-1] != q.length:
            raise ValueError(f"{codec.name}: rows have {values.shape[-1]} values, expected {q.length}")
        codes = values
    if tuple(scale.shape) != tuple(codes.shape[:-1]):
        raise ValueError(f"{codec.name}: scale shape {tuple(scale.shape)} does not match values {tuple(codes.shape)}")
    # Integer codes times a float32 scale promote to float32: one cast-and-multiply kernel.
    return torch.mul(codes, scale.unsqueeze(-1))


def quantise(name: str, x) -> Quantised:
    """The torch counterpart of `Codec.encode` for a scaled codec: a torch payload on x's
    device whose codes and scales equal the numpy encoder's for the same float32 values; the
    same ValueErrors (NaN, inf, negative attention)."""
    import torch

    codec = get_codec(name)
    if not codec.scaled:
        raise ValueError(f"{codec.name}: not a scaled codec, nothing to quantise")
    x = x.to(torch.float32)
    if bool(torch.isnan(x).any()):
        raise ValueError(f"{codec.name}: input has NaN")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{codec.name}: input has inf")
    if not codec.signed and x.numel() and bool((x < 0).any()):
        raise ValueError(f"{codec.name}: input has negative values ({float(x.min()):g}); this codec is for probabilities")
    if x.shape[-1] == 0 or x.numel() == 0:
        top = torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
    else:
        top = x.abs().amax(dim=-1) if codec.signed else x.amax(dim=-1)
    # A true float32 division, as numpy's top / float32(levels): a divisor tensor, not a Python
    # number (CUDA turns division by a host scalar into a multiplication by its reciprocal).
    scale = top / torch.full_like(top, codec.levels)
    if codec.bf16_scale:
        scale = _bf16_round_torch(scale)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    lo = -codec.levels if codec.signed else 0
    q = torch.round(x / safe.unsqueeze(-1)).clamp(lo, codec.levels)  # round: half to even, as np.rint
    if codec.packed:
        nibbles = (q + 8 if codec.signed else q).to(torch.uint8)
        if nibbles.shape[-1] % 2:
            nibbles = torch.nn.functional.pad(nibbles, (0, 1))
        values = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    else:
        values = q.to(getattr(torch, codec.dtype))
    return Quantised(name, values, scale, x.shape[-1])


def quantised_error(x, q: Quantised) -> tuple[float, float]:
    """(max, sum) of |x - dequantise(q)| over x's elements, in float64 (0.0, 0.0 when empty):
    what `Codec.encode` + `error_stats` give the writer, from a device payload."""
    import torch

    if x.numel() == 0:
        return 0.0, 0.0
    err = (x.to(torch.float64) - dequantise(q).to(torch.float64)).abs()
    return float(err.max()), float(err.sum())


def _bf16_round_torch(x):
    """float32 scales (>= 0, finite) -> the float32 value of their nearest bfloat16, ties to
    even: `float_to_bf16` then `bf16_to_float`, in integer ops on the bits (the same on every
    device; non-negative, so the int32 view has no sign to carry)."""
    import torch

    bits = x.contiguous().view(torch.int32).to(torch.int64)
    top = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return (top << 16).to(torch.int32).view(torch.float32)
