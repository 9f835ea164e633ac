"""Version 1 of the teacher-signal cache layout: read, no longer written (v3.py is current).

A version-1 cache reads through the migration registry (migrations.py): its root metadata
becomes version 3 with `shard_layout: 1`, and its shards keep the arrays below, which the
reader decodes to the same per-sample records as version 2's. Writing into one is refused
(the shard layouts differ). What follows is the layout as it was written.

The cache is a directory tree of Zarr v3 groups and arrays, readable by any Zarr v3 client.
Metadata is JSON (Zarr attributes); signals are plain numeric arrays. Nothing is pickled.

    {cache}/                        zarr group; attributes = CacheMeta.to_dict()
      zarr.json
      shards/                       zarr group, no attributes
        .{name}.tmp-{hex}/          a shard being written, or left by a crash: never read,
                                    `remove_partial` deletes it (names starting with "." are
                                    not shards; generic Zarr clients should skip them)
        {name}/                     one complete shard; attributes = ShardMeta.to_dict(), whose
                                    `files` lists every file below (size and sha256) except
                                    this zarr.json itself
          ids_offsets          (N+1,)          int64    sample i's tokens: input_ids[ids_offsets[i]:ids_offsets[i+1]]
          input_ids            (T,)            int32    IMAGE_TOKEN (-200) at vision positions
          resp_offsets         (N+1,)          int64    sample i's response rows: [resp_offsets[i]:resp_offsets[i+1]]
          response_positions   (R,)            int32    position t in the sample (the teacher predicted it at t - 1)
          topk_ids             (R, k)          int32
          topk_logprobs        (R, k)          codecs.logprobs: float16 | float32
          tail_logmass         (R,)            codecs.logprobs: float16 | float32 (-inf allowed)
          rows_offsets         (N+1,)          int64    sample i's attention rows: [rows_offsets[i]:rows_offsets[i+1]]
          attn_L{layer:02d}    (L, H, P_v)     per_head, one array per cached layer, rows = text queries
                               (L, P_v)        mean (heads averaged)
                                               codecs.attention: float32 | float16 | uint8 | uint4 (uint8 holding two)
          attn_L{layer:02d}_scale (L, H) | (L,) float32, only for uint8 / uint4: value = q * scale
          vision_start         (N,)            int32    -1 for a text-only sample
          vision_length        (N,)            int32    N_v, or 0 for a text-only sample
          vision_features      (N, N_v, P_d)   codecs.features: float32 | float16 | int8 | int4 (uint8 holding two)
          vision_features_scale (N, N_v)       float32, only for int8 / int4
          focus                (N, N_v)        float32  (never quantised: N_v floats per sample)

    N = samples in the shard; T, R, L = the sums over its samples of tokens, response positions
    and attention rows (Lq = T - vision_start - N_v for an image sample, 0 for a text-only one);
    k = CacheMeta.topk; H = teacher.num_heads; N_v = num_vision_tokens; D = teacher.hidden_size;
    P_v = N_v and P_d = D, except for the 4-bit codecs, which pack two values per byte:
    P = ceil(N_v / 2) or ceil(D / 2).

Per-sample attention (H, Lq, N_v) is stored as rows (Lq, H, N_v) so that samples concatenate
along axis 0; the reader transposes it back. Text-only samples have Lq = 0 and all-zero
vision_features and focus. Every array of a shard is listed, with dtype and shape, by
`shard_arrays(meta)`; the writer creates exactly these and the reader checks them.

The rules for URLs, integrity, codecs and sameness are version 3's (v3.py).
"""

from __future__ import annotations

from typing import Any

from alignkd.cache_schemas.common import CODEC_STORAGE, ArraySpec, _coded, attention_array

__all__ = ["shard_arrays"]


def shard_arrays(meta: Any) -> dict[str, ArraySpec]:
    """Every array of a version-1 shard made under `meta` (a CacheMeta), by name, in the order
    the version-1 writer wrote them."""
    nv, d, h, k = meta.num_vision_tokens, meta.teacher.hidden_size, meta.teacher.num_heads, meta.topk
    c = meta.codecs
    rows = ("L", h) if meta.attention_heads == "per_head" else ("L",)
    specs = [
        ArraySpec("ids_offsets", "int64", ("N+1",), signal="index"),
        ArraySpec("input_ids", "int32", ("T",), signal="input_ids", offsets="ids_offsets"),
        ArraySpec("resp_offsets", "int64", ("N+1",), signal="index"),
        ArraySpec("response_positions", "int32", ("R",), signal="response_positions", offsets="resp_offsets"),
        ArraySpec("topk_ids", "int32", ("R", k), signal="topk_ids", offsets="resp_offsets"),
        *_coded("topk_logprobs", ("R",), k, c.logprobs, "resp_offsets"),
        # tail_logmass is one value per row: its "row" is the whole (R,) array, so it is (R,)
        # rather than (R, 1); fp16/fp32 have no per-row state, so nothing else changes.
        ArraySpec("tail_logmass", CODEC_STORAGE[c.logprobs].dtype, ("R",), signal="tail_logmass",
                  codec=c.logprobs, offsets="resp_offsets"),
        ArraySpec("rows_offsets", "int64", ("N+1",), signal="index"),
    ]
    for layer in meta.layers:
        specs += _coded(attention_array(layer), rows, nv, c.attention, "rows_offsets")
    specs += [
        ArraySpec("vision_start", "int32", ("N",), signal="index"),
        ArraySpec("vision_length", "int32", ("N",), signal="index"),
        *_coded("vision_features", ("N", nv), d, c.features, None),
        ArraySpec("focus", "float32", ("N", nv), signal="focus", codec="fp32"),
    ]
    return {s.name: s for s in specs}
