"""The training diagnostics: gradient shares against separate backward passes, the warnings,
and a short run on random data in which the trained teacher-side adapter collapses (so the
spread warning is shown to fire) while the other placements do not.

    .venv/bin/python -m pytest tests/test_diagnostics.py -q
"""

from __future__ import annotations

import pytest
import torch

from alignkd.diagnostics import MIN_SHARE, PATIENCE, Watch, gradient_report, spread_report
from alignkd.losses import AlignKDAdapters, vision_all_loss, vision_spread, vision_target


def test_gradient_shares_match_one_backward_pass_per_weighted_term():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x = torch.randn(8, 5)
    out = model(x)
    terms = {"sup": out.pow(2).mean(), "attn": out.sum() * 1e-3, "v_all": out[:, 0].abs().mean()}
    weights = {"sup": 1.0, "attn": 2.0, "v_all": 0.0}  # v_all is off: left out
    terms["total"] = sum(weights[k] * v for k, v in terms.items())
    report = gradient_report(terms, weights, list(model.parameters()))

    expected = {}
    for name in ("sup", "attn"):
        model.zero_grad()
        (weights[name] * model(x).pow(2).mean() if name == "sup" else weights[name] * model(x).sum() * 1e-3).backward()
        expected[name] = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert set(report) == {"grad_norm_sup", "grad_norm_attn", "grad_share_sup", "grad_share_attn"}
    for name, norm in expected.items():
        assert report[f"grad_norm_{name}"] == pytest.approx(norm, rel=1e-5)
        assert report[f"grad_share_{name}"] == pytest.approx(norm / sum(expected.values()), rel=1e-5)


def test_the_spread_is_the_across_image_std_averaged_over_tokens_and_channels():
    tokens = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(1))
    expected = sum(torch.tensor([float(tokens[b, j, d]) for b in range(6)]).std().item()
                   for j in range(4) for d in range(3)) / 12
    assert vision_spread(tokens) == pytest.approx(expected, rel=1e-6)
    assert vision_spread(tokens[:1].expand(6, 4, 3)) == 0.0
    assert spread_report(tokens[:1], None) == {}  # one image has no spread


def test_a_term_under_one_percent_warns_once_after_patience_evaluations_in_a_row():
    watch = Watch()
    said = []
    shares = [0.5, 0.005, 0.004, 0.2] + [0.001] * PATIENCE + [0.0005] * 3
    for step, share in enumerate(shares):
        said += watch.update({"step": step * 10, "grad_share_attn": share, "grad_share_sup": 1 - share})
    assert len(said) == 1 and "attn" in said[0] and f"{MIN_SHARE:.0%}" in said[0]
    assert f"steps {4 * 10}-{(3 + PATIENCE) * 10}" in said[0]  # the streak that reached PATIENCE

    resumed = Watch()  # a resumed run replays what it logged and does not say it again
    resumed.replay({"step": s * 10, "grad_share_attn": v} for s, v in enumerate(shares))
    assert resumed.update({"step": 999, "grad_share_attn": 0.0}) == []


def test_a_spread_under_half_its_start_warns():
    watch = Watch()
    assert watch.update({"step": 0, "spread_student": 0.4, "spread_target": 0.3}) == []
    assert watch.update({"step": 10, "spread_student": 0.25, "spread_target": 0.3}) == []
    said = watch.update({"step": 20, "spread_student": 0.19, "spread_target": 0.3})
    assert len(said) == 1 and "0.4" in said[0] and "0.19" in said[0] and "step 20" in said[0]


def _toy_run(placement: str, steps: int = 300) -> list[float]:
    """A student projector trained by the V loss alone on random images, 1-thread float32:
    spread of its tokens at each 50 steps. The teacher's features are a nonlinear function
    of the image the linear student cannot reproduce exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        n, nv, d_in, d_s, d_t = 64, 4, 12, 8, 16
        images = torch.randn(n, nv, d_in)
        teacher = torch.tanh(images @ torch.randn(d_in, d_t)) + 0.3 * torch.randn(n, nv, d_t)
        projector = torch.nn.Linear(d_in, d_s)
        adapters = AlignKDAdapters(teacher_width=d_t, student_width=d_s, vision_placement=placement)
        optim = torch.optim.Adam([*projector.parameters(), *adapters.trainable()], lr=1e-2)
        spreads = []
        for step in range(steps + 1):
            if step % 50 == 0:
                spreads.append(vision_spread(projector(images)))
            optim.zero_grad()
            vision_all_loss(projector(images), teacher, adapters.vision_adapter).backward()
            optim.step()
        return spreads
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("placement", ["student", "teacher_frozen", "teacher"])
def test_only_the_trained_teacher_side_adapter_collapses_the_students_vision_tokens(placement):
    spreads = _toy_run(placement)
    watch = Watch()
    said = [text for step, s in enumerate(spreads) for text in watch.update({"step": step * 50, "spread_student": s})]
    if placement == "teacher":
        assert spreads[-1] < 0.5 * spreads[0], spreads
        assert len(said) == 1 and "collapsing" in said[0]
    else:
        assert spreads[-1] > 0.5 * spreads[0], spreads
        assert said == []


def test_the_v_target_of_the_fixed_placements_does_not_move_with_training():
    torch.manual_seed(0)
    feats = torch.randn(4, 3, 16)
    for placement in ("student", "teacher_frozen"):
        adapters = AlignKDAdapters(teacher_width=16, student_width=8, vision_placement=placement)
        before = vision_target(feats, adapters.vision_adapter).detach().clone()
        optim = torch.optim.Adam(adapters.trainable() or [torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        for _ in range(5):
            optim.zero_grad()
            student = torch.randn(4, 3, 8, requires_grad=True)
            vision_all_loss(student, feats, adapters.vision_adapter).backward()
            optim.step()
        torch.testing.assert_close(vision_target(feats, adapters.vision_adapter), before)
