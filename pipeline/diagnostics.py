"""Is each Align-KD term doing anything? Measured at every evaluation of `train-student`.

A term can be on and still be off: the paper's raw-MSE attention term is ~1e-5 against an
L_sup of ~0.5 and sends almost no gradient, and a trained teacher-side vision adapter
collapses with the student's projector until the V terms are ~1e-3 and the student's vision
tokens no longer depend on the image (ALIGN_KD.md, "What the released code really
optimised"). Both were found only after whole runs had ended below CE-only. So at step 0 and
at every evaluation the trainer logs, on one fixed batch (the first data.batch_size samples
of the training set, so values compare across evaluations and runs):

    grad_norm_<term>   || d(w_term * L_term) / d(student's trainable parameters) ||
                       (the adapters excluded: what the term does to the student)
    grad_share_<term>  that norm over the sum of every enabled term's norm (shares sum to 1)
    spread_student     across-image spread of the student's projected vision tokens P^S
    spread_target      the same for what the V terms hold the student to (`vision_target`)

and `Watch` turns them into one-line warnings, also kept under "warnings" in metrics.jsonl:
a term under 1% of the gradient at `PATIENCE` evaluations in a row, or a spread under half
its value at step 0. A resumed run feeds `Watch` the records it had logged, so its state
carries over.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from alignkd.losses import vision_spread

__all__ = ["MIN_SHARE", "PATIENCE", "Watch", "gradient_report", "spread_report"]

MIN_SHARE = 0.01  # a term under 1% of the student's gradient is as good as off
PATIENCE = 3  # evaluations in a row before saying so (one low reading can be a quiet batch)
MIN_SPREAD_RATIO = 0.5  # spread under half its start: the vision tokens are collapsing


def gradient_report(terms: dict[str, torch.Tensor], weights: dict[str, float],
                    params: list[torch.nn.Parameter]) -> dict[str, float]:
    """grad_norm_<term> and grad_share_<term> for each weighted term in `terms` (a dict of
    unweighted scalar losses sharing one graph; "total" is ignored). The graph is kept
    (retain_graph), the parameters' .grad is not touched."""
    norms: dict[str, float] = {}
    names = [n for n in terms if n != "total" and weights.get(n, 0) > 0]
    for name in names:
        grads = torch.autograd.grad(weights[name] * terms[name], params, retain_graph=True, allow_unused=True)
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        norms[name] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    total = sum(norms.values())
    out = {f"grad_norm_{n}": v for n, v in norms.items()}
    out.update({f"grad_share_{n}": (v / total if total > 0 else 0.0) for n, v in norms.items()})
    return out


def spread_report(student_vision: torch.Tensor | None, vision_target: torch.Tensor | None) -> dict[str, float]:
    """spread_student / spread_target from (B, Nv, D) tokens (None, or B < 2: left out)."""
    out = {}
    for key, tokens in (("spread_student", student_vision), ("spread_target", vision_target)):
        if tokens is not None and tokens.dim() == 3 and tokens.shape[0] >= 2:
            out[key] = vision_spread(tokens)
    return out


@dataclass
class Watch:
    """Turns successive diagnostic records into warnings, each said once per run."""

    low: dict[str, list[int]] = field(default_factory=dict)  # term -> steps of the current low streak
    start: dict[str, float] = field(default_factory=dict)  # spread key -> value at the first record
    said: set[str] = field(default_factory=set)

    def replay(self, records: Iterable[dict[str, Any]]) -> None:
        """Catch up on a resumed run's logged records: the same records raise the same
        warnings, which were said before the run stopped, so they count as said."""
        for record in records:
            self.update(record)

    def update(self, record: dict[str, Any]) -> list[str]:
        """Warnings (new ones only) for this record."""
        found: list[tuple[str, str]] = []
        for key, share in record.items():
            if not key.startswith("grad_share_"):
                continue
            term = key.removeprefix("grad_share_")
            streak = self.low.setdefault(term, [])
            if share < MIN_SHARE:
                streak.append(record["step"])
            else:
                streak.clear()
            if len(streak) >= PATIENCE:
                found.append((f"share:{term}", f"warning: loss term {term} carried under {MIN_SHARE:.0%} of the "
                              f"student's gradient at {len(streak)} evaluations in a row (steps {streak[0]}-"
                              f"{streak[-1]}, now {share:.2%}): it is as good as off; raise loss.{term}"
                              + (" or use loss.attn_variant = 'mix_kl'" if term == "attn" else "")))
        for key in ("spread_student", "spread_target"):
            if key not in record:
                continue
            first = self.start.setdefault(key, record[key])
            if first > 0 and record[key] < MIN_SPREAD_RATIO * first:
                what = "the student's vision tokens" if key == "spread_student" else "the V terms' target"
                found.append((f"spread:{key}", f"warning: the across-image spread of {what} fell from {first:.4g} "
                              f"at the start to {record[key]:.4g} at step {record['step']} (under half): the vision "
                              f"tokens are collapsing (a trained teacher-side adapter, loss.vision_adapter = "
                              f"'teacher', does this)"))
        new = [text for key, text in found if key not in self.said]
        self.said.update(key for key, _ in found)
        return new
