"""bench/codec_gradients.py at tiny size: its gradient cosine is exactly 1 for signals that
went through a lossless rewrite of the cache, below 1 for quantised ones, and a term's
gradient from the shared forward is the gradient of that term trained alone."""

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        yield importlib.import_module("codec_gradients")
    finally:
        sys.path.remove(str(REPO / "bench"))


@pytest.fixture(scope="module")
def setting(bench, tiny_models, tiny_cache, demo_data):
    from alignkd.cache.reader import CacheReader
    from alignkd.config import load_job
    from alignkd.train import TrainArgs

    job = load_job(TrainArgs, REPO / "jobs" / "demo" / "student_alignkd.toml", [
        f"student.path={json.dumps(str(tiny_models['mobilevlm']['student']))}", f"cache={json.dumps(str(tiny_cache))}",
        f"data.shards={json.dumps(str(demo_data / 'train'))}", "data.max_length=256", "data.batch_size=8"])
    meta = CacheReader(tiny_cache).meta
    student, adapters, params = bench.load_student(job, meta)
    return job, meta, student, adapters, params


def _gradients(bench, setting, cache, demo_data):
    job, _, student, adapters, params = setting
    (batch, teacher), = bench.batches(cache, demo_data, student, job, [list(range(8))])
    return bench.term_gradients(student, adapters, params, batch, teacher, job.loss)


def _mask(params):
    return torch.cat([torch.full((p.numel(),), n.startswith("student."), dtype=torch.bool) for n, p in params.items()])


def test_gradient_cosine_is_one_for_a_lossless_rewrite_and_below_one_for_4_bit_codecs(
        bench, setting, tiny_cache, demo_data, tmp_path):
    ref = _gradients(bench, setting, tiny_cache, demo_data)
    same = _gradients(bench, setting, bench.write_variant(tiny_cache, tmp_path / "same", "fp32/fp32/fp32"), demo_data)
    coarse = _gradients(bench, setting, bench.write_variant(tiny_cache, tmp_path / "coarse", "uint4/int4/fp16"),
                        demo_data)
    mask = _mask(setting[4])
    exact = bench.compare(ref, same, mask)
    lossy = bench.compare(ref, coarse, mask)
    for term in bench.TERMS:
        assert float(torch.linalg.vector_norm(ref[term]["grad"])) > 0, term  # every term reaches the student
        assert exact[term]["cosine"] == pytest.approx(1.0, abs=1e-12), term
        assert exact[term]["relative_error"] == 0.0, term
    for term in ("attn", "v_all", "v_focus"):  # the quantised signals (logprobs stay fp16)
        assert 0.0 < lossy[term]["cosine"] < 1.0 - 1e-6, (term, lossy[term])
        assert lossy[term]["relative_error"] > 0.0, term


@pytest.mark.parametrize("term", ["attn", "v_all", "v_focus", "logit"])
def test_a_terms_gradient_from_the_shared_forward_is_that_of_the_term_alone(bench, setting, tiny_cache, demo_data,
                                                                             term):
    from alignkd.train import compute_losses

    job, _, student, adapters, params = setting
    shared = _gradients(bench, setting, tiny_cache, demo_data)[term]
    (batch, teacher), = bench.batches(tiny_cache, demo_data, student, job, [list(range(8))])
    alone = dataclasses.replace(job.loss, sup=0.0, **{t: float(t == term) for t in bench.TERMS})
    tensors = list(params.values())
    grads = torch.autograd.grad(compute_losses(student, adapters, batch, teacher, alone)["total"], tensors,
                                allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(grads, tensors)])
    torch.testing.assert_close(shared["grad"], flat, rtol=1e-6, atol=1e-12)
