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
written chunk by chunk into one buffer, as `losses._VocabParallelKL` does, so the fp32 working set stays
a few chunk x V_local arrays.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_minitron.distill.losses import (COMPUTE_DTYPE, _all_gather_last, _all_reduce, _default_chunk,
                                              _group_size, _scaled)

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
    chunk, start = chunk_size or _default_chunk(vocab_local), _rank(group) * vocab_local
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
def _bins_kl(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor, ids2d: torch.Tensor, *, start: int,
             vocab_local: int, reverse: bool, group, chunk_size: int) -> torch.Tensor:
    """Σ_j over the K + 1 bins (last dim), with 0 · log 0 = 0 for the distribution the sum is weighted by.

    Summed in the order of online distillation (losses._kl_rows), not in the cached (by-logit) order: each
    rank adds the terms of its own token ids in id order over a row of its vocabulary slice, the group adds
    the ranks' sums, then the rest bin is added. With K = the padded vocabulary the rest term is 0 and the
    result is bit for bit online's KL, which the reverse KL's gradient uses, so a cached run does not drift
    from the online one by rounding."""
    log_p, log_q = (log_p_student, log_p_teacher) if reverse else (log_p_teacher, log_p_student)
    terms = torch.where(log_p > NEG_INF, log_p.exp() * (log_p - log_q), 0.0)
    kl = torch.zeros(terms.shape[0], dtype=COMPUTE_DTYPE, device=terms.device)
    for i in range(0, terms.shape[0], chunk_size):
        rows = slice(i, i + chunk_size)
        positions, mine = _local_positions(ids2d[rows], start, vocab_local)
        by_id = terms.new_zeros(terms[rows].shape[0], vocab_local)
        by_id.view(-1)[positions] = terms[rows, :-1][mine]
        kl[rows] = by_id.sum(-1)
    return _all_reduce(kl, dist.ReduceOp.SUM, group).add_(terms[:, -1])


class _CachedKL(torch.autograd.Function):
    """Forward: the global max, then per chunk the student's logits at the cached ids, its sum-exp over
    the vocabulary and over the rest (one all-reduce each at the end), then the KL (one more). Backward
    recomputes each chunk's probabilities from the saved log-sum-exp, without a collective. Each chunk
    holds one fp32 chunk x V_local array at a time (ids are placed through the flat view, with no padded
    copy; online holds two, the teacher's and the student's)."""

    @staticmethod
    def forward(ctx, student, ids, logp_t, log_rest_t, group, temperature, reverse, chunk_size):
        vocab_local = student.shape[-1]
        x2d, ids2d = student.reshape(-1, vocab_local), ids.reshape(-1, ids.shape[-1])
        start = _rank(group) * vocab_local
        m = _row_max(x2d, temperature, group)
        z = torch.zeros(ids2d.shape, dtype=COMPUTE_DTYPE, device=student.device)
        sums = torch.zeros(2, x2d.shape[0], dtype=COMPUTE_DTYPE, device=student.device)
        for i in range(0, x2d.shape[0], chunk_size):
            rows = slice(i, i + chunk_size)
            positions, mine = _local_positions(ids2d[rows], start, vocab_local)
            s = _scaled(x2d[rows], temperature)
            z[rows][mine] = s.view(-1)[positions]  # 0 where another rank holds the id
            exp = s.sub_(m[rows].unsqueeze(-1)).exp_()
            sums[0, rows] = exp.sum(-1)
            exp.view(-1)[positions] = 0.0
            sums[1, rows] = exp.sum(-1)
        _all_reduce(z, dist.ReduceOp.SUM, group)
        _all_reduce(sums, dist.ReduceOp.SUM, group)
        lse = m + sums[0].log()
        log_ps = torch.cat([z - lse.unsqueeze(-1), (m + sums[1].log() - lse).unsqueeze(-1)], dim=-1)
        log_pt = torch.cat([logp_t.reshape(z.shape).to(COMPUTE_DTYPE),
                            log_rest_t.reshape(-1, 1).to(COMPUTE_DTYPE)], dim=-1)
        kl = _bins_kl(log_ps, log_pt, ids2d, start=start, vocab_local=vocab_local, reverse=reverse, group=group,
                      chunk_size=chunk_size)
        ctx.save_for_backward(student, ids2d, lse, log_ps, log_pt, kl)
        ctx.group, ctx.temperature, ctx.reverse, ctx.chunk_size = group, temperature, reverse, chunk_size
        return kl.reshape(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        student, ids2d, lse, log_ps, log_pt, kl = ctx.saved_tensors
        vocab_local = student.shape[-1]
        x2d, start = student.reshape(-1, vocab_local), _rank(ctx.group) * vocab_local
        grad_rows = grad_kl.reshape(-1).to(COMPUTE_DTYPE) / ctx.temperature
        cached = _cached_grad(log_ps[:, :-1], log_pt[:, :-1], kl, ctx.reverse)
        grad = torch.empty_like(x2d)
        for i in range(0, x2d.shape[0], ctx.chunk_size):
            rows = slice(i, i + ctx.chunk_size)
            log_p = _scaled(x2d[rows], ctx.temperature).sub_(lse[rows].unsqueeze(-1))
            g = _rest_grad(log_p, log_ps[rows, -1], log_pt[rows, -1], kl[rows], ctx.reverse)
            positions, mine = _local_positions(ids2d[rows], start, vocab_local)
            g.view(-1)[positions] = cached[rows][mine]
            grad[rows] = g.mul_(grad_rows[rows].unsqueeze(-1))
        return grad.reshape(student.shape), None, None, None, None, None, None, None


def _cached_grad(log_ps: torch.Tensor, log_pt: torch.Tensor, kl: torch.Tensor, reverse: bool) -> torch.Tensor:
    """d loss / d z at the cached tokens [N, K]: p - t (forward), p (log p - log t - KL) (reverse)."""
    p = log_ps.exp()
    if reverse:
        return torch.where(p > 0, p * (log_ps - log_pt - kl.unsqueeze(-1)), 0.0)
    return p - log_pt.exp()


def _rest_grad(log_p: torch.Tensor, log_ps_rest: torch.Tensor, log_pt_rest: torch.Tensor, kl: torch.Tensor,
               reverse: bool) -> torch.Tensor:
    """d loss / d z for every token of the chunk as if it were in the rest bin, in place over log_p (no
    other chunk-sized array): p_v times a coefficient per row, forward 1 - T_rest / P_rest (as -expm1, exact
    when the two are close), reverse log P_rest - log T_rest - KL. An empty student rest bin holds no token
    with p_v > 0, so its coefficient does not matter; it is taken as 0 (reverse) or 1 (forward: T_rest = 0)."""
    empty = log_ps_rest == NEG_INF
    if reverse:
        coef = torch.where(empty, 0.0, log_ps_rest - log_pt_rest - kl)
    else:
        coef = torch.where(empty, NEG_INF, log_pt_rest - log_ps_rest).expm1_().neg_()
    return log_p.exp_().mul_(coef.unsqueeze(-1))


def cached_kl(student_logits: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, log_rest: torch.Tensor, *,
              group=None, temperature: float = 1.0, reverse: bool = False,
              scale_by_temperature_squared: bool = False, chunk_size: int | None = None) -> torch.Tensor:
    """Per-token KL between the cached teacher targets (`teacher_top_k`'s three tensors, taken at the same
    τ) and softmax(student_logits / τ), over the K cached tokens and the rest; fp32 [...] for logits
    [..., V_local] and targets [..., K]. forward (default) KL(teacher || student), reverse=True
    KL(student || teacher); `scale_by_temperature_squared` multiplies by τ². The gradient reaches only
    the student; every rank of `group` gets the same values."""
    if ids.shape != logp.shape or ids.shape[:-1] != student_logits.shape[:-1] or log_rest.shape != ids.shape[:-1]:
        raise ValueError(f"cached targets ids {tuple(ids.shape)}, log-probs {tuple(logp.shape)}, rest "
                         f"{tuple(log_rest.shape)} do not match student logits {tuple(student_logits.shape)}: "
                         f"the same tokens are needed")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 tokens, got {chunk_size}")
    chunk = chunk_size or _default_chunk(student_logits.shape[-1])
    kl = _CachedKL.apply(student_logits, ids.to(torch.int64), logp.detach(), log_rest.detach(), group,
                         float(temperature), reverse, chunk)
    return kl * temperature**2 if scale_by_temperature_squared else kl
