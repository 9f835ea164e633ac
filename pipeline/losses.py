"""The Align-KD loss terms (ALIGN_KD.md, "Loss terms"), one function each.

    L = L_sup + w_logit L_logit + w_attn L_attn + w_vall L_V_all + w_vfocus L_V_focus

    adapters = AlignKDAdapters(teacher_heads=32, student_heads=16, teacher_width=4096, student_width=2048,
                               mixer_convex=True, vision_placement="student")
    optim = torch.optim.AdamW([*student.parameters(), *adapters.trainable()])   # adapters too!
    loss = (sup_loss(logits, targets)
            + w_logit * logit_kl(logits, top_ids, top_logprobs, tail_logmass)
            + w_attn * attn_loss_mix_kl(s_block, t_block, query_mask, adapters.head_mixer)
            + w_vall * vision_all_loss(s_feats, t_feats, adapters.vision_adapter, image_mask)
            + w_vfocus * vision_focus_loss(s_feats, t_feats, adapters.vision_adapter, focus, 16, image_mask))

Every function here is pure PyTorch (no other alignkd module is imported), so any trainer can
use it. Conventions shared by all terms:

* The teacher side is a constant: it comes from the offline cache and is `.detach()`ed here,
  so passing a live teacher tensor never builds a graph through the teacher.
* Each term returns a scalar tensor, the mean over the valid elements its docstring names.
  Computation runs in float32 at least (float64 stays float64), whatever the inputs' dtype.
* A batch with nothing valid for a term (no response position, no real text query, no image)
  gives 0.0 connected to the student's graph, never NaN, so `backward()` and DDP stay happy.
* Wrong shapes raise ValueError with one line naming the argument and the shapes seen.

The attention terms take the text-query x vision-key block A[:, Q, V] of the first decoder
layer: rows are text positions after the image block, columns are the N_v vision keys. The
released code selected vision queries x text keys instead, a block the causal mask zeroes, so
its attention loss never sent a gradient (ALIGN_KD.md, known defect 1); nothing here accepts
that block, and `alignkd.models.tap` builds the right one. Its adapters were also never put in
the optimizer (defect 2): here whether each adapter trains, and on which side of the MSE the
vision adapter sits, is a stated choice (`AlignKDAdapters`, ALIGN_KD.md "What the released code
really optimised"), and the adapters are checkpointed with the student.

Run the reference tests with `.venv/bin/python -m pytest tests/test_losses.py -q`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "sup_loss",
    "logit_kl",
    "HeadMixer",
    "attn_loss_mix_mse",
    "attn_loss_mix_kl",
    "attn_loss_mean",
    "VISION_PLACEMENTS",
    "VisionAdapter",
    "vision_target",
    "vision_all_loss",
    "vision_focus_loss",
    "vision_spread",
    "AlignKDAdapters",
    "focus_scores",
    "grounding_loss",
]


# ----------------------------------------------------------------------------- helpers


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 at least; float64 if any input is float64 (the reference tests use it)."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_mask(mask: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    _require(mask.dtype == torch.bool, f"{name}: expected a bool tensor, got dtype {mask.dtype}")
    _require(_shape(mask) == shape, f"{name}: expected shape {shape}, got {_shape(mask)}")


def _zero(*anchors: torch.Tensor | None) -> torch.Tensor:
    """0.0 that still has a (zero) gradient path to every anchor that needs one."""
    total = None
    for a in anchors:
        if a is None:
            continue
        term = a.sum() * 0.0
        total = term if total is None else total + term.to(total.dtype)
    assert total is not None
    return total


# ----------------------------------------------------------------------------- L_sup


def sup_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_sup: the student's cross-entropy on the response positions R.

    logits  (N_R, V)  student next-token logits, already gathered at the N_R response
                      positions of the batch (no padding, no prompt, no vision rows)
    targets (N_R,)    long, the token each of those positions must produce, in [0, V)
    returns ()        mean over the N_R positions; 0.0 when N_R = 0
    """
    _require(logits.dim() == 2, f"logits: expected (N_R, V), got {_shape(logits)}")
    _require(
        targets.dim() == 1 and targets.shape[0] == logits.shape[0],
        f"targets: expected (N_R,) with N_R = {logits.shape[0]} from logits {_shape(logits)}, got {_shape(targets)}",
    )
    _require(not targets.is_floating_point(), f"targets: expected integer token ids, got dtype {targets.dtype}")
    if logits.shape[0] == 0:
        return _zero(logits)
    # No ignore_index: the caller gathered R already, so a -100 here would be a bug upstream.
    _require(
        int(targets.min()) >= 0 and int(targets.max()) < logits.shape[1],
        f"targets: ids must lie in [0, {logits.shape[1]}), got range [{int(targets.min())}, {int(targets.max())}]",
    )
    return F.cross_entropy(logits.to(_compute_dtype(logits)), targets.long(), reduction="mean")


# ----------------------------------------------------------------------------- L_logit


def _student_bin_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(N, V) logits, (N, k) ids -> (N, k + 1) log-probs: the k tokens, then the tail bin.

    The tail is log(1 - sum_k p), computed as logsumexp over the logits NOT in the top k minus
    logsumexp over all of them. log1p(-exp(x)) would lose everything when the top k hold
    nearly all the mass (1 - p rounds to 0 and the log to -inf).
    """
    lse_all = torch.logsumexp(logits, dim=-1)
    top = logits.gather(-1, ids) - lse_all[:, None]
    in_top = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids, True)
    # With k = V every logit is masked and the tail is exactly -inf; masked_fill passes no
    # gradient through masked entries, so that empty bin cannot send NaN back.
    tail = torch.logsumexp(logits.masked_fill(in_top, float("-inf")), dim=-1) - lse_all
    return torch.cat([top, tail[:, None]], dim=-1)


def _kl_bins(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_bins p (log p - log q) per row, for (N, K) log-probs; (N,).

    Bins where p = 0 contribute 0 (the xlogy convention) and are kept out of the graph's
    arithmetic so no 0 * inf = NaN appears in the value or the gradient. A bin where q = 0 but
    p > 0 would make the KL infinite; q's -inf there is replaced by the log of the smallest
    normal number of the dtype (about -87 in float32), i.e. "as unlikely as the dtype can say",
    which keeps the loss finite. That only happens when the cache says the teacher's tail is
    exactly empty while the student's is not (k < V, float32 rounding), under reverse KL.
    """
    floor = math.log(torch.finfo(log_q.dtype).tiny)
    log_q = torch.where(torch.isneginf(log_q), torch.full_like(log_q, floor), log_q)
    p = log_p.exp()
    live = p > 0
    safe_log_p = torch.where(live, log_p, torch.zeros_like(log_p))
    safe_log_q = torch.where(live, log_q, torch.zeros_like(log_q))
    terms = torch.where(live, p * (safe_log_p - safe_log_q), torch.zeros_like(p))
    return terms.sum(dim=-1)


def logit_kl(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_logmass: torch.Tensor,
    *,
    direction: str = "forward",
    temperature: float = 1.0,
) -> torch.Tensor:
    """L_logit: KL between teacher and student next-token distributions on R, over k + 1 bins.

    student_logits        (N_R, V)  student logits at the N_R response positions
    teacher_topk_ids      (N_R, k)  long, the teacher's k most likely tokens (cached, distinct)
    teacher_topk_logprobs (N_R, k)  their teacher log-probs (log-softmax over the full vocab)
    teacher_tail_logmass  (N_R,)    log(1 - sum of those k probs); -inf when the top k hold all
                                    the mass (e.g. k = V)
    direction             "forward" = KL(teacher || student) = sum_bins p_T (log p_T - log p_S),
                          the default; "reverse" = KL(student || teacher), the figure's RKLD
    temperature           T > 0; see below
    returns ()            mean over the N_R positions; 0.0 when N_R = 0

    The bins are the teacher's k tokens plus one tail bin holding the remaining mass of each
    side: for the student, its log-softmax at the k ids and log(1 - their summed probability),
    computed stably. With k = V the tail is empty on both sides and the value is exactly the
    full-vocabulary KL; with k < V it is the KL of the two merged (k + 1)-bin distributions,
    which at T = 1 is a lower bound of the full KL (merging bins never increases a KL).

    Temperature: the student's logits are divided by T before the softmax; the teacher's
    cached bin log-probs are divided by T and renormalised over the k + 1 bins. That is exact
    when k = V. When k < V the tail bin is treated as one token of log-prob
    `teacher_tail_logmass` (the tail's individual logits are not cached), while the student's
    tail is the true tempered mass of its non-top-k tokens. The loss is multiplied by T^2
    (Hinton et al., 2015) so its gradients keep the same scale as T changes. The method uses
    T = 1.
    """
    _require(direction in ("forward", "reverse"), f"direction: expected 'forward' or 'reverse', got {direction!r}")
    _require(
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0,
        f"temperature: expected a finite number > 0, got {temperature!r}",
    )
    _require(student_logits.dim() == 2, f"student_logits: expected (N_R, V), got {_shape(student_logits)}")
    n, vocab = student_logits.shape
    _require(
        teacher_topk_ids.dim() == 2 and teacher_topk_ids.shape[0] == n and 1 <= teacher_topk_ids.shape[1] <= vocab,
        f"teacher_topk_ids: expected (N_R, k) with N_R = {n}, 1 <= k <= V = {vocab}, got {_shape(teacher_topk_ids)}",
    )
    _require(
        not teacher_topk_ids.is_floating_point(),
        f"teacher_topk_ids: expected integer token ids, got dtype {teacher_topk_ids.dtype}",
    )
    _require(
        _shape(teacher_topk_logprobs) == _shape(teacher_topk_ids),
        f"teacher_topk_logprobs: expected {_shape(teacher_topk_ids)} like teacher_topk_ids, "
        f"got {_shape(teacher_topk_logprobs)}",
    )
    _require(
        _shape(teacher_tail_logmass) == (n,),
        f"teacher_tail_logmass: expected (N_R,) = ({n},), got {_shape(teacher_tail_logmass)}",
    )
    if n == 0:
        return _zero(student_logits)
    ids = teacher_topk_ids.long()
    _require(
        int(ids.min()) >= 0 and int(ids.max()) < vocab,
        f"teacher_topk_ids: ids must lie in [0, {vocab}), got range [{int(ids.min())}, {int(ids.max())}]",
    )

    dtype = _compute_dtype(student_logits, teacher_topk_logprobs)
    log_s = _student_bin_logprobs(student_logits.to(dtype) / temperature, ids)
    t_bins = torch.cat([teacher_topk_logprobs.detach().to(dtype), teacher_tail_logmass.detach().to(dtype)[:, None]], -1)
    # Renormalising also absorbs the float32 rounding of the cached tail at T = 1.
    log_t = torch.log_softmax(t_bins / temperature, dim=-1)

    per_position = _kl_bins(log_t, log_s) if direction == "forward" else _kl_bins(log_s, log_t)
    return per_position.mean() * (temperature**2)


# ----------------------------------------------------------------------------- L_attn


class HeadMixer(nn.Module):
    """The 1x1 head mixer of L_attn's `mix_*` variants: H_T teacher heads -> H_S.

    A linear map over the head axis, (B, H_T, Lq, Nv) -> (B, H_S, Lq, Nv):
    mixed[b, s] = sum_h mixing[s, h] * teacher[b, h].

    convex=False (`mix_mse`, the paper's form): `mixing` is the weight itself, any sign.
    convex=True (`mix_kl`): `mixing` is softmax(weight) over the teacher heads, so each mixed
    head is a convex combination of teacher attention maps, non-negative and a valid input to
    a KL after renormalisation.

    No bias: a bias would add the same constant to every attention probability of a head
    whatever the teacher attends to, a free knob that can fit the student's average attention
    level without carrying any teacher information.

    Initialisation (`init`):
      "mean"   every teacher head weighted 1 / H_T (weight 1 / H_T, or 0 before the softmax
               when convex): training starts from the target the `mean` variant uses, and the
               heads tell apart as the student's heads pull their rows apart;
      "random" uniform in +-1/sqrt(H_T), torch's default for the released code's
               Conv2d(H_T, H_S, 1): with the mixer frozen (`loss.head_mixer = "frozen"`) this is
               the fixed random mix the released code effectively ran.
    """

    def __init__(self, teacher_heads: int, student_heads: int, *, convex: bool = False,
                 init: str = "mean") -> None:
        super().__init__()
        _require(
            teacher_heads >= 1 and student_heads >= 1,
            f"HeadMixer: head counts must be >= 1, got teacher_heads={teacher_heads}, student_heads={student_heads}",
        )
        _require(init in ("mean", "random"), f"HeadMixer: init must be 'mean' or 'random', got {init!r}")
        self.teacher_heads = teacher_heads
        self.student_heads = student_heads
        self.convex = convex
        if init == "mean":
            start = torch.full((student_heads, teacher_heads), 0.0 if convex else 1.0 / teacher_heads)
        else:
            bound = 1.0 / math.sqrt(teacher_heads)
            start = torch.empty(student_heads, teacher_heads).uniform_(-bound, bound)
        self.weight = nn.Parameter(start)

    def mixing(self, dtype: torch.dtype) -> torch.Tensor:
        """The (H_S, H_T) matrix applied to the teacher's heads."""
        w = self.weight.to(dtype)
        return torch.softmax(w, dim=1) if self.convex else w

    def forward(self, teacher: torch.Tensor) -> torch.Tensor:
        """(B, H_T, Lq, Nv) -> (B, H_S, Lq, Nv), computed in the input's dtype."""
        _require(
            teacher.dim() == 4 and teacher.shape[1] == self.teacher_heads,
            f"teacher: expected (B, H_T={self.teacher_heads}, Lq, Nv), got {_shape(teacher)}",
        )
        return torch.einsum("sh,bhqv->bsqv", self.mixing(teacher.dtype), teacher)

    def extra_repr(self) -> str:
        return f"teacher_heads={self.teacher_heads}, student_heads={self.student_heads}, convex={self.convex}"


def _check_block(x: torch.Tensor, name: str, heads: str) -> None:
    _require(x.dim() == 4, f"{name}: expected (B, {heads}, Lq, Nv), got {_shape(x)}")


def _vision_columns(vision_mask: torch.Tensor | None, query_mask: torch.Tensor, nv: int) -> torch.Tensor | None:
    """(B, Nv) column mask -> (rows, Nv), one per real query row (None: every column is real)."""
    if vision_mask is None:
        return None
    b, lq = query_mask.shape
    _check_mask(vision_mask, "vision_mask", (b, nv))
    return vision_mask[:, None, :].expand(b, lq, nv)[query_mask]


def _mixed_rows(
    student: torch.Tensor, teacher: torch.Tensor, query_mask: torch.Tensor, mixer: HeadMixer,
    vision_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """Checked shapes -> (student rows, mixed teacher rows), each (rows, H_S, Nv) over the real
    query rows only, with their (rows, Nv) real columns (None: all); None when the batch has
    no real row. Padded columns are zeroed on both sides."""
    _check_block(student, "student", "H_S")
    _check_block(teacher, "teacher", "H_T")
    b, h_s, lq, nv = student.shape
    _require(
        teacher.shape[0] == b and teacher.shape[2:] == (lq, nv),
        f"teacher: expected (B={b}, H_T, Lq={lq}, Nv={nv}) like student {_shape(student)}, got {_shape(teacher)}",
    )
    _require(
        mixer.teacher_heads == teacher.shape[1] and mixer.student_heads == h_s,
        f"mixer: maps {mixer.teacher_heads} -> {mixer.student_heads} heads, but teacher {_shape(teacher)} "
        f"and student {_shape(student)}",
    )
    _check_mask(query_mask, "query_mask", (b, lq))
    if not bool(query_mask.any()):
        return None
    dtype = _compute_dtype(student)
    # (B, H, Lq, Nv) -> (rows, H, Nv): keep only the real query rows, so whatever the padded
    # rows hold (even NaN) cannot leak in.
    s_rows = student.to(dtype).transpose(1, 2)[query_mask]
    t_rows = teacher.detach().to(dtype).transpose(1, 2)[query_mask]
    cols = _vision_columns(vision_mask, query_mask, nv)
    if cols is not None:  # where, not a multiply: padding may hold anything
        s_rows = torch.where(cols[:, None, :], s_rows, torch.zeros_like(s_rows))
        t_rows = torch.where(cols[:, None, :], t_rows, torch.zeros_like(t_rows))
    return s_rows, torch.einsum("sh,rhv->rsv", mixer.mixing(dtype), t_rows), cols


def attn_loss_mix_mse(
    student: torch.Tensor, teacher: torch.Tensor, query_mask: torch.Tensor, mixer: HeadMixer,
    vision_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_attn, `mix_mse` variant (the paper's form): MSE between the student's block and the
    head-mixed teacher block, on the raw probabilities.

    student    (B, H_S, Lq, Nv)  student layer-0 attention probs, text queries x vision keys
    teacher    (B, H_T, Lq, Nv)  the teacher's block (detached here)
    query_mask (B, Lq)           bool, True on real text-query rows (the set Q), False on padding
    mixer      HeadMixer         H_T -> H_S (convex or not)
    vision_mask (B, Nv) bool or None: each sample's real vision columns when counts differ per
                                 image (padded to the batch's largest); None: all are real
    returns    ()                mean of (student - mixer(teacher))^2 over H_S x real rows x
                                 real columns; 0.0 when the batch has no real row

    Each row spreads its probability over all T keys, so entries are of order 1/T and this
    value is ~1e-5 at weight 1 (ALIGN_KD.md, "What the released code really optimised"):
    kept for the paper's ablation, not as the default. Gradient reaches the student block and
    the mixer's weights, never the teacher.
    """
    rows = _mixed_rows(student, teacher, query_mask, mixer, vision_mask)
    if rows is None:
        return _zero(student, mixer.weight)
    s_rows, mixed, cols = rows
    if cols is None:
        return F.mse_loss(s_rows, mixed, reduction="mean")
    # padded columns are zero on both sides: they add nothing to the sum, and are not counted
    return (s_rows - mixed).square().sum() / (cols.sum() * s_rows.shape[1]).clamp_min(1)


def attn_loss_mix_kl(
    student: torch.Tensor, teacher: torch.Tensor, query_mask: torch.Tensor, mixer: HeadMixer, eps: float = 1e-8,
    vision_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_attn, `mix_kl` variant: per student head, KL(mixed teacher || student) of the rows
    renormalised over the vision keys.

    student    (B, H_S, Lq, Nv)  student layer-0 attention probs, text queries x vision keys
    teacher    (B, H_T, Lq, Nv)  the teacher's block (detached here)
    query_mask (B, Lq)           bool, True on real text-query rows (Q)
    mixer      HeadMixer         H_T -> H_S with convex=True (mixed rows stay non-negative)
    eps        as in `attn_loss_mean`
    vision_mask (B, Nv) bool or None: real vision columns (as in `attn_loss_mix_mse`); padded
               ones are zeroed on both sides, so they carry no probability and add 0
    returns    ()                mean over H_S x real rows of
                                 sum_j p_T[j] (log(p_T[j] + eps) - log(p_S[j] + eps));
                                 0.0 when the batch has no real row

    Where each student head looks among the image tokens, against the mix of teacher heads
    its mixer row picks: the `mean` variant's scale-free comparison, kept per head as the
    `mix` form intends. Values are O(0.1-1) nats whatever the sequence length, so weight 1 is
    comparable with L_sup, where the raw MSE is ~1e-5.
    """
    _require(mixer.convex, "mixer: attn_loss_mix_kl needs a convex HeadMixer (convex=True), whose rows stay >= 0")
    rows = _mixed_rows(student, teacher, query_mask, mixer, vision_mask)
    if rows is None:
        return _zero(student, mixer.weight)
    s_rows, mixed, _ = rows
    return _vision_row_kl(mixed, s_rows, eps).mean()


def _vision_row_kl(teacher_rows: torch.Tensor, student_rows: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., Nv) unnormalised vision rows of each side -> (...,) KL(teacher || student) after
    dividing each row by its vision sum (clamped at eps, so an empty row gives zeros, not NaN).
    eps inside the logs keeps the KL and its gradient finite when the student puts ~0 on a
    token the teacher looks at (a clamp there would zero that gradient instead)."""
    p_s = student_rows / student_rows.sum(dim=-1, keepdim=True).clamp_min(eps)
    p_t = teacher_rows / teacher_rows.sum(dim=-1, keepdim=True).clamp_min(eps)
    return (p_t * (torch.log(p_t + eps) - torch.log(p_s + eps))).sum(dim=-1)


def attn_loss_mean(
    student: torch.Tensor, teacher: torch.Tensor, query_mask: torch.Tensor, eps: float = 1e-8,
    vision_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_attn, `mean` variant: KL(teacher || student) of head-mean rows renormalised over V.

    student    (B, H_S, Lq, Nv)               student layer-0 attention probs, text x vision
    teacher    (B, H_T, Lq, Nv) or (B, Lq, Nv) the teacher's block, or its head mean when the
                                              cache holds only that (detached here)
    query_mask (B, Lq)                        bool, True on real text-query rows (Q)
    eps        small constant (see `_vision_row_kl`)
    vision_mask (B, Nv) bool or None           real vision columns (as in `attn_loss_mix_kl`)
    returns    ()                             mean over real rows of
                                              sum_j p_T[j] (log(p_T[j] + eps) - log(p_S[j] + eps));
                                              0.0 when the batch has no real row

    The rows are softmax probabilities over ALL keys, so their vision part sums to less than
    one; each side's head-mean row is divided by its vision sum to compare where each model
    looks among the image tokens, not how much.
    """
    _check_block(student, "student", "H_S")
    b, _, lq, nv = student.shape
    _require(
        teacher.dim() in (3, 4) and teacher.shape[0] == b and teacher.shape[-2:] == (lq, nv),
        f"teacher: expected (B={b}, H_T, Lq={lq}, Nv={nv}) or (B, Lq, Nv) like student {_shape(student)}, "
        f"got {_shape(teacher)}",
    )
    _check_mask(query_mask, "query_mask", (b, lq))
    if not bool(query_mask.any()):
        return _zero(student)

    dtype = _compute_dtype(student)
    s_rows = student.to(dtype).mean(dim=1)[query_mask]  # (rows, Nv)
    t_mean = teacher.detach().to(dtype)
    t_rows = (t_mean.mean(dim=1) if teacher.dim() == 4 else t_mean)[query_mask]
    cols = _vision_columns(vision_mask, query_mask, nv)
    if cols is not None:
        s_rows = torch.where(cols, s_rows, torch.zeros_like(s_rows))
        t_rows = torch.where(cols, t_rows, torch.zeros_like(t_rows))
    return _vision_row_kl(t_rows, s_rows, eps).mean()


def grounding_loss(block: torch.Tensor, rows: torch.Tensor, cells: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Not an Align-KD term: supervision that teaches a model WHERE to look, used only to train
    the demo's teacher (whose shallow-layer alignment a 7B teacher gets from scale).

    block  (B, H, Lq, Nv)  attention probs, text x vision, of the tapped layer
    rows   (B, Lq)         bool, the question's key-word rows
    cells  (B, Nv)         bool, the vision tokens that answer it
    returns ()             mean over samples with both of -log(share of the head- and
                           row-mean vision attention that falls on `cells`); 0.0 if none
    """
    _check_block(block, "block", "H")
    b, _, lq, nv = block.shape
    _check_mask(rows, "rows", (b, lq))
    _check_mask(cells, "cells", (b, nv))
    used = rows.any(1) & cells.any(1)
    if not bool(used.any()):
        return _zero(block)
    dtype = _compute_dtype(block)
    heads = block.to(dtype).mean(dim=1)  # (B, Lq, Nv)
    picked = (heads * rows[..., None]).sum(1) / rows.sum(1, keepdim=True).clamp_min(1)  # (B, Nv)
    share = (picked * cells).sum(-1) / picked.sum(-1).clamp_min(eps)
    return -torch.log(share[used] + eps).mean()


def focus_scores(teacher_block: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """The text focus of each vision token: focus_j = sum_{i in Q} mean_h A^T[h, i, j].

    teacher_block (B, H_T, Lq, Nv) or (B, Lq, Nv)  teacher block (or its head mean)
    query_mask    (B, Lq)                          bool, True on real text-query rows
    returns       (B, Nv)                          detached scores; all zeros for a sample
                                                   without real rows

    For callers that have the block but not the cached scores (the extractor caches them).
    """
    _require(
        teacher_block.dim() in (3, 4),
        f"teacher_block: expected (B, H_T, Lq, Nv) or (B, Lq, Nv), got {_shape(teacher_block)}",
    )
    b, lq = teacher_block.shape[0], teacher_block.shape[-2]
    _check_mask(query_mask, "query_mask", (b, lq))
    block = teacher_block.detach().to(_compute_dtype(teacher_block))
    rows = block.mean(dim=1) if block.dim() == 4 else block
    # where, not a multiply: padded rows may hold anything, NaN included.
    return torch.where(query_mask[..., None], rows, torch.zeros_like(rows)).sum(dim=1)


# ----------------------------------------------------------------------------- L_V


VISION_PLACEMENTS = ("student", "teacher_frozen", "teacher")


class VisionAdapter(nn.Linear):
    """The L_V adapter, a Linear with bias on one side of the MSE (`loss.vision_adapter`):

    side="teacher"  Linear(D_T -> D_S) on the teacher's projector output P^T (B, Nv, D_T),
                    compared with the student's P^S: the figure's Adapter(P^T). Trained with
                    the student ("teacher") it has a trivial joint minimum (weight 0, a
                    constant bias, every student token equal to it) that training finds;
                    frozen at its seeded init ("teacher_frozen", what the released code
                    effectively ran) its target is a fixed random projection, which cannot move.
    side="student"  Linear(D_S -> D_T) on the student's P^S, compared with the fixed P^T (a
                    FitNets regressor): the target never moves, so the loss can only fall by
                    making the student's tokens carry what the teacher's carry.

    The bias is kept (unlike the head mixer's): the two models' embedding spaces can differ by
    an offset, which a plain linear map could not absorb. nn.Linear's default init, drawn from
    torch's global generator (the trainer seeds it from run.seed).
    """

    def __init__(self, teacher_width: int, student_width: int, *, side: str = "teacher") -> None:
        _require(
            teacher_width >= 1 and student_width >= 1,
            f"VisionAdapter: widths must be >= 1, got teacher_width={teacher_width}, student_width={student_width}",
        )
        _require(side in ("teacher", "student"), f"VisionAdapter: side must be 'teacher' or 'student', got {side!r}")
        self.side = side
        self.teacher_width, self.student_width = teacher_width, student_width
        if side == "teacher":
            super().__init__(teacher_width, student_width, bias=True)
        else:
            super().__init__(student_width, teacher_width, bias=True)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features), computed in the input's dtype."""
        which = "teacher_feats" if self.side == "teacher" else "student_feats"
        width = "D_T" if self.side == "teacher" else "D_S"
        _require(
            feats.shape[-1:] == (self.in_features,),
            f"{which}: expected (..., {width}={self.in_features}), got {_shape(feats)}",
        )
        return F.linear(feats, self.weight.to(feats.dtype), self.bias.to(feats.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, side={self.side}"


def _check_feats(
    student_feats: torch.Tensor, teacher_feats: torch.Tensor, adapter: VisionAdapter, image_mask: torch.Tensor | None,
    token_mask: torch.Tensor | None = None,
) -> None:
    _require(student_feats.dim() == 3, f"student_feats: expected (B, Nv, D_S), got {_shape(student_feats)}")
    b, nv, d_s = student_feats.shape
    _require(
        teacher_feats.dim() == 3 and teacher_feats.shape[:2] == (b, nv),
        f"teacher_feats: expected (B={b}, Nv={nv}, D_T) like student_feats {_shape(student_feats)}, "
        f"got {_shape(teacher_feats)}",
    )
    _require(
        adapter.teacher_width == teacher_feats.shape[2] and adapter.student_width == d_s,
        f"adapter: joins D_T={adapter.teacher_width} and D_S={adapter.student_width}, but teacher_feats "
        f"{_shape(teacher_feats)} and student_feats {_shape(student_feats)}",
    )
    if image_mask is not None:
        _check_mask(image_mask, "image_mask", (b,))
    if token_mask is not None:
        _check_mask(token_mask, "token_mask", (b, nv))


def vision_target(teacher_feats: torch.Tensor, adapter: VisionAdapter, normalize: bool = False) -> torch.Tensor:
    """What the L_V MSE holds the student to, from P^T (B, Nv, D_T): Adapter(P^T) (B, Nv, D_S)
    for a teacher-side adapter, P^T itself for a student-side regressor; with `normalize`,
    each token standardised over its channels (zero mean, unit variance, no affine), so the
    target's scale is fixed whatever the teacher's feature norm. Float32 at least; the
    teacher is detached, a teacher-side adapter is not."""
    t = teacher_feats.detach().to(_compute_dtype(teacher_feats))
    target = adapter(t) if adapter.side == "teacher" else t
    return F.layer_norm(target, target.shape[-1:]) if normalize else target


def vision_all_loss(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    adapter: VisionAdapter,
    image_mask: torch.Tensor | None = None,
    *,
    normalize_target: bool = False,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_V_all: the MSE between the two models' vision tokens over all Nv of them,
    MSE(Adapter(P^T), P^S) or, with a student-side adapter, MSE(Regressor(P^S), P^T).

    student_feats    (B, Nv, D_S)  P^S, the student's projector output
    teacher_feats    (B, Nv, D_T)  P^T, the teacher's (detached here)
    adapter          VisionAdapter on either side (see its docstring)
    image_mask       (B,) bool or None: which samples have an image (None = all). Samples
                     without one are dropped, whatever their rows hold.
    normalize_target standardise each target token first (`vision_target`)
    token_mask       (B, Nv) bool or None: each sample's real tokens when counts differ per
                     image (dynamic resolution, padded to the batch's largest); None: all real
    returns          ()  mean over the real tokens of the samples with image x (the compared
                     width: D_S for a teacher-side adapter, D_T for a student-side one); 0.0
                     when none has an image

    Gradient reaches the student features and the adapter (when it requires grad), never the
    teacher.
    """
    _check_feats(student_feats, teacher_feats, adapter, image_mask, token_mask)
    return _vision_mse(student_feats, teacher_feats, adapter, image_mask, normalize_target, token_mask)


def vision_focus_loss(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    adapter: VisionAdapter,
    focus: torch.Tensor,
    k: int,
    image_mask: torch.Tensor | None = None,
    *,
    normalize_target: bool = False,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_V_focus: the L_V_all MSE over each sample's k vision tokens of highest text focus.

    student_feats, teacher_feats, adapter, image_mask, normalize_target, token_mask: as in
                  `vision_all_loss`
    focus         (B, Nv)  the teacher's focus_j = sum_{i in Q} mean_h A^T[h, i, j]
                  (cached, or from `focus_scores`)
    k             1 <= k <= Nv tokens per sample (the method's default is 16); ties are
                  broken as torch.topk breaks them; a sample with fewer than k real tokens
                  (token_mask) takes all of its own
    returns       ()  mean over (samples with image) x k x the compared width; 0.0 when none
                  has an image
    """
    _check_feats(student_feats, teacher_feats, adapter, image_mask, token_mask)
    b, nv, _ = student_feats.shape
    _require(_shape(focus) == (b, nv), f"focus: expected (B, Nv) = ({b}, {nv}), got {_shape(focus)}")
    _require(
        isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= nv,
        f"k: expected an int in [1, Nv={nv}], got {k!r}",
    )
    scores = focus.detach()
    if token_mask is not None:  # padded tokens rank last; picked anyway, they are masked out below
        scores = scores.masked_fill(~token_mask, float("-inf"))
    top = scores.topk(k, dim=-1).indices  # (B, k)
    s_top = student_feats.gather(1, top[..., None].expand(-1, -1, student_feats.shape[2]))
    t_top = teacher_feats.gather(1, top[..., None].expand(-1, -1, teacher_feats.shape[2]))
    picked = token_mask.gather(1, top) if token_mask is not None else None
    return _vision_mse(s_top, t_top, adapter, image_mask, normalize_target, picked)


def _vision_mse(
    student_feats: torch.Tensor, teacher_feats: torch.Tensor, adapter: VisionAdapter,
    image_mask: torch.Tensor | None, normalize_target: bool, token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    if image_mask is not None:
        if not bool(image_mask.any()):
            return _zero(student_feats, adapter.weight, adapter.bias)
        student_feats, teacher_feats = student_feats[image_mask], teacher_feats[image_mask]
        token_mask = token_mask[image_mask] if token_mask is not None else None
    if token_mask is not None:  # (B, Nv, D) -> (real tokens, D)
        student_feats, teacher_feats = student_feats[token_mask], teacher_feats[token_mask]
    if student_feats.numel() == 0:  # B = 0
        return _zero(student_feats, adapter.weight, adapter.bias)
    dtype = _compute_dtype(student_feats)
    target = vision_target(teacher_feats, adapter, normalize_target).to(dtype)
    student = student_feats.to(dtype)
    predicted = adapter(student) if adapter.side == "student" else student
    return F.mse_loss(predicted, target, reduction="mean")


def vision_spread(tokens: torch.Tensor) -> float:
    """How much vision tokens vary across images: the standard deviation over the batch of
    each (token, channel) entry, averaged. tokens (B, Nv, D), B >= 2; a projector whose output
    no longer depends on the image has spread 0. A diagnostic, not a loss."""
    _require(tokens.dim() == 3 and tokens.shape[0] >= 2, f"tokens: expected (B >= 2, Nv, D), got {_shape(tokens)}")
    return float(tokens.detach().float().std(dim=0).mean())


# ----------------------------------------------------------------------------- adapters


class AlignKDAdapters(nn.Module):
    """The parts Align-KD adds beside the student: the L_attn head mixer and the L_V adapter.

        adapters = AlignKDAdapters(teacher_heads=32, student_heads=16,     # None: no mixer
                                   teacher_width=4096, student_width=2048,  # None: no adapter
                                   mixer_convex=True, head_mixer="trained", vision_adapter="student")

    head_mixer      HeadMixer(H_T -> H_S) or None (no `mix_*` L_attn variant is on);
                    "trained": head-mean init, trained with the student; "frozen": the
                    released code's seeded random init, never trained
    vision_adapter  VisionAdapter or None (L_V_all and L_V_focus are off), placed as
                    `vision_placement` says: "student" (a regressor D_S -> D_T on the student,
                    trained), "teacher_frozen" (D_T -> D_S on the teacher, never trained) or
                    "teacher" (D_T -> D_S on the teacher, trained: collapses, see VisionAdapter)

    Frozen parts have requires_grad False; `trainable()` lists what goes in the optimizer. All
    of it, frozen or not, lives in the state_dict that the student's checkpoints save, so a
    resumed run continues with the same adapters (a frozen one is part of the run's target);
    none of it is exported: the adapters only exist to compare with the teacher.
    """

    def __init__(
        self,
        *,
        teacher_heads: int | None = None,
        student_heads: int | None = None,
        teacher_width: int | None = None,
        student_width: int | None = None,
        mixer_convex: bool = False,
        head_mixer: str = "trained",
        vision_placement: str = "student",
    ) -> None:
        super().__init__()
        _require(
            (teacher_heads is None) == (student_heads is None),
            f"AlignKDAdapters: give both head counts or neither, got teacher_heads={teacher_heads}, "
            f"student_heads={student_heads}",
        )
        _require(
            (teacher_width is None) == (student_width is None),
            f"AlignKDAdapters: give both widths or neither, got teacher_width={teacher_width}, "
            f"student_width={student_width}",
        )
        _require(head_mixer in ("trained", "frozen"),
                 f"AlignKDAdapters: head_mixer must be 'trained' or 'frozen', got {head_mixer!r}")
        _require(vision_placement in VISION_PLACEMENTS,
                 f"AlignKDAdapters: vision_placement must be one of {VISION_PLACEMENTS}, got {vision_placement!r}")
        self.head_mixer: HeadMixer | None = None
        if teacher_heads is not None and student_heads is not None:
            self.head_mixer = HeadMixer(teacher_heads, student_heads, convex=mixer_convex,
                                        init="mean" if head_mixer == "trained" else "random")
            self.head_mixer.requires_grad_(head_mixer == "trained")
        self.vision_adapter: VisionAdapter | None = None
        if teacher_width is not None and student_width is not None:
            side = "student" if vision_placement == "student" else "teacher"
            self.vision_adapter = VisionAdapter(teacher_width, student_width, side=side)
            self.vision_adapter.requires_grad_(vision_placement != "teacher_frozen")

    def trainable(self) -> list[nn.Parameter]:
        """The parameters the optimizer must get (frozen parts excluded)."""
        return [p for p in self.parameters() if p.requires_grad]
