"""Distillation from cached teacher targets: the teacher's top-k tokens, their log-probabilities and the
log of the mass left outside them, taken once (`teacher_top_k`) and later matched by a student
(`cached_kl`) without the teacher.

Both work on megatron's vocab-parallel logits [..., V_local] (this tensor-parallel rank's slice of the
padded vocabulary, ranks in order; `group=None` or a group of one: the whole vocabulary), in fp32
`chunk_size` tokens at a time, like losses.py. Token ids are global (0 .. padded vocab - 1).

The loss treats the vocabulary as K + 1 bins: each cached token, and "the rest". With p the student's
softmax and t the teacher's, P_j = p(bin j), T_j = t(bin j):
    forward  KL(T || P) = sum_j T_j (log T_j - log P_j),     reverse  KL(P || T) = sum_j P_j (log P_j - log T_j).
With K = the padded vocabulary the rest bin is empty on both sides and this is the full KL of online
distillation. Gradient with respect to the student's scaled logit z_v (v in bin j):
    forward  p_v - T_j p_v / P_j  (= p_v - t_v for a cached token),   reverse  p_v (log P_j - log T_j - KL),
computed in the forward chunk by chunk into one tokens x V_local buffer that the backward only scales (the
fp32 working set beyond it is a few chunk x V_local arrays).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_minitron.distill.losses import (COMPUTE_DTYPE, _all_gather_last, _all_reduce, _default_chunk,
                                              _group_size, _label_logits, _scaled)

NEG_INF = float("-inf")


def _rank(group) -> int:
    return 0 if _group_size(group) == 1 else dist.get_rank(group)


def _local_positions(ids: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the global ids [rows, K] that this rank holds sit in a [rows, width] array of its vocabulary
    slice, as flat positions (row-major, in the order of `ids[mine]`), and `mine`, which of them it holds.
    Indexing the flat view needs no padded copy of a chunk x V_local array."""
    local = ids - start
    mine = (local >= 0) & (local < width)
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(-1)
    return (rows * width + local)[mine], mine


def _row_max(x2d: torch.Tensor, temperature: float, group) -> torch.Tensor:
    return _all_reduce(x2d.amax(-1).to(COMPUTE_DTYPE).div_(temperature), dist.ReduceOp.MAX, group)


# ------------------------------------------------------------------------------------- writing a cache
@torch.no_grad()
def teacher_top_k(teacher_logits: torch.Tensor, *, k: int, group=None, temperature: float = 1.0,
                  chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids int64 [..., k], log-probabilities fp32 [..., k], log of the remaining mass fp32 [...]) of
    softmax(teacher_logits / τ) over the global vocabulary, identical on every rank of `group`.

    The k tokens are ordered by logit, ties by smaller id, so the result does not depend on how the
    vocabulary is split (the global top-k lies within the union of every rank's local top-k, which is
    gathered: N x k values per rank cross the group, never the vocabulary). The remaining mass is summed
    over the tokens not chosen (never 1 - sum, which cancels when the top-k hold nearly everything);
    it is -inf when they hold everything (k = padded vocabulary)."""
    vocab_local, world = teacher_logits.shape[-1], _group_size(group)
    if not 1 <= k <= vocab_local * world:
        raise ValueError(f"k must be in [1, global vocabulary {vocab_local * world}], got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x2d = teacher_logits.reshape(-1, vocab_local)
    chunk, start = chunk_size or _default_chunk(vocab_local, x2d.device), _rank(group) * vocab_local
    ids = torch.empty(x2d.shape[0], k, dtype=torch.int64, device=x2d.device)
    logp = torch.empty(x2d.shape[0], k, dtype=COMPUTE_DTYPE, device=x2d.device)
    log_rest = torch.empty(x2d.shape[0], dtype=COMPUTE_DTYPE, device=x2d.device)
    row_max = _row_max(x2d, temperature, group)
    for i in range(0, x2d.shape[0], chunk):
        rows, m = slice(i, i + chunk), row_max[i:i + chunk].unsqueeze(-1)
        s = _scaled(x2d[rows], temperature)
        values, local = s.topk(min(k, vocab_local), dim=-1)
        all_values, all_ids = _all_gather_last(values, group), _all_gather_last(local + start, group)
        by_id, order = all_ids.sort(-1)  # ties: the smaller id first, then a stable sort by value
        top_values, by_value = all_values.gather(-1, order).sort(dim=-1, descending=True, stable=True)
        ids[rows] = by_id.gather(-1, by_value[:, :k])
        exp = s.sub_(m).exp_()
        total = exp.sum(-1)
        exp.view(-1)[_local_positions(ids[rows], start, vocab_local)[0]] = 0.0
        sums = _all_reduce(torch.stack((total, exp.sum(-1))), dist.ReduceOp.SUM, group).log_()
        lse = m.squeeze(-1) + sums[0]
        logp[rows] = top_values[:, :k] - lse.unsqueeze(-1)
        log_rest[rows] = sums[1] - sums[0]
    shape = teacher_logits.shape[:-1]
    return ids.reshape(*shape, k), logp.reshape(*shape, k), log_rest.reshape(shape)


# ---------------------------------------------------------------------------------- reading a cache
def _support(ids2d: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Where the cached ids [N, K] that this rank holds sit in its [N, width] slice of the logits: `mine`
    [N, K], which of them it holds; `flat`, their flat positions (row-major, in the order of `ids[mine]`);
    `offsets`, N + 1 Python ints, row i's positions being flat[offsets[i]:offsets[i + 1]], so that a chunk
    of rows takes a slice (minus its first row x width) instead of searching again. Indexing the flat view
    needs no padded copy of a chunk x V_local array."""
    local = ids2d - start
    mine = (local >= 0) & (local < width)
    rows = torch.arange(ids2d.shape[0], device=ids2d.device).unsqueeze(-1)
    offsets = [0, *mine.sum(-1).cumsum(0).tolist()]
    return mine, (rows * width + local)[mine], offsets


def _shifted(out: torch.Tensor, x: torch.Tensor, temperature: float, shift: torch.Tensor) -> torch.Tensor:
    """out = x / τ - shift (per row) in fp32: the same operations on the same values as
    `_scaled(x).sub_(shift)`, written into `out` (fp32 x at τ = 1: one pass, no copy)."""
    if x.dtype != out.dtype:
        x = out.copy_(x)
    if temperature != 1.0:
        x = torch.div(x, temperature, out=out)
    return torch.sub(x, shift.unsqueeze(-1), out=out)


def _bins_kl(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor, support, *, whole_vocabulary: bool,
             vocab_local: int, reverse: bool, group, chunk_size: int) -> torch.Tensor:
    """Σ_j over the K + 1 bins (last dim), with 0 · log 0 = 0 for the distribution the sum is weighted by.

    Both bin arrays are the same on every rank, so with K < the vocabulary each rank sums the K + 1 terms
    itself. With K = the padded vocabulary the terms are summed in the order of online distillation
    (losses._kl_rows) instead: each rank adds the terms of its own token ids in id order over a row of its
    vocabulary slice, the group adds the ranks' sums, then the (empty) rest bin's 0. That is bit for bit
    online's KL, which the reverse KL's gradient uses, so a cached run does not drift from the online one by
    rounding."""
    log_p, log_q = (log_p_student, log_p_teacher) if reverse else (log_p_teacher, log_p_student)
    terms = torch.where(log_p > NEG_INF, log_p.exp() * (log_p - log_q), 0.0)
    if not whole_vocabulary:
        return terms.sum(-1)
    mine, flat, offsets = support
    mine_terms = terms[:, :-1][mine]
    kl = torch.zeros(terms.shape[0], dtype=COMPUTE_DTYPE, device=terms.device)
    for i in range(0, terms.shape[0], chunk_size):
        j = min(i + chunk_size, terms.shape[0])
        by_id = terms.new_zeros(j - i, vocab_local)
        by_id.view(-1)[flat[offsets[i]:offsets[j]] - i * vocab_local] = mine_terms[offsets[i]:offsets[j]]
        kl[i:j] = by_id.sum(-1)
    return _all_reduce(kl, dist.ReduceOp.SUM, group).add_(terms[:, -1])


def _row_chunks(rows: int, chunk_size: int, period: int):
    """(start, stop) ranges of at most chunk_size rows, none crossing a multiple of `period`."""
    i = 0
    while i < rows:
        j = min(i + chunk_size, rows, (i // period + 1) * period)
        yield i, j
        i = j


class _CachedKL(torch.autograd.Function):
    """The KL, the student's LM loss (for reports), and the KL's gradient, all in the forward.

    Pass 1, chunk by chunk: exp(z - max) of the scaled logits, its sum over the vocabulary and over the rest
    (the cached ids zeroed); the logits at the cached ids and at the labels are gathered once. One all-reduce
    of all of it, then the KL. Pass 2 (only when a gradient is wanted), chunk by chunk: the gradient
    p_v * (rest coefficient of its row), the cached ids' own values written over it, stored in the logits'
    dtype. The backward only scales it by the upstream gradient, in place: one pass, no collective, no
    recomputed softmax. Each chunk is worked on in one small fp32 array (it stays in the CPU's cache); the
    gradient buffer is the tokens x V_local array a backward allocates anyway, alive from the forward on. In
    a 16-bit dtype the stored gradient is rounded once more than online's (before the upstream scale).

    `sequence_first` (logits [b, s, V] that are a transposed copy of an [s, b, V] output, as GPTModel
    returns them): the gradient is stored [s, b, V] and returned as its transposed view, so the backward of
    the transpose hands the output layer a contiguous gradient instead of a copy.

    The student's LM loss at τ = 1 is log-sum-exp minus the label's logit, from the KL's own log-sum-exp
    (at τ ≠ 1 a third sum gives the τ = 1 one); it is a value for reports, with no gradient."""

    @staticmethod
    def forward(ctx, student, ids, logp_t, log_rest_t, labels, group, temperature, reverse, chunk_size,
                with_grad, sequence_first):
        vocab_local = student.shape[-1]
        x2d, ids2d = student.reshape(-1, vocab_local).contiguous(), ids.reshape(-1, ids.shape[-1])
        n, k, device = x2d.shape[0], ids2d.shape[-1], student.device
        start = _rank(group) * vocab_local
        support = mine, flat, offsets = _support(ids2d, start, vocab_local)
        # a max over the whole vocabulary first only when it is split over ranks; else each chunk's own, taken
        # while the chunk is in the CPU's cache (the same values)
        split = _group_size(group) > 1
        m = _row_max(x2d, temperature, group) if split else x2d.new_empty(n, dtype=COMPUTE_DTYPE)
        # one all-reduce: [logits at the cached ids (0 where another rank holds one) | sum exp | sum exp over
        # the rest | the label's logit | sum exp at τ = 1]
        lm_sum = labels is not None and temperature != 1.0
        acc = torch.zeros(n, k + 3 + lm_sum, dtype=COMPUTE_DTYPE, device=device)
        z, total, rest, label_logit = acc[:, :k], acc[:, k], acc[:, k + 1], acc[:, k + 2]
        z[mine] = x2d.view(-1)[flat].to(COMPUTE_DTYPE).div_(temperature)
        if labels is not None:
            label_logit.copy_(_label_logits(x2d, labels, group))
        work = torch.empty(min(chunk_size, n), vocab_local, dtype=COMPUTE_DTYPE, device=device)
        for i in range(0, n, chunk_size):
            j = min(i + chunk_size, n)
            if not split:
                m[i:j] = _row_max(x2d[i:j], temperature, None)
            exp = _shifted(work[:j - i], x2d[i:j], temperature, m[i:j]).exp_()
            total[i:j] = exp.sum(-1)
            exp.view(-1)[flat[offsets[i]:offsets[j]] - i * vocab_local] = 0.0
            rest[i:j] = exp.sum(-1)
            if lm_sum:  # the τ = 1 log-sum-exp, shifted by τ x the scaled max (any shift near the max is stable)
                acc[i:j, k + 3] = _shifted(work[:j - i], x2d[i:j], 1.0, m[i:j] * temperature).exp_().sum(-1)
        _all_reduce(acc, dist.ReduceOp.SUM, group)
        lse = m + total.log()
        log_ps = torch.cat([z - lse.unsqueeze(-1), (m + rest.log() - lse).unsqueeze(-1)], dim=-1)
        log_pt = torch.cat([logp_t.reshape(z.shape).to(COMPUTE_DTYPE),
                            log_rest_t.reshape(-1, 1).to(COMPUTE_DTYPE)], dim=-1)
        kl = _bins_kl(log_ps, log_pt, support, whole_vocabulary=k == vocab_local * _group_size(group),
                      vocab_local=vocab_local, reverse=reverse, group=group, chunk_size=chunk_size)
        lm = None
        if labels is not None:
            lse_1 = m * temperature + acc[:, k + 3].log() if lm_sum else lse
            lm = (lse_1 - label_logit).reshape(student.shape[:-1])
        if with_grad:
            if sequence_first:  # [b, s, V], a transposed view of [s, b, V] memory
                grad = student.new_empty(student.shape[1], student.shape[0], vocab_local).transpose(0, 1)
            else:
                grad = torch.empty_like(x2d).view(1, n, vocab_local)
            period = grad.shape[1]
            cached = _cached_grad(log_ps[:, :-1], log_pt[:, :-1], kl, reverse)[mine]
            coef = _rest_coef(log_ps[:, -1], log_pt[:, -1], kl, reverse).unsqueeze(-1)
            for i, j in _row_chunks(n, chunk_size, period):
                g = _shifted(work[:j - i], x2d[i:j], temperature, lse[i:j]).exp_().mul_(coef[i:j])
                g.view(-1)[flat[offsets[i]:offsets[j]] - i * vocab_local] = cached[offsets[i]:offsets[j]]
                grad[i // period, i % period:i % period + j - i] = g
            ctx.save_for_backward(grad)
        ctx.temperature, ctx.shape, ctx.used = temperature, student.shape, False
        kl = kl.reshape(student.shape[:-1])
        if lm is None:
            return kl
        ctx.mark_non_differentiable(lm)
        return kl, lm

    @staticmethod
    def backward(ctx, grad_kl, *_grad_lm):
        if ctx.used:
            raise RuntimeError("cached_kl's gradient is computed in its forward and scaled in place by the first "
                               "backward; a second backward through the same graph (retain_graph) is not supported")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        scale = grad_kl.to(COMPUTE_DTYPE) / ctx.temperature
        grad.mul_(scale.reshape(*grad.shape[:-1], 1))
        return grad.reshape(ctx.shape), None, None, None, None, None, None, None, None, None, None


def _cached_grad(log_ps: torch.Tensor, log_pt: torch.Tensor, kl: torch.Tensor, reverse: bool) -> torch.Tensor:
    """d loss / d z at the cached tokens [N, K]: p - t (forward), p (log p - log t - KL) (reverse)."""
    p = log_ps.exp()
    if reverse:
        return torch.where(p > 0, p * (log_ps - log_pt - kl.unsqueeze(-1)), 0.0)
    return p - log_pt.exp()


def _rest_coef(log_ps_rest: torch.Tensor, log_pt_rest: torch.Tensor, kl: torch.Tensor, reverse: bool
               ) -> torch.Tensor:
    """d loss / d z_v = p_v x this per-row coefficient for every token v of the rest bin: forward
    1 - T_rest / P_rest (as -expm1, exact when the two are close), reverse log P_rest - log T_rest - KL. An
    empty student rest bin holds no token with p_v > 0, so its coefficient does not matter; it is taken as 0
    (reverse) or 1 (forward: T_rest = 0)."""
    empty = log_ps_rest == NEG_INF
    if reverse:
        return torch.where(empty, 0.0, log_ps_rest - log_pt_rest - kl)
    return torch.where(empty, NEG_INF, log_pt_rest - log_ps_rest).expm1_().neg_()


def _check_targets(student_logits, ids, logp, log_rest, labels, temperature, chunk_size) -> int:
    if ids.shape != logp.shape or ids.shape[:-1] != student_logits.shape[:-1] or log_rest.shape != ids.shape[:-1]:
        raise ValueError(f"cached targets ids {tuple(ids.shape)}, log-probs {tuple(logp.shape)}, rest "
                         f"{tuple(log_rest.shape)} do not match student logits {tuple(student_logits.shape)}: "
                         f"the same tokens are needed")
    if labels is not None and labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match student logits {tuple(student_logits.shape)}: "
                         f"one label per token is needed")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 tokens, got {chunk_size}")
    return chunk_size or _default_chunk(student_logits.shape[-1], student_logits.device)


def _apply(student_logits, ids, logp, log_rest, labels, *, group, temperature, reverse, scale_by_temperature_squared,
           chunk_size, sequence_first=False):
    chunk = _check_targets(student_logits, ids, logp, log_rest, labels, temperature, chunk_size)
    if sequence_first and student_logits.dim() != 3:
        raise ValueError(f"sequence_first needs logits [b, s, V], got shape {tuple(student_logits.shape)}")
    with_grad = torch.is_grad_enabled() and student_logits.requires_grad
    out = _CachedKL.apply(student_logits, ids.to(torch.int64), logp.detach(), log_rest.detach(),
                          None if labels is None else labels.to(torch.int64), group, float(temperature), reverse,
                          chunk, with_grad, sequence_first)
    kl, lm = out if labels is not None else (out, None)
    return (kl * temperature**2 if scale_by_temperature_squared else kl), lm


def cached_kl(student_logits: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, log_rest: torch.Tensor, *,
              group=None, temperature: float = 1.0, reverse: bool = False,
              scale_by_temperature_squared: bool = False, chunk_size: int | None = None) -> torch.Tensor:
    """Per-token KL between the cached teacher targets (`teacher_top_k`'s three tensors, taken at the same
    τ) and softmax(student_logits / τ), over the K cached tokens and the rest; fp32 [...] for logits
    [..., V_local] and targets [..., K]. forward (default) KL(teacher || student), reverse=True
    KL(student || teacher); `scale_by_temperature_squared` multiplies by τ². The gradient reaches only
    the student (one backward per forward); every rank of `group` gets the same values."""
    return _apply(student_logits, ids, logp, log_rest, None, group=group, temperature=temperature, reverse=reverse,
                  scale_by_temperature_squared=scale_by_temperature_squared, chunk_size=chunk_size)[0]


def cached_kl_and_lm(student_logits: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, log_rest: torch.Tensor,
                     labels: torch.Tensor, *, group=None, temperature: float = 1.0, reverse: bool = False,
                     scale_by_temperature_squared: bool = False, chunk_size: int | None = None,
                     sequence_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`cached_kl`, and the student's LM loss -log softmax(student_logits)[label] (temperature 1, global
    label ids [...]) from the same pass over the vocabulary: fp32 [...] each. The LM loss is for reports and
    carries no gradient (a run that trains on it adds megatron's vocab-parallel cross entropy).
    `sequence_first`: the logits [b, s, V] are GPTModel's transposed copy of its output layer's [s, b, V]
    (under sequence parallelism; otherwise distillation's output layers write [b, s, V] themselves, see
    distill/model.py batch_major_logits); the gradient is then laid out [s, b, V] (returned as a transposed
    view), which the output layer's backward reads without a copy."""
    return _apply(student_logits, ids, logp, log_rest, labels, group=group, temperature=temperature,
                  reverse=reverse, scale_by_temperature_squared=scale_by_temperature_squared, chunk_size=chunk_size,
                  sequence_first=sequence_first)
