"""The Align-KD loss terms against naive references written as explicit Python loops.

    .venv/bin/python -m pytest tests/test_losses.py -q

Each reference walks batch / head / row / element one scalar at a time with `math`, in float64,
so it shares no vectorised code with alignkd.losses.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignkd.losses import (
    grounding_loss,
    AlignKDAdapters,
    HeadMixer,
    VisionAdapter,
    attn_loss_mean,
    attn_loss_mix_kl,
    attn_loss_mix_mse,
    focus_scores,
    logit_kl,
    sup_loss,
    vision_all_loss,
    vision_focus_loss,
    vision_target,
)

TOL = dict(rtol=1e-6, atol=1e-9)
B, H_S, H_T, LQ, NV, D_S, D_T = 3, 2, 3, 5, 6, 4, 7


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(actual: torch.Tensor, expected: float) -> None:
    torch.testing.assert_close(actual.detach().double(), torch.tensor(expected, dtype=torch.float64), **TOL)


# ----------------------------------------------------------------------------- references


def ref_softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    m = max(row)
    e = [math.exp((x - m) / temperature) for x in row]
    z = sum(e)
    return [x / z for x in e]


def ref_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def ref_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    total = 0.0
    for row, t in zip(logits.tolist(), targets.tolist()):
        total += -math.log(ref_softmax(row)[t])
    return total / len(targets)


def ref_full_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, direction: str, temperature: float) -> float:
    total = 0.0
    for s_row, t_row in zip(s_logits.tolist(), t_logits.tolist()):
        p_s, p_t = ref_softmax(s_row, temperature), ref_softmax(t_row, temperature)
        total += ref_kl(p_t, p_s) if direction == "forward" else ref_kl(p_s, p_t)
    return total / len(s_logits) * temperature**2


def ref_merged_kl(
    s_logits: torch.Tensor, t_logits: torch.Tensor, ids: torch.Tensor, direction: str, temperature: float
) -> float:
    """Build both (k + 1)-bin distributions token by token, then their KL."""
    total = 0.0
    for s_row, t_row, id_row in zip(s_logits.tolist(), t_logits.tolist(), ids.tolist()):
        # Teacher: merged at T = 1 (that is what the cache holds), then tempered bin by bin.
        p_t_full = ref_softmax(t_row)
        t_bins = [p_t_full[i] for i in id_row]
        t_bins.append(sum(p for v, p in enumerate(p_t_full) if v not in id_row))
        powered = [b ** (1.0 / temperature) for b in t_bins]
        t_bins = [b / sum(powered) for b in powered]
        # Student: tempered over the full vocabulary, then merged.
        p_s_full = ref_softmax(s_row, temperature)
        s_bins = [p_s_full[i] for i in id_row]
        s_bins.append(sum(p for v, p in enumerate(p_s_full) if v not in id_row))
        total += ref_kl(t_bins, s_bins) if direction == "forward" else ref_kl(s_bins, t_bins)
    return total / len(s_logits) * temperature**2


def teacher_cache(t_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the extractor caches: top-k ids, their log-probs, log of the remaining mass."""
    logprobs = torch.log_softmax(t_logits.double(), dim=-1)
    top_lp, ids = logprobs.topk(k, dim=-1)
    if k == t_logits.shape[-1]:
        tail = torch.full((t_logits.shape[0],), float("-inf"), dtype=torch.float64)
    else:
        tail = torch.log1p(-top_lp.exp().sum(-1))
    return ids, top_lp, tail


def ref_attn_mix(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> float:
    s, t, m, w = student.tolist(), teacher.tolist(), mask.tolist(), weight.tolist()
    total, count = 0.0, 0
    for b in range(len(s)):
        for q in range(len(m[b])):
            if not m[b][q]:
                continue
            for hs in range(len(s[b])):
                for v in range(len(s[b][hs][q])):
                    mixed = sum(w[hs][ht] * t[b][ht][q][v] for ht in range(len(t[b])))
                    total += (s[b][hs][q][v] - mixed) ** 2
                    count += 1
    return total / count


def ref_head_mean_row(block: list, b: int, q: int, per_head: bool) -> list[float]:
    if not per_head:
        return list(block[b][q])
    heads = block[b]
    return [sum(heads[h][q][v] for h in range(len(heads))) / len(heads) for v in range(len(heads[0][q]))]


def ref_attn_mean(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> float:
    s, t, m = student.tolist(), teacher.tolist(), mask.tolist()
    total, rows = 0.0, 0
    for b in range(len(s)):
        for q in range(len(m[b])):
            if not m[b][q]:
                continue
            s_row = ref_head_mean_row(s, b, q, True)
            t_row = ref_head_mean_row(t, b, q, teacher.dim() == 4)
            s_sum, t_sum = max(sum(s_row), eps), max(sum(t_row), eps)
            kl = 0.0
            for sv, tv in zip(s_row, t_row):
                ps, pt = sv / s_sum, tv / t_sum
                kl += pt * (math.log(pt + eps) - math.log(ps + eps))
            total += kl
            rows += 1
    return total / rows


def ref_focus(block: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    x, m = block.tolist(), mask.tolist()
    out = []
    for b in range(len(x)):
        nv = block.shape[-1]
        scores = [0.0] * nv
        for q in range(len(m[b])):
            if m[b][q]:
                row = ref_head_mean_row(x, b, q, block.dim() == 4)
                for v in range(nv):
                    scores[v] += row[v]
        out.append(scores)
    return out


def ref_vision(
    student: torch.Tensor,
    teacher: torch.Tensor,
    adapter: VisionAdapter,
    image_mask: torch.Tensor | None,
    tokens: list[list[int]] | None = None,
) -> float:
    s, t = student.tolist(), teacher.tolist()
    w, bias = adapter.weight.tolist(), adapter.bias.tolist()
    total, count = 0.0, 0
    for b in range(len(s)):
        if image_mask is not None and not bool(image_mask[b]):
            continue
        for j in tokens[b] if tokens is not None else range(len(s[b])):
            for d in range(len(s[b][j])):
                pred = bias[d] + sum(w[d][e] * t[b][j][e] for e in range(len(t[b][j])))
                total += (pred - s[b][j][d]) ** 2
                count += 1
    return total / count


# ----------------------------------------------------------------------------- fixtures


def attention_rows(b: int, h: int, lq: int, nv: int, seed: int) -> torch.Tensor:
    """Post-softmax rows over nv vision keys plus a few text keys: the vision part sums to < 1."""
    full = torch.softmax(torch.randn(b, h, lq, nv + 3, generator=gen(seed), dtype=torch.float64), dim=-1)
    return full[..., :nv].contiguous()


def query_mask() -> torch.Tensor:
    mask = torch.ones(B, LQ, dtype=torch.bool)
    mask[0, 3:] = False  # a short sample
    mask[2, 1:] = False  # a one-row sample
    return mask


def mixer64(seed: int = 0) -> HeadMixer:
    mixer = HeadMixer(H_T, H_S).double()
    with torch.no_grad():  # move away from the head-mean init so every weight matters
        mixer.weight.copy_(torch.randn(H_S, H_T, generator=gen(seed), dtype=torch.float64))
    return mixer


def adapter64(seed: int = 0) -> VisionAdapter:
    torch.manual_seed(seed)
    return VisionAdapter(D_T, D_S).double()


def feats(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return (
        torch.randn(B, NV, D_S, generator=g, dtype=torch.float64),
        torch.randn(B, NV, D_T, generator=g, dtype=torch.float64),
    )


# ----------------------------------------------------------------------------- L_sup


def test_sup_loss_matches_a_loop_over_response_positions():
    logits = torch.randn(6, 9, generator=gen(0), dtype=torch.float64)
    targets = torch.randint(0, 9, (6,), generator=gen(1))
    close(sup_loss(logits, targets), ref_cross_entropy(logits, targets))


def test_sup_loss_without_response_positions_is_zero_and_backpropagates():
    logits = torch.zeros(0, 9, requires_grad=True)
    loss = sup_loss(logits, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


# ----------------------------------------------------------------------------- L_logit


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_logit_kl_with_every_token_cached_equals_the_full_vocabulary_kl(direction, temperature):
    n, vocab = 5, 8
    s_logits = torch.randn(n, vocab, generator=gen(0), dtype=torch.float64) * 2
    t_logits = torch.randn(n, vocab, generator=gen(1), dtype=torch.float64) * 2
    ids, top_lp, tail = teacher_cache(t_logits, k=vocab)
    assert torch.isneginf(tail).all()
    loss = logit_kl(s_logits, ids, top_lp, tail, direction=direction, temperature=temperature)
    close(loss, ref_full_kl(s_logits, t_logits, direction, temperature))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_logit_kl_with_fewer_tokens_cached_equals_the_kl_of_the_merged_distributions(direction, temperature):
    n, vocab, k = 5, 9, 3
    s_logits = torch.randn(n, vocab, generator=gen(2), dtype=torch.float64) * 2
    t_logits = torch.randn(n, vocab, generator=gen(3), dtype=torch.float64) * 2
    ids, top_lp, tail = teacher_cache(t_logits, k=k)
    loss = logit_kl(s_logits, ids, top_lp, tail, direction=direction, temperature=temperature)
    close(loss, ref_merged_kl(s_logits, t_logits, ids, direction, temperature))
    if temperature == 1.0:
        # Merging bins never increases a KL: at T = 1 the k + 1 bin value bounds the full one from
        # below. (At T != 1 the teacher's tail is tempered as one token, so no such bound.)
        assert loss.item() <= ref_full_kl(s_logits, t_logits, direction, temperature) + 1e-12


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("k", [3, 8])
def test_logit_kl_stays_finite_with_its_gradient_when_the_teacher_tail_is_minus_infinity(direction, k):
    vocab = 8
    s_logits = torch.randn(4, vocab, generator=gen(4), requires_grad=True)
    t_logits = torch.randn(4, vocab, generator=gen(5))
    ids, top_lp, _ = teacher_cache(t_logits, k=k)
    # k < V with a cached tail of -inf is what float32 rounding leaves when the top k hold ~all mass.
    tail = torch.full((4,), float("-inf"))
    loss = logit_kl(s_logits, ids, top_lp.float(), tail, direction=direction, temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s_logits.grad).all()
    assert s_logits.grad.abs().sum() > 0


def test_student_tail_keeps_its_mass_when_its_top_k_hold_nearly_all_of_it():
    # In float32 the student's top-k mass rounds to exactly 1, so log(1 - sum p) would be -inf;
    # the tail must still be its true ~e^-60 mass, and the tail bin's KL term finite and exact.
    vocab, k, big = 10, 4, 60.0
    ids = torch.tensor([[0, 1, 2, 3]])
    s_logits = torch.zeros(1, vocab)
    s_logits[0, :k] = big
    s_logits.requires_grad_(True)
    assert torch.softmax(s_logits, -1)[0, :k].sum().item() == 1.0
    t_top = torch.log(torch.full((1, k), 0.2475, dtype=torch.float64))
    t_tail = torch.log(torch.tensor([0.01], dtype=torch.float64))
    loss = logit_kl(s_logits, ids, t_top.float(), t_tail.float())
    loss.backward()

    log_z = math.log(k * math.exp(big) + (vocab - k))
    s_top, s_tail = big - log_z, math.log(vocab - k) - log_z
    expected = 4 * 0.2475 * (math.log(0.2475) - s_top) + 0.01 * (math.log(0.01) - s_tail)
    assert torch.isfinite(s_logits.grad).all()
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_logit_kl_does_not_backpropagate_into_the_teacher():
    s_logits = torch.randn(3, 6, generator=gen(6), requires_grad=True)
    t_logits = torch.randn(3, 6, generator=gen(7))
    ids, top_lp, tail = teacher_cache(t_logits, k=2)
    top_lp.requires_grad_(True)
    logit_kl(s_logits, ids, top_lp, tail).backward()
    assert top_lp.grad is None and s_logits.grad is not None


def test_logit_kl_without_response_positions_is_zero():
    s_logits = torch.zeros(0, 6, requires_grad=True)
    loss = logit_kl(s_logits, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), torch.zeros(0))
    loss.backward()
    assert loss.item() == 0.0


# ----------------------------------------------------------------------------- L_attn


def test_head_mixer_mixes_heads_like_a_loop():
    mixer = mixer64(1)
    teacher = attention_rows(B, H_T, LQ, NV, seed=1)
    out = mixer(teacher)
    w, t = mixer.weight.tolist(), teacher.tolist()
    for b in range(B):
        for s in range(H_S):
            for q in range(LQ):
                for v in range(NV):
                    expected = sum(w[s][h] * t[b][h][q][v] for h in range(H_T))
                    assert abs(out[b, s, q, v].item() - expected) < 1e-12


def test_head_mixer_starts_at_the_teacher_head_mean():
    teacher = attention_rows(B, H_T, LQ, NV, seed=2).float()
    out = HeadMixer(H_T, H_S)(teacher)
    for s in range(H_S):
        torch.testing.assert_close(out[:, s], teacher.mean(dim=1))


def test_attn_loss_mix_matches_a_loop_over_real_rows():
    student, teacher, mask = attention_rows(B, H_S, LQ, NV, 3), attention_rows(B, H_T, LQ, NV, 4), query_mask()
    mixer = mixer64(2)
    close(attn_loss_mix_mse(student, teacher, mask, mixer), ref_attn_mix(student, teacher, mask, mixer.weight))


@pytest.mark.parametrize("teacher_heads", [True, False], ids=["per-head-teacher", "head-mean-teacher"])
def test_attn_loss_mean_matches_a_loop_over_real_rows(teacher_heads):
    student, mask = attention_rows(B, H_S, LQ, NV, 5), query_mask()
    teacher = attention_rows(B, H_T, LQ, NV, 6)
    if not teacher_heads:
        teacher = teacher.mean(dim=1)
    close(attn_loss_mean(student, teacher, mask), ref_attn_mean(student, teacher, mask))


def test_attn_loss_mean_is_zero_when_the_student_looks_where_the_teacher_does():
    teacher = attention_rows(B, H_T, LQ, NV, 7)
    # Same head-mean pattern, half the vision mass: renormalisation over V makes them equal.
    student = (teacher.mean(dim=1, keepdim=True) * 0.5).expand(B, H_S, LQ, NV)
    assert abs(attn_loss_mean(student, teacher, query_mask()).item()) < 1e-12


def test_attn_losses_send_gradient_to_the_student_block_and_the_mixer_not_the_teacher():
    student = attention_rows(B, H_S, LQ, NV, 8).requires_grad_(True)
    teacher = attention_rows(B, H_T, LQ, NV, 9).requires_grad_(True)
    mixer = mixer64(3)
    attn_loss_mix_mse(student, teacher, query_mask(), mixer).backward()
    assert student.grad.abs().sum() > 0 and mixer.weight.grad.abs().sum() > 0
    assert teacher.grad is None

    student.grad = None
    attn_loss_mean(student, teacher, query_mask()).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


@pytest.mark.parametrize("variant", ["mix_mse", "mean"])
def test_padded_query_rows_do_not_change_the_attention_loss(variant):
    mask = query_mask()
    mixer = mixer64(4)

    def loss(s, t, m):
        return attn_loss_mix_mse(s, t, m, mixer) if variant == "mix_mse" else attn_loss_mean(s, t, m)

    student, teacher = attention_rows(B, H_S, LQ, NV, 10), attention_rows(B, H_T, LQ, NV, 11)
    value = loss(student, teacher, mask)

    # Anything in the padded rows, NaN included, is ignored.
    junk_s, junk_t = student.clone(), teacher.clone()
    junk_s.transpose(1, 2)[~mask] = float("nan")
    junk_t.transpose(1, 2)[~mask] = 7.0
    torch.testing.assert_close(loss(junk_s, junk_t, mask), value, **TOL)

    # Same as the batch with the padding removed: each sample cut to its real rows, combined as
    # a mean over all real rows.
    rows = mask.sum(dim=1)
    total = 0.0
    for b in range(B):
        n = int(rows[b])
        cut = loss(student[b : b + 1, :, :n], teacher[b : b + 1, :, :n], torch.ones(1, n, dtype=torch.bool))
        total += cut.item() * n
    close(value, total / rows.sum().item())


@pytest.mark.parametrize("variant", ["mix_mse", "mean"])
def test_attention_loss_without_real_rows_is_zero_and_backpropagates(variant):
    student = attention_rows(B, H_S, LQ, NV, 12).requires_grad_(True)
    teacher = attention_rows(B, H_T, LQ, NV, 13)
    mask = torch.zeros(B, LQ, dtype=torch.bool)
    mixer = mixer64(5)
    loss = attn_loss_mix_mse(student, teacher, mask, mixer) if variant == "mix_mse" else attn_loss_mean(student, teacher, mask)
    loss.backward()
    assert loss.item() == 0.0 and student.grad is not None and not torch.isnan(student.grad).any()


@pytest.mark.parametrize("per_head", [True, False])
def test_focus_scores_sum_the_head_mean_over_real_rows_like_a_loop(per_head):
    block = attention_rows(B, H_T, LQ, NV, 14)
    if not per_head:
        block = block.mean(dim=1)
    mask = query_mask()
    padded = block.clone()
    padded[..., 4, :] = float("nan")  # row 4 is padding in samples 0 and 2
    mask[1, 4] = False
    torch.testing.assert_close(focus_scores(padded, mask), torch.tensor(ref_focus(block, mask), dtype=torch.float64))


# ----------------------------------------------------------------------------- L_V


def test_vision_all_loss_matches_a_loop_over_tokens_and_widths():
    student, teacher = feats(0)
    adapter = adapter64(0)
    close(vision_all_loss(student, teacher, adapter), ref_vision(student, teacher, adapter, None))
    image_mask = torch.tensor([True, False, True])
    close(vision_all_loss(student, teacher, adapter, image_mask), ref_vision(student, teacher, adapter, image_mask))


@pytest.mark.parametrize("k", [1, 3, NV])
def test_vision_focus_loss_matches_a_loop_over_the_top_k_focus_tokens(k):
    student, teacher = feats(1)
    adapter = adapter64(1)
    focus = torch.rand(B, NV, generator=gen(15), dtype=torch.float64)
    image_mask = torch.tensor([True, True, False])
    tokens = [sorted(range(NV), key=lambda j: -focus[b, j].item())[:k] for b in range(B)]
    loss = vision_focus_loss(student, teacher, adapter, focus, k, image_mask)
    close(loss, ref_vision(student, teacher, adapter, image_mask, tokens))
    if k == NV:
        torch.testing.assert_close(loss, vision_all_loss(student, teacher, adapter, image_mask))


@pytest.mark.parametrize("term", ["all", "focus"])
def test_vision_losses_send_gradient_to_the_adapter_and_student_features_not_the_teacher(term):
    student, teacher = feats(2)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    adapter = adapter64(2)
    focus = torch.rand(B, NV, generator=gen(16))
    if term == "all":
        loss = vision_all_loss(student, teacher, adapter)
    else:
        loss = vision_focus_loss(student, teacher, adapter, focus, 2)
    loss.backward()
    assert student.grad.abs().sum() > 0
    assert adapter.weight.grad.abs().sum() > 0 and adapter.bias.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("term", ["all", "focus"])
def test_samples_without_image_do_not_change_the_vision_loss(term):
    student, teacher = feats(3)
    adapter = adapter64(3)
    focus = torch.rand(B, NV, generator=gen(17))
    image_mask = torch.tensor([True, False, True])

    def loss(s, t, f, m):
        return vision_all_loss(s, t, adapter, m) if term == "all" else vision_focus_loss(s, t, adapter, f, 2, m)

    junk_s, junk_t = student.clone(), teacher.clone()
    junk_s[1], junk_t[1] = float("nan"), 1e6
    keep = image_mask
    torch.testing.assert_close(
        loss(junk_s, junk_t, focus, image_mask), loss(student[keep], teacher[keep], focus[keep], None), **TOL
    )


def test_vision_losses_without_any_image_are_zero_and_backpropagate():
    student, teacher = feats(4)
    student.requires_grad_(True)
    adapter = adapter64(4)
    none = torch.zeros(B, dtype=torch.bool)
    focus = torch.rand(B, NV, generator=gen(18))
    for loss in (
        vision_all_loss(student, teacher, adapter, none),
        vision_focus_loss(student, teacher, adapter, focus, 2, none),
    ):
        loss.backward()
        assert loss.item() == 0.0 and student.grad is not None and adapter.weight.grad is not None


# ----------------------------------------------------------------------------- shape checks


def _bad_calls():
    s_blk, t_blk, mask = torch.rand(B, H_S, LQ, NV), torch.rand(B, H_T, LQ, NV), torch.ones(B, LQ, dtype=torch.bool)
    sf, tf = torch.rand(B, NV, D_S), torch.rand(B, NV, D_T)
    mixer, adapter = HeadMixer(H_T, H_S), VisionAdapter(D_T, D_S)
    logits, ids, lp, tail = torch.rand(4, 8), torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2), torch.rand(4)
    focus = torch.rand(B, NV)
    return {
        "sup 1-D logits": lambda: sup_loss(torch.rand(8), torch.zeros(8, dtype=torch.long)),
        "sup target count": lambda: sup_loss(logits, torch.zeros(3, dtype=torch.long)),
        "kl ids rows": lambda: logit_kl(logits, ids[:3], lp, tail),
        "kl k above vocab": lambda: logit_kl(logits, torch.zeros(4, 9, dtype=torch.long), torch.rand(4, 9), tail),
        "kl float ids": lambda: logit_kl(logits, ids.float(), lp, tail),
        "kl logprobs shape": lambda: logit_kl(logits, ids, lp[:, :1], tail),
        "kl tail shape": lambda: logit_kl(logits, ids, lp, tail[:, None]),
        "kl direction": lambda: logit_kl(logits, ids, lp, tail, direction="sideways"),
        "kl temperature": lambda: logit_kl(logits, ids, lp, tail, temperature=0.0),
        "mix 3-D student": lambda: attn_loss_mix_mse(s_blk[:, 0], t_blk, mask, mixer),
        "mix Nv differs": lambda: attn_loss_mix_mse(s_blk, t_blk[..., :-1], mask, mixer),
        "mix mixer heads": lambda: attn_loss_mix_mse(s_blk, t_blk[:, :2], mask, mixer),
        "mix mask shape": lambda: attn_loss_mix_mse(s_blk, t_blk, mask[:, :-1], mixer),
        "mix mask dtype": lambda: attn_loss_mix_mse(s_blk, t_blk, mask.float(), mixer),
        "mean Lq differs": lambda: attn_loss_mean(s_blk, t_blk[:, :, :-1], mask),
        "mean 2-D teacher": lambda: attn_loss_mean(s_blk, t_blk[:, 0, 0], mask),
        "focus 2-D block": lambda: focus_scores(t_blk[:, 0, 0], mask),
        "vall Nv differs": lambda: vision_all_loss(sf, tf[:, :-1], adapter),
        "vall widths": lambda: vision_all_loss(sf, tf[..., :-1], adapter),
        "vall image mask": lambda: vision_all_loss(sf, tf, adapter, torch.ones(B + 1, dtype=torch.bool)),
        "vfocus focus shape": lambda: vision_focus_loss(sf, tf, adapter, focus[:, :-1], 2),
        "vfocus k too big": lambda: vision_focus_loss(sf, tf, adapter, focus, NV + 1),
        "vfocus k zero": lambda: vision_focus_loss(sf, tf, adapter, focus, 0),
        "adapters half heads": lambda: AlignKDAdapters(teacher_heads=4),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_wrong_shapes_raise_value_error_naming_the_argument(name):
    with pytest.raises(ValueError) as err:
        _bad_calls()[name]()
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- adapters


def test_adapters_are_optional_and_live_in_the_state_dict():
    both = AlignKDAdapters(teacher_heads=H_T, student_heads=H_S, teacher_width=D_T, student_width=D_S)
    assert set(both.state_dict()) == {"head_mixer.weight", "vision_adapter.weight", "vision_adapter.bias"}
    only_vision = AlignKDAdapters(teacher_width=D_T, student_width=D_S)
    assert only_vision.head_mixer is None
    assert set(only_vision.state_dict()) == {"vision_adapter.weight", "vision_adapter.bias"}
    assert len(list(AlignKDAdapters().parameters())) == 0


def test_an_adamw_step_with_the_adapters_in_the_optimizer_changes_them():
    torch.manual_seed(0)
    adapters = AlignKDAdapters(teacher_heads=H_T, student_heads=H_S, teacher_width=D_T, student_width=D_S)
    # A toy student: one layer makes its vision features and attention logits from its input.
    student = torch.nn.Linear(D_S, D_S)
    x = torch.randn(B, NV, D_S)
    s_feats = student(x)
    scores = torch.einsum("bnd,bmd->bnm", s_feats, s_feats)[:, None, :LQ, :].expand(B, H_S, LQ, NV)
    s_block = torch.softmax(scores, dim=-1) * 0.5
    t_block = attention_rows(B, H_T, LQ, NV, 19).float()
    t_feats = torch.randn(B, NV, D_T)

    optim = torch.optim.AdamW([*student.parameters(), *adapters.parameters()], lr=1e-2)
    before = {k: v.clone() for k, v in adapters.state_dict().items()}
    loss = attn_loss_mix_mse(s_block, t_block, query_mask(), adapters.head_mixer) + vision_all_loss(
        s_feats, t_feats, adapters.vision_adapter
    )
    loss.backward()
    optim.step()
    for name, value in adapters.state_dict().items():
        assert not torch.equal(value, before[name]), f"{name} did not move"


# ----------------------------------------------------------------------------- placements, mix_kl


def ref_attn_mix_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor,
                    eps: float = 1e-8) -> float:
    s, t, m = student.tolist(), teacher.tolist(), mask.tolist()
    mixing = [ref_softmax(row) for row in logits.tolist()]
    total, count = 0.0, 0
    for b in range(len(s)):
        for q in range(len(m[b])):
            if not m[b][q]:
                continue
            for hs in range(len(s[b])):
                mixed = [sum(mixing[hs][ht] * t[b][ht][q][v] for ht in range(len(t[b]))) for v in range(len(s[b][hs][q]))]
                s_row = s[b][hs][q]
                s_sum, t_sum = max(sum(s_row), eps), max(sum(mixed), eps)
                total += sum((tv / t_sum) * (math.log(tv / t_sum + eps) - math.log(sv / s_sum + eps))
                             for sv, tv in zip(s_row, mixed))
                count += 1
    return total / count


def ref_standardise(row: list[float], eps: float = 1e-5) -> list[float]:
    mean = sum(row) / len(row)
    var = sum((x - mean) ** 2 for x in row) / len(row)
    return [(x - mean) / math.sqrt(var + eps) for x in row]


def ref_vision_regressor(student: torch.Tensor, teacher: torch.Tensor, regressor: VisionAdapter,
                         normalize: bool) -> float:
    """MSE(Regressor(P^S), P^T), one scalar at a time."""
    s, t = student.tolist(), teacher.tolist()
    w, bias = regressor.weight.tolist(), regressor.bias.tolist()
    total, count = 0.0, 0
    for b in range(len(s)):
        for j in range(len(s[b])):
            target = ref_standardise(t[b][j]) if normalize else t[b][j]
            for d in range(len(target)):
                pred = bias[d] + sum(w[d][e] * s[b][j][e] for e in range(len(s[b][j])))
                total += (pred - target[d]) ** 2
                count += 1
    return total / count


def test_attn_loss_mix_kl_matches_a_loop_over_heads_and_real_rows():
    student, teacher, mask = attention_rows(B, H_S, LQ, NV, 30), attention_rows(B, H_T, LQ, NV, 31), query_mask()
    mixer = HeadMixer(H_T, H_S, convex=True).double()
    with torch.no_grad():
        mixer.weight.copy_(torch.randn(H_S, H_T, generator=gen(32), dtype=torch.float64))
    close(attn_loss_mix_kl(student, teacher, mask, mixer), ref_attn_mix_kl(student, teacher, mask, mixer.weight))


def test_attn_loss_mix_kl_is_scale_free_where_the_raw_mse_is_not():
    # Rows spread over many text keys: the vision part is small, as at real sequence lengths.
    teacher = attention_rows(B, H_T, LQ, NV, 33) * 0.01
    student = attention_rows(B, H_S, LQ, NV, 34) * 0.01
    mixer, mask = HeadMixer(H_T, H_S, convex=True).double(), query_mask()
    kl = attn_loss_mix_kl(student, teacher, mask, mixer)
    torch.testing.assert_close(kl, attn_loss_mix_kl(student * 100, teacher * 100, mask, mixer))
    assert kl.item() > 0.01  # O(0.1) nats for unrelated rows
    assert attn_loss_mix_mse(student, teacher, mask, HeadMixer(H_T, H_S).double()).item() < 1e-4


def test_a_convex_head_mixer_starts_at_the_head_mean_and_only_mixes_non_negatively():
    teacher = attention_rows(B, H_T, LQ, NV, seed=35)
    mixer = HeadMixer(H_T, H_S, convex=True).double()
    torch.testing.assert_close(mixer(teacher)[:, 0], teacher.mean(dim=1))
    with torch.no_grad():
        mixer.weight.copy_(torch.randn(H_S, H_T, generator=gen(36), dtype=torch.float64) * 5)
    assert (mixer(teacher) >= 0).all()
    torch.testing.assert_close(mixer.mixing(torch.float64).sum(dim=1), torch.ones(H_S, dtype=torch.float64))
    with pytest.raises(ValueError, match="convex"):
        attn_loss_mix_kl(teacher[:, :H_S], teacher, query_mask(), HeadMixer(H_T, H_S).double())


@pytest.mark.parametrize("normalize", [False, True], ids=["raw-target", "standardised-target"])
def test_a_student_side_regressor_maps_the_student_onto_the_fixed_teacher_features_like_a_loop(normalize):
    student, teacher = feats(40)
    torch.manual_seed(40)
    regressor = VisionAdapter(D_T, D_S, side="student").double()
    assert tuple(regressor.weight.shape) == (D_T, D_S)
    close(vision_all_loss(student, teacher, regressor, normalize_target=normalize),
          ref_vision_regressor(student, teacher, regressor, normalize))
    focus = torch.rand(B, NV, generator=gen(41), dtype=torch.float64)  # all Nv tokens: the same as L_V_all
    torch.testing.assert_close(vision_focus_loss(student, teacher, regressor, focus, NV, normalize_target=normalize),
                               vision_all_loss(student, teacher, regressor, normalize_target=normalize))


@pytest.mark.parametrize("placement", ["student", "teacher_frozen", "teacher"])
def test_each_vision_placement_trains_only_what_it_says_and_keeps_all_in_the_state_dict(placement):
    torch.manual_seed(0)
    adapters = AlignKDAdapters(teacher_heads=H_T, student_heads=H_S, teacher_width=D_T, student_width=D_S,
                               vision_placement=placement, head_mixer="frozen")
    assert set(adapters.state_dict()) == {"head_mixer.weight", "vision_adapter.weight", "vision_adapter.bias"}
    trainable = {id(p) for p in adapters.trainable()}
    vision = {id(p) for p in adapters.vision_adapter.parameters()}
    assert vision <= trainable if placement != "teacher_frozen" else not vision & trainable
    assert id(adapters.head_mixer.weight) not in trainable  # frozen mixer
    expected_side = "student" if placement == "student" else "teacher"
    assert adapters.vision_adapter.side == expected_side
    # The frozen mixer is the released code's random Conv2d-like init, not the head mean.
    assert not torch.allclose(adapters.head_mixer.weight, torch.full((H_S, H_T), 1 / H_T))


@pytest.mark.parametrize("placement", ["student", "teacher_frozen", "teacher"])
def test_only_the_trained_teacher_side_adapter_lets_constant_student_tokens_reach_zero_loss(placement):
    """The collapsed solution (every student token the same vector, whatever the image) is a
    global minimum of the V loss only for the trained teacher-side adapter (weight 0, bias =
    that vector). For the other placements the best collapsed loss is the target's variance
    across images, above what a student that reproduces the image-dependent target reaches."""
    torch.manual_seed(1)
    _, teacher = feats(50)
    adapters = AlignKDAdapters(teacher_width=D_T, student_width=D_S, vision_placement=placement)
    adapter = adapters.vision_adapter.double()
    constant = torch.randn(1, 1, D_S, dtype=torch.float64).expand(B, NV, D_S)
    if placement == "teacher":  # what training the adapter can reach: W = 0, b = the constant
        with torch.no_grad():
            adapter.weight.zero_()
            adapter.bias.copy_(constant[0, 0])
        assert vision_all_loss(constant, teacher, adapter).item() < 1e-20
        return
    # Best case for collapse: the adapter side is fitted to the constant by least squares.
    target = vision_target(teacher, adapter)  # (B, Nv, D): fixed for these placements
    if placement == "student":  # Regressor(constant) is one vector: best is the target's mean
        with torch.no_grad():
            adapter.weight.zero_()
            adapter.bias.copy_(target.mean(dim=(0, 1)))
        collapsed = vision_all_loss(constant, teacher, adapter)
        assert collapsed.item() == pytest.approx(target.var(dim=(0, 1), unbiased=False).mean().item(), rel=1e-9)
    else:
        best_constant = target.mean(dim=(0, 1), keepdim=True).expand_as(target)
        collapsed = vision_all_loss(best_constant, teacher, adapter)
    assert collapsed.item() > 0.1
    # A student that reproduces the target (possible here: the target is fixed) reaches ~0.
    if placement == "teacher_frozen":
        assert vision_all_loss(target, teacher, adapter).item() < 1e-20


# --- the demo teacher's grounding supervision -------------------------------------------------
def _rows_block(b=3, h=2, lq=5, nv=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, lq, nv + 4, generator=g).softmax(-1)[..., :nv]  # rows over more keys than the image


def test_grounding_loss_matches_a_loop_over_samples():
    block = _rows_block()
    rows = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    cells = torch.zeros(3, 9, dtype=torch.bool)
    cells[0, [2, 5]] = True
    cells[1, 0] = True
    cells[2, 4] = True  # no key-word row: left out
    expected = []
    for i in range(2):
        picked = block[i].mean(0)[rows[i]].mean(0)
        expected.append(-math.log(float(picked[cells[i]].sum() / picked.sum())))
    assert float(grounding_loss(block, rows, cells)) == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_grounding_loss_is_zero_on_the_answer_and_log_nv_when_uniform():
    rows = torch.ones(1, 4, dtype=torch.bool)
    cells = torch.zeros(1, 9, dtype=torch.bool)
    cells[0, 3] = True
    on = torch.zeros(1, 2, 4, 9)
    on[..., 3] = 0.6  # 0.6 of each row on the image, all of it on the answer's cell
    assert float(grounding_loss(on, rows, cells)) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((1, 2, 4, 9), 0.05)
    assert float(grounding_loss(uniform, rows, cells)) == pytest.approx(math.log(9), rel=1e-6)


def test_grounding_loss_pulls_attention_onto_the_answer_and_is_zero_without_rows():
    block = _rows_block().requires_grad_(True)
    rows = torch.zeros(3, 5, dtype=torch.bool)
    rows[:, 2] = True
    cells = torch.zeros(3, 9, dtype=torch.bool)
    cells[:, 1] = True
    grounding_loss(block, rows, cells).backward()
    g = block.grad[:, :, 2]  # (B, H, Nv): the key-word row
    assert bool((g[..., 1] < 0).all()) and bool((g[..., [0, *range(2, 9)]] > 0).all())
    assert bool((block.grad[:, :, [0, 1, 3, 4]] == 0).all())  # other rows get nothing
    empty = grounding_loss(block, torch.zeros_like(rows), cells)
    assert float(empty) == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="cells"):
        grounding_loss(block, rows, cells[:, :4])


# ----------------------------------------------------------------------------- ragged vision counts
# A dynamic-resolution teacher (Qwen2.5-VL) gives each image its own N_v; batches pad the
# vision columns and tokens to the largest and pass a mask. Reference: each sample alone,
# unpadded, combined with the weights the term's mean gives it.


def _ragged(lengths, lq=5, h_s=2, h_t=3, d_s=4, d_t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, nv = len(lengths), max(lengths)
    mask = torch.arange(nv)[None, :] < torch.tensor(lengths)[:, None]
    rows = torch.rand(b, lq, generator=g) > 0.3
    rows[:, 0] = True

    def block(h):
        x = torch.rand(b, h, lq, nv, generator=g, dtype=torch.float64) / nv
        return torch.where(mask[:, None, None, :], x, torch.full_like(x, float("nan")))  # padding: anything

    feats = (torch.randn(b, nv, d_s, generator=g, dtype=torch.float64),
             torch.randn(b, nv, d_t, generator=g, dtype=torch.float64))
    focus = torch.rand(b, nv, generator=g, dtype=torch.float64)
    return mask, rows, block(h_s), block(h_t), feats, focus


@pytest.mark.parametrize("variant", ["mix_mse", "mix_kl", "mean"])
def test_padded_vision_columns_do_not_change_the_attention_loss(variant):
    lengths = [4, 7, 2]
    mask, rows, student, teacher, _, _ = _ragged(lengths)
    student, teacher = student.nan_to_num(0.0), teacher.nan_to_num(0.0)  # the tap and the cache pad with zeros
    mixer = HeadMixer(3, 2, convex=variant == "mix_kl")
    with torch.no_grad():
        mixer.weight.copy_(torch.randn(2, 3))

    def term(s, t, q, cols=None):
        if variant == "mix_mse":
            return attn_loss_mix_mse(s, t, q, mixer, vision_mask=cols)
        if variant == "mix_kl":
            return attn_loss_mix_kl(s, t, q, mixer, vision_mask=cols)
        return attn_loss_mean(s, t, q, vision_mask=cols)

    padded = term(student, teacher, rows, mask)
    parts, weights = [], []
    for b, n in enumerate(lengths):
        parts.append(term(student[b : b + 1, ..., :n], teacher[b : b + 1, ..., :n], rows[b : b + 1]))
        # mix_mse averages over rows x heads x columns, the KL variants over rows (x heads)
        weights.append(int(rows[b].sum()) * (n if variant == "mix_mse" else 1))
    expected = sum(p * w for p, w in zip(parts, weights)) / sum(weights)
    torch.testing.assert_close(padded, expected)
    if variant == "mix_mse":  # without the mask the zero columns would count in the mean
        assert not torch.allclose(term(student, teacher, rows), expected)


@pytest.mark.parametrize("placement", ["student", "teacher"])
def test_padded_vision_tokens_do_not_change_the_vision_losses(placement):
    lengths = [4, 7, 2]
    mask, _, _, _, (s_feats, t_feats), focus = _ragged(lengths)
    adapter = VisionAdapter(6, 4, side=placement).double()
    k = 3
    padded_all = vision_all_loss(s_feats, t_feats, adapter, token_mask=mask)
    padded_focus = vision_focus_loss(s_feats, t_feats, adapter, focus, k, token_mask=mask)
    alls, focuses, counts = [], [], []
    for b, n in enumerate(lengths):
        s, t, f = s_feats[b : b + 1, :n], t_feats[b : b + 1, :n], focus[b : b + 1, :n]
        alls.append(vision_all_loss(s, t, adapter) * n)
        focuses.append(vision_focus_loss(s, t, adapter, f, min(k, n)) * min(k, n))  # fewer than k: all of its own
        counts.append((n, min(k, n)))
    torch.testing.assert_close(padded_all, sum(alls) / sum(n for n, _ in counts))
    torch.testing.assert_close(padded_focus, sum(focuses) / sum(m for _, m in counts))
    # the padding really is excluded: garbage there changes nothing
    noisy = s_feats.masked_fill(~mask[..., None], 1e6)
    torch.testing.assert_close(vision_all_loss(noisy, t_feats, adapter, token_mask=mask), padded_all)
    torch.testing.assert_close(vision_focus_loss(noisy, t_feats, adapter, focus, k, token_mask=mask), padded_focus)
