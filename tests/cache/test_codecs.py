"""Codecs: error bounds from the formulas, bit layout against a naive packer, edge cases."""

from __future__ import annotations

import typing

import numpy as np
import pytest

from alignkd.cache.codecs import CODECS, error_stats, get_codec, stored_bytes
from alignkd.cache_schemas import CODEC_STORAGE, CodecSpec, packed_width

# ---------------------------------------------------------------------------- data


def attention_rows(rng: np.random.Generator, shape: tuple[int, ...], zero_rows: int = 2) -> np.ndarray:
    """Softmax rows over more keys than the last axis holds (as a text x vision block is: the
    row also attends to text keys), a few rows all zero (padding queries)."""
    logits = rng.standard_normal((*shape[:-1], shape[-1] + 7)) * 3
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p = (p / p.sum(axis=-1, keepdims=True))[..., : shape[-1]].astype(np.float32)
    flat = p.reshape(-1, shape[-1])
    flat[rng.choice(len(flat), size=min(zero_rows, len(flat)), replace=False)] = 0
    return p


def feature_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Heavy-tailed activations with per-token scales spanning three decades, one zero row."""
    x = rng.standard_t(df=3, size=shape) * 10.0 ** rng.uniform(-2, 1, size=(*shape[:-1], 1))
    x = x.astype(np.float32)
    x.reshape(-1, shape[-1])[0] = 0
    return x


# ---------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("name,levels", [("uint8", 255), ("uint4", 15)])
@pytest.mark.parametrize("width", [16, 17, 1])
def test_attention_quantisers_stay_within_half_a_step_of_each_row(name, levels, width):
    rng = np.random.default_rng(width)
    x = attention_rows(rng, (5, 3, width))
    codec = get_codec(name)
    y = codec.decode(codec.encode(x), length=width)
    assert y.dtype == np.float32 and y.shape == x.shape
    step = x.astype(np.float64).max(axis=-1, keepdims=True) / levels  # the formula, in float64
    err = np.abs(y.astype(np.float64) - x)
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7 * np.abs(x)).all()
    # Each row's largest value is a grid point: it comes back up to float rounding.
    np.testing.assert_allclose(y.max(axis=-1), x.max(axis=-1), rtol=1e-6)


@pytest.mark.parametrize("name,levels", [("int8", 127), ("int8l44", 44), ("int4", 7)])
@pytest.mark.parametrize("width", [24, 25])
def test_feature_quantisers_stay_within_half_a_step_of_each_token(name, levels, width):
    rng = np.random.default_rng(width)
    x = feature_rows(rng, (4, 6, width))
    codec = get_codec(name)
    parts = codec.encode(x)
    y = codec.decode(parts, length=width)
    step = np.abs(x.astype(np.float64)).max(axis=-1, keepdims=True) / levels
    err = np.abs(y.astype(np.float64) - x)
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7 * np.abs(x)).all()
    # Symmetric: a negated input decodes to the negated output.
    np.testing.assert_array_equal(codec.decode(codec.encode(-x), length=width), -y)


def test_int8_uses_the_full_symmetric_range():
    x = np.array([[-2.0, -0.5, 0.0, 1.2, 2.0]], dtype=np.float32)
    parts = get_codec("int8").encode(x)
    np.testing.assert_array_equal(parts["values"], [[-127, -32, 0, 76, 127]])  # -31.75, 76.2 rounded
    np.testing.assert_allclose(parts["scale"], [2 / 127])


def test_int8l44_maps_each_token_absmax_to_44_in_int8_bytes():
    x = np.array([[-2.0, -0.5, 0.0, 1.2, 2.0]], dtype=np.float32)
    parts = get_codec("int8l44").encode(x)
    assert parts["values"].dtype == np.int8
    np.testing.assert_array_equal(parts["values"], [[-44, -11, 0, 26, 44]])  # 26.4 rounded
    np.testing.assert_allclose(parts["scale"], [2 / 44])


def naive_bf16(x: float) -> np.float32:
    """The bfloat16 nearest to float32 x (ties to even), found by trying both neighbours in
    float64: the two bfloat16 values around x are its float32 bits with the low 16 cleared,
    and that plus one bfloat16 step."""
    bits = int(np.float32(x).view(np.uint32))
    lo, hi = (bits >> 16) << 16, ((bits >> 16) + 1) << 16
    below, above = (float(np.array(b, np.uint32).view(np.float32)) for b in (lo, hi))
    d_lo, d_hi = float(np.float32(x)) - below, above - float(np.float32(x))
    pick = lo if d_lo < d_hi or (d_lo == d_hi and not (lo >> 16) & 1) else hi
    return np.array(pick, np.uint32).view(np.float32)


def test_bf16_scales_are_the_nearest_bfloat16_ties_to_even():
    import torch

    from alignkd.cache.codecs import bf16_to_float, float_to_bf16

    rng = np.random.default_rng(4)
    x = (rng.uniform(0, 1, 300) * 10.0 ** rng.integers(-30, 5, 300)).astype(np.float32)
    ties = (np.arange(1, 6, dtype=np.uint32) * np.uint32(1 << 16) + np.uint32(0x3F800000 + 0x8000)).view(np.float32)
    x = np.concatenate([x, ties, [0.0, 1.0]]).astype(np.float32)
    bits = float_to_bf16(x)
    assert bits.dtype == np.uint16
    want = np.array([naive_bf16(v) for v in x], np.float32)
    np.testing.assert_array_equal(bf16_to_float(bits), want)
    np.testing.assert_array_equal(want, torch.from_numpy(x).to(torch.bfloat16).float().numpy())  # and torch's cast


def test_uint4b_quantises_each_row_with_its_bfloat16_rounded_scale():
    """Codes from a per-element loop with the scale rounded first; the stored scale array holds
    its 16 bits; every value within half of that (stored) step."""
    rng = np.random.default_rng(6)
    x = attention_rows(rng, (6, 3, 9))
    codec = get_codec("uint4b")
    parts = codec.encode(x)
    rows, got_rows = x.reshape(-1, 9), parts["values"].reshape(-1, 5)
    for r, row in enumerate(rows):
        scale = naive_bf16(np.float32(row.max()) / np.float32(15)) if row.max() > 0 else np.float32(0)
        assert parts["scale"].reshape(-1)[r] == scale
        q = [min(15, int(np.rint(v / scale))) if scale > 0 else 0 for v in row]
        np.testing.assert_array_equal(got_rows[r], naive_pack(np.array([q], np.uint8))[0])
    stored = codec.stored_scale(parts["scale"])
    assert stored.dtype == np.uint16 and stored.shape == parts["scale"].shape
    np.testing.assert_array_equal(codec.loaded_scale(stored), parts["scale"])
    y = codec.decode(parts, length=9)
    assert (np.abs(y.astype(np.float64) - x) <= parts["scale"][..., None].astype(np.float64) / 2 * (1 + 1e-6)).all()


def test_uint8_maps_each_row_max_to_255():
    x = np.array([[0.0, 0.2, 0.5], [0.1, 0.0, 0.02]], dtype=np.float32)
    parts = get_codec("uint8").encode(x)
    np.testing.assert_array_equal(parts["values"], [[0, 102, 255], [255, 0, 51]])


# ---------------------------------------------------------------------------- packing


def naive_pack(nibbles: np.ndarray) -> np.ndarray:
    """Reference packer, one byte at a time: element 2j low nibble, 2j+1 high nibble."""
    rows = nibbles.reshape(-1, nibbles.shape[-1])
    out = np.zeros((len(rows), (rows.shape[1] + 1) // 2), dtype=np.uint8)
    for r, row in enumerate(rows):
        for j, v in enumerate(row):
            out[r, j // 2] |= int(v) << (4 * (j % 2))
    return out.reshape(*nibbles.shape[:-1], -1)


@pytest.mark.parametrize("width", [7, 8])
def test_uint4_packs_two_values_per_byte_low_nibble_first(width):
    rng = np.random.default_rng(3)
    x = attention_rows(rng, (4, width), zero_rows=0)
    parts = get_codec("uint4").encode(x)
    q = np.rint(x / (x.max(axis=-1, keepdims=True) / 15)).astype(np.uint8)  # the formula
    assert parts["values"].shape == (4, (width + 1) // 2)
    np.testing.assert_array_equal(parts["values"], naive_pack(q))


def test_int4_stores_q_plus_8_in_each_nibble():
    x = np.array([[-7.0, 7.0, 0.0, -1.0, 3.0]], dtype=np.float32)  # absmax 7: q = x
    parts = get_codec("int4").encode(x)
    np.testing.assert_array_equal(parts["values"], naive_pack(np.array([[1, 15, 8, 7, 11]])))
    np.testing.assert_array_equal(get_codec("int4").decode(parts, length=5), x)


def test_packed_decode_needs_the_row_length():
    parts = get_codec("uint4").encode(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="row length"):
        get_codec("uint4").decode(parts)
    with pytest.raises(ValueError, match="cannot hold"):
        get_codec("uint4").decode(parts, length=7)


# ---------------------------------------------------------------------------- exact cases


@pytest.mark.parametrize("name", sorted(CODECS))
def test_zero_rows_decode_to_exact_zeros(name):
    x = np.zeros((3, 4, 9), np.float32)
    y = get_codec(name).decode(get_codec(name).encode(x), length=9)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x)
    assert not np.signbit(y).any()


@pytest.mark.parametrize("name", sorted(CODECS))
def test_empty_arrays_round_trip(name):
    for shape in [(0, 3, 9), (4, 0)]:
        x = np.zeros(shape, np.float32)
        assert get_codec(name).decode(get_codec(name).encode(x), length=shape[-1]).shape == shape


def test_fp32_is_exact_and_fp16_is_numpys_cast():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, 11)) * 100).astype(np.float32)
    x[0, 0] = -np.inf
    np.testing.assert_array_equal(get_codec("fp32").decode(get_codec("fp32").encode(x)), x)
    parts = get_codec("fp16").encode(x)
    assert parts["values"].dtype == np.float16
    np.testing.assert_array_equal(get_codec("fp16").decode(parts), x.astype(np.float16).astype(np.float32))


@pytest.mark.bad_input
def test_inputs_a_codec_cannot_represent_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        get_codec("fp16").encode(np.array([np.nan], np.float32))
    with pytest.raises(ValueError, match="float16 range"):
        get_codec("fp16").encode(np.array([70000.0], np.float32))
    with pytest.raises(ValueError, match="negative"):
        get_codec("uint8").encode(np.array([[0.5, -0.1]], np.float32))
    with pytest.raises(ValueError, match="inf"):
        get_codec("int8").encode(np.array([[1.0, np.inf]], np.float32))
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec("int3")


# ---------------------------------------------------------------------------- helpers


def test_error_stats_matches_a_plain_loop():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(50).astype(np.float32)
    y = (x + rng.standard_normal(50) * 1e-2).astype(np.float32)
    errs = [abs(float(a) - float(b)) for a, b in zip(x, y)]
    stats = error_stats(x, y)
    assert stats["max"] == pytest.approx(max(errs), rel=1e-12)
    assert stats["mean"] == pytest.approx(sum(errs) / len(errs), rel=1e-12)
    assert error_stats(np.zeros(0), np.zeros(0)) == {"max": 0.0, "mean": 0.0}
    assert error_stats(np.array([-np.inf, 1.0]), np.array([-np.inf, 1.5])) == {"max": 0.5, "mean": 0.25}


@pytest.mark.parametrize("name", sorted(CODECS))
def test_stored_bytes_is_the_size_of_the_encoded_parts(name):
    x = attention_rows(np.random.default_rng(2), (3, 2, 9))
    codec = get_codec(name)
    parts = codec.encode(x)
    scale = codec.stored_scale(parts["scale"]).nbytes if codec.scaled else 0
    assert stored_bytes(name, x.shape) == parts["values"].nbytes + scale


@pytest.mark.parametrize("name", sorted(CODECS))
def test_the_schema_describes_what_each_codec_stores(name):
    store = CODEC_STORAGE[name]
    parts = get_codec(name).encode(np.ones((2, 5), np.float32))
    assert parts["values"].dtype == np.dtype(store.dtype)
    assert ("scale" in parts) == store.scaled and parts.get("scale", np.zeros(0, np.float32)).dtype == np.float32
    if store.scaled:  # encode's scales are float32; the array holds them as the schema says
        assert get_codec(name).stored_scale(parts["scale"]).dtype == np.dtype(store.scale_dtype)
    assert (parts["values"].shape[-1] == 3) == store.packed
    assert get_codec(name).lossy == store.lossy


def test_every_codec_a_job_can_name_exists():
    hints = typing.get_type_hints(CodecSpec)
    for field in ("attention", "features", "logprobs"):
        for name in typing.get_args(hints[field]):
            assert name in CODECS and name in CODEC_STORAGE


# ---------------------------------------------------------------------------- torch, on the device


def _bits(a) -> np.ndarray:
    """float32 as its bit patterns: equal bits, so -0.0 and 0.0 differ."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)


@pytest.mark.parametrize("name", [n for n in sorted(CODECS) if CODECS[n].scaled])
@pytest.mark.parametrize("width", [1, 8, 9])
def test_dequantise_on_torch_gives_the_numpy_decode_bit_for_bit(name, width):
    import torch

    from alignkd.cache.codecs import Quantised, dequantise

    rng = np.random.default_rng(width)
    codec = get_codec(name)
    x = feature_rows(rng, (3, 5, width)) if codec.signed else attention_rows(rng, (3, 5, width))
    for data in (x, np.zeros((0, 4, width), np.float32)):
        parts = codec.encode(data)
        want = codec.decode(parts, length=width)
        got = dequantise(Quantised(name, torch.from_numpy(parts["values"]), torch.from_numpy(parts["scale"]), width))
        assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
        np.testing.assert_array_equal(_bits(got.numpy()), _bits(want))


@pytest.mark.parametrize("name", [n for n in sorted(CODECS) if CODECS[n].scaled])
def test_the_zero_code_dequantises_to_positive_zero(name):
    import torch

    from alignkd.cache.codecs import Quantised, dequantise, zero_code

    width = 5
    values = torch.full((2, packed_width(name, width)), zero_code(name), dtype=getattr(torch, get_codec(name).dtype))
    for scale in (torch.zeros(2), torch.tensor([0.5, 3.0])):
        got = dequantise(Quantised(name, values, scale, width)).numpy()
        np.testing.assert_array_equal(_bits(got), _bits(np.zeros((2, width))))


def test_dequantise_refuses_codes_that_do_not_fit_the_row_length_or_a_float_codec():
    import torch

    from alignkd.cache.codecs import Quantised, dequantise

    with pytest.raises(ValueError, match="cannot hold"):
        dequantise(Quantised("uint4", torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(2), 7))
    with pytest.raises(ValueError, match="expected 4"):
        dequantise(Quantised("uint8", torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(2), 4))
    with pytest.raises(ValueError, match="scale shape"):
        dequantise(Quantised("int8", torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3), 3))
    with pytest.raises(ValueError, match="not a scaled codec"):
        dequantise(Quantised("fp16", torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2), 3))


@pytest.mark.parametrize("name", [n for n in sorted(CODECS) if CODECS[n].scaled])
@pytest.mark.parametrize("width", [1, 8, 9])
def test_quantise_on_torch_gives_the_numpy_encoders_codes_and_scales_bit_for_bit(name, width):
    import torch

    from alignkd.cache.codecs import quantise, quantised_error

    rng = np.random.default_rng(100 + width)
    codec = get_codec(name)
    x = feature_rows(rng, (3, 5, width)) if codec.signed else attention_rows(rng, (3, 5, width))
    if width >= 3:  # a row whose step is exactly 1: 2.5 and 3.5 round half to even, to 2 and 4
        x.reshape(-1, width)[1] = 0
        x.reshape(-1, width)[1, :3] = [codec.levels, 2.5, 3.5]
    for data in (x, np.zeros((0, 4, width), np.float32), np.zeros((2, 0), np.float32)):
        want = codec.encode(data)
        got = quantise(name, torch.from_numpy(data))
        assert got.values.dtype == getattr(torch, codec.dtype) and got.length == data.shape[-1]
        np.testing.assert_array_equal(got.values.numpy(), want["values"])
        np.testing.assert_array_equal(got.scale.numpy().view(np.uint32), want["scale"].view(np.uint32))
        stats = error_stats(data, codec.decode(want, data.shape[-1]))
        top, total = quantised_error(torch.from_numpy(data), got)
        assert top == stats["max"] and total == pytest.approx(stats["mean"] * data.size, rel=1e-12, abs=0)


def test_quantise_on_torch_refuses_what_the_numpy_encoder_refuses():
    import torch

    from alignkd.cache.codecs import quantise

    for name, x, match in [("uint8", [[0.1, float("nan")]], "NaN"), ("int8", [[1.0, float("inf")]], "inf"),
                           ("uint4", [[0.1, -0.2]], "negative")]:
        with pytest.raises(ValueError, match=match):
            get_codec(name).encode(np.array(x, np.float32))
        with pytest.raises(ValueError, match=match):
            quantise(name, torch.tensor(x))
