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
                                (Lq, N_v) when the job caches the head mean only
    vision_features    (N_v, D_T) float32, the teacher's projector output P^T
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["SampleSignals", "vision_grid"]


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
