"""bench/cached_vs_online.py's online mode computes, per batch, the teacher signals the cache
holds: its step is the cached step with the cache read replaced by the teacher's forward, and
nothing else (a stale copy there would time a different step)."""

import importlib
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def test_the_online_signals_are_the_cached_ones_batch_for_batch(tiny_models, tiny_cache, demo_data):
    from alignkd.cache.reader import CacheReader
    from alignkd.data.distill import DistillDataset, StudentProcessor
    from alignkd.models import load_vlm
    from alignkd.train import LossArgs, build_adapters, compute_losses

    sys.path.insert(0, str(REPO / "bench"))
    try:
        bench = importlib.import_module("cached_vs_online")
    finally:
        sys.path.remove(str(REPO / "bench"))
    cache = CacheReader(tiny_cache)
    teacher, student = load_vlm(tiny_models["mobilevlm"]["teacher"]), load_vlm(tiny_models["mobilevlm"]["student"])
    dataset = DistillDataset(shards=str(demo_data / "train"), cache=cache, processor=StudentProcessor.of(student),
                             template="v1", max_length=256)
    batch, cached = dataset.collate([dataset[i] for i in range(6)])
    cached = cached.dequantised()
    online = bench.online_signals(teacher, batch, cache.meta.topk)
    for field in ("query_mask", "image_mask", "vision_mask", "topk_ids"):
        assert torch.equal(getattr(online, field), getattr(cached, field)), field
    for field in ("vision_features", "focus", "topk_logprobs", "tail_logmass"):
        torch.testing.assert_close(getattr(online, field), getattr(cached, field), rtol=1e-5, atol=1e-6, msg=field)
    torch.testing.assert_close(online.attention[0], cached.attention[0], rtol=1e-5, atol=1e-6)
    loss = LossArgs(focus_k=4)
    adapters = build_adapters(student, cache.meta, loss)
    with torch.no_grad():
        got, want = (compute_losses(student, adapters, batch, t, loss)["total"] for t in (online, cached))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
