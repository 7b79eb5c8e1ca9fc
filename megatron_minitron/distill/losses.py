"""Distillation losses on megatron's vocab-parallel logits and on hidden states.

Every function returns a per-token loss (no reduction over tokens), so the caller applies the loss
mask with `training.losses.masked_sum` and hands megatron its (loss sum, token count) pair: averaging happens once,
over the whole global batch, never per micro-batch.

Logits are this tensor-parallel rank's slice of the (padded) vocabulary, [..., V_local], exactly as
megatron's output layer returns them; every rank of `group` holds a slice of the same width, in rank
order. `group=None`, or a group of one process, means the tensor holds the whole vocabulary and no
collective runs; pure torch, so everything here is testable without megatron or a process group.

Math is done in fp32 whatever the logits' dtype, `chunk_size` tokens at a time, so that the fp32
working set is a few chunk_size x V_local arrays instead of tokens x V_local (8k tokens of a 256k
vocabulary would be 8 GiB per fp32 copy). The KL functions return fp32 losses and gradients in the
student's dtype; the teacher never receives a gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

CHUNK_ELEMENTS = 2**25
"""Default chunk on an accelerator: as many tokens as keep one fp32 chunk x V_local array at 128 MiB
(few, large kernels)."""

CPU_CHUNK_ELEMENTS = 2**19
"""Default chunk for logits on the CPU: 2 MiB fp32 arrays. Each larger temporary is a fresh mapping from
the allocator (page faults, zeroing) that also misses the caches: at 1,024 tokens of an 8k vocabulary
the KL's forward and backward took about 3x longer in one 32 MiB chunk than in 64-token chunks (same
bits: every operation is per row)."""

COMPUTE_DTYPE = torch.float32
"""Working precision of the KL math: a module constant so that the tests can run this very code in
float64 under a finite-difference gradient check."""


# ------------------------------------------------------------------------------------- collectives
def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if _group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _all_gather_last(tensor: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's tensor along the last dim, in rank order (no autograd)."""
    if _group_size(group) == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(_group_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _GatherReplicated(torch.autograd.Function):
    """All-gather along the last dim for a loss that every rank then computes identically: the
    gradient of this rank's slice is its own part of the (replicated) output gradient, not a sum
    over ranks, which would count the same loss once per rank."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group, ctx.width = group, tensor.shape[-1]
        return _all_gather_last(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        rank = 0 if _group_size(ctx.group) == 1 else dist.get_rank(ctx.group)
        return grad[..., rank * ctx.width:(rank + 1) * ctx.width], None


# ---------------------------------------------------------------------------------- vocab-parallel KL
def _default_chunk(vocab_local: int, device: torch.device) -> int:
    """Tokens per chunk: CPU_CHUNK_ELEMENTS / V_local for logits on the CPU, else CHUNK_ELEMENTS / V_local.
    One budget for every chunked pass here and in cached_kl.py: measured single-threaded at 1,024 tokens of
    an 8k vocabulary (loaded 2-core machine, medians of 8), 2^19 elements was as fast as or faster than 2^21
    for the KL (86-148 vs 133-154 ms), the teacher's top-k (54-73 vs 72-76 ms), the cached KL (59-67 vs
    65 ms) and the reported cross entropy (12-13 vs 14-17 ms). With the 2 threads of a free 2-core machine, the
    KL's forward + backward (medians of 5): 43 ms at 2^19 against 52 at 2^17, 66 at 2^21 and 112 at 2^23 for 1,024
    tokens of 8k, and 321 ms against 344, 493 and 833 for 2,048 tokens of 32k."""
    elements = CPU_CHUNK_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS
    return max(1, elements // max(1, vocab_local))


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh fp32 copy divided by τ (a copy even for fp32 input, so in-place work below is safe; no
    division at τ = 1, which would not change a bit)."""
    copy = logits.to(COMPUTE_DTYPE, copy=True)
    return copy if temperature == 1 else copy.div_(temperature)


def _global_max(student: torch.Tensor, teacher: torch.Tensor, temperature: float, group) -> torch.Tensor:
    """[2, N] max of the scaled logits over the global vocabulary, for a stable sum-exp. Taken on the
    input dtype (no fp32 copy): dividing by τ > 0 in fp32 preserves order, so the max commutes."""
    m = torch.stack((student.amax(-1), teacher.amax(-1))).to(COMPUTE_DTYPE).div_(temperature)
    return _all_reduce(m, dist.ReduceOp.MAX, group)


def _log_softmax_(scaled: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    return scaled.sub_(lse.unsqueeze(-1))


def _kl_rows(log_ps: torch.Tensor, log_pt: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(This rank's part of Σ_v p (log p − log q) per row, p): p = teacher (forward) or student (reverse)."""
    log_p, log_q = (log_ps, log_pt) if reverse else (log_pt, log_ps)
    p = log_p.exp()
    return torch.sub(log_p, log_q).mul_(p).sum(-1), p


class _VocabParallelKL(torch.autograd.Function):
    """Forward: three passes of collectives (max, then per-chunk sum-exp, then one sum of the KL
    partials). The forward KL's gradient p_s − p_t needs no full-row statistic beyond the log-sum-exps,
    so when a gradient will be wanted (`with_grad`) the forward writes it, chunk by chunk, into one buffer
    of the student's dtype while each chunk's probabilities exist; the first backward only scales it by
    the incoming gradient. Otherwise (reverse KL, whose gradient needs the finished row KL, or a backward
    after the first, as with retain_graph) backward recomputes each chunk's log-probabilities from the
    saved log-sum-exps (no collective). Either way the fp32 memory stays bounded by the chunk; autograd
    of a chunked forward would keep every chunk's fp32 intermediates alive until backward.

    With `labels`, also the student's LM loss −log softmax(logits)[label] at τ = 1, for reports (no
    gradient): its log-sum-exp minus the label's logit, both riding on the per-chunk sum all-reduce (at
    τ ≠ 1 one more sum-exp per chunk gives the τ = 1 log-sum-exp). No pass or collective of its own."""

    @staticmethod
    def forward(ctx, student, teacher, labels, group, temperature, reverse, chunk_size, with_grad):
        student2d, teacher2d = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        lse = _global_max(student2d, teacher2d, temperature, group)
        kl = torch.zeros(student2d.shape[0], dtype=COMPUTE_DTYPE, device=student.device)
        grad = torch.empty_like(student2d) if with_grad and not reverse else None
        lm = None if labels is None else _label_logits(student2d, labels, group)  # → the LM loss, chunk by chunk
        for i in range(0, student2d.shape[0], chunk_size):
            rows = slice(i, i + chunk_size)
            kl[rows] = _forward_chunk(student2d[rows], teacher2d[rows], lse[:, rows], temperature, reverse, group,
                                      None if grad is None else grad[rows], None if lm is None else lm[rows])
        _all_reduce(kl, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(student, teacher, lse, kl)
        ctx.temperature, ctx.reverse, ctx.chunk_size, ctx.grad = temperature, reverse, chunk_size, grad
        kl = kl.reshape(student.shape[:-1])
        if lm is None:
            return kl
        lm = lm.reshape(student.shape[:-1])
        ctx.mark_non_differentiable(lm)
        return kl, lm

    @staticmethod
    def backward(ctx, grad_kl, *_grad_lm):
        student, teacher, lse, kl = ctx.saved_tensors
        grad_rows = grad_kl.reshape(-1).to(COMPUTE_DTYPE) / ctx.temperature
        if ctx.grad is not None:  # written by the forward; scaled in place, so only the first backward uses it
            grad, ctx.grad = ctx.grad, None
            for i in range(0, grad.shape[0], ctx.chunk_size):  # by chunk: a bf16 x fp32 product makes fp32 copies
                grad[i:i + ctx.chunk_size].mul_(grad_rows[i:i + ctx.chunk_size].unsqueeze(-1))
            return grad.reshape(student.shape), None, None, None, None, None, None, None
        student2d, teacher2d = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        grad = torch.empty_like(student2d)
        for i in range(0, student2d.shape[0], ctx.chunk_size):
            rows = slice(i, i + ctx.chunk_size)
            log_ps = _log_softmax_(_scaled(student2d[rows], ctx.temperature), lse[0, rows])
            log_pt = _log_softmax_(_scaled(teacher2d[rows], ctx.temperature), lse[1, rows])
            grad[rows] = _kl_grad(log_ps, log_pt, kl[rows], ctx.reverse).mul_(grad_rows[rows].unsqueeze(-1))
        return grad.reshape(student.shape), None, None, None, None, None, None, None


def _label_logits(logits2d: torch.Tensor, labels: torch.Tensor, group) -> torch.Tensor:
    """fp32 [N]: each row's logit at its global label id where this rank holds that id, else 0 (the
    group's sum is the label's logit)."""
    vocab_local = logits2d.shape[-1]
    first = 0 if _group_size(group) == 1 else dist.get_rank(group) * vocab_local
    local = labels.reshape(-1) - first
    mine = (local >= 0) & (local < vocab_local)
    at_label = logits2d.gather(-1, local.clamp(0, vocab_local - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(mine, at_label.to(COMPUTE_DTYPE), 0.0)


def _forward_chunk(student: torch.Tensor, teacher: torch.Tensor, lse: torch.Tensor, temperature: float, reverse: bool,
                   group, grad: torch.Tensor | None, lm: torch.Tensor | None) -> torch.Tensor:
    """One chunk of the KL's forward: turns its maxima `lse` [2, n] into log-sum-exps (in place), returns
    this rank's part of its KL rows, and writes the forward KL's gradient p_s − p_t into `grad` when given
    (with p_t from the KL: what _kl_grad computes, one exp fewer). `lm` (this rank's part of the label
    logits, see _label_logits) becomes the student's LM loss at τ = 1, in place. A function, so that the
    chunk's fp32 arrays are freed before the next chunk's are made."""
    s, t = _scaled(student, temperature), _scaled(teacher, temperature)
    shifted = s - lse[0].unsqueeze(-1)
    extra = []
    if lm is not None:
        extra.append(lm)
        if temperature != 1:  # the τ = 1 sum-exp, shifted by τ x the scaled max (any shift near the max is stable)
            extra.append(torch.mul(shifted, temperature).exp_().sum(-1))
    parts = [shifted.exp_().sum(-1), (t - lse[1].unsqueeze(-1)).exp_().sum(-1), *extra]
    sums = _all_reduce(torch.stack(parts), dist.ReduceOp.SUM, group)
    if lm is not None:  # lse(τ = 1) − the label's logit
        lse_1 = lse[0] + sums[0].log() if temperature == 1 else lse[0] * temperature + sums[3].log()
        torch.sub(lse_1, sums[2], out=lm)
    lse.add_(sums[:2].log_())  # lse = max + log Σ exp(x − max)
    log_ps, log_pt = _log_softmax_(s, lse[0]), _log_softmax_(t, lse[1])
    kl, p = _kl_rows(log_ps, log_pt, reverse)
    if grad is not None:
        grad.copy_(log_ps.exp_().sub_(p))
    return kl


def _kl_grad(log_ps: torch.Tensor, log_pt: torch.Tensor, kl: torch.Tensor, reverse: bool) -> torch.Tensor:
    """d KL / d (student logits / τ), in place over log_ps (and log_pt for the forward KL), in backward.
    forward KL(p_t‖p_s): p_s − p_t.
    reverse KL(p_s‖p_t): p_s (log p_s − log p_t − KL), from d p_s,v / d z_i = p_s,v (δ_vi − p_s,i)
    (the Σ p_s d log p_s term vanishes because Σ_v d p_s,v = 0)."""
    if reverse:
        return torch.sub(log_ps, log_pt).sub_(kl.unsqueeze(-1)).mul_(log_ps.exp_())
    return log_ps.exp_().sub_(log_pt.exp_())


def _check(student: torch.Tensor, teacher: torch.Tensor, temperature: float, chunk_size: int | None) -> int:
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
                         "differ in shape: the same tokens and the same padded vocabulary slice are needed")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 tokens, got {chunk_size}")
    return chunk_size or _default_chunk(student.shape[-1], student.device)


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, group=None,
                      temperature: float = 1.0, reverse: bool = False, scale_by_temperature_squared: bool = False,
                      chunk_size: int | None = None) -> torch.Tensor:
    """Per-token KL divergence between softmax(logits / τ) of teacher and student over the global
    (padded) vocabulary split over `group`; returns fp32 [...] for logits [..., V_local].

    forward (default): KL(p_t ‖ p_s) = Σ_v p_t (log p_t − log p_s), the Minitron choice (mode-covering);
    reverse=True: KL(p_s ‖ p_t). `scale_by_temperature_squared` multiplies by τ², which keeps the
    gradient magnitude independent of τ (Hinton et al.), so loss weights tuned at τ=1 still apply.
    Every rank of `group` gets the same per-token values; the gradient reaches only the student's
    slice. `chunk_size` tokens are converted to fp32 at a time (default: CHUNK_ELEMENTS / V_local, or
    CPU_CHUNK_ELEMENTS / V_local for logits on the CPU)."""
    return _apply_kl(student_logits, teacher_logits, None, group=group, temperature=temperature, reverse=reverse,
                     scale_by_temperature_squared=scale_by_temperature_squared, chunk_size=chunk_size)[0]


def vocab_parallel_kl_and_lm(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                             group=None, temperature: float = 1.0, reverse: bool = False,
                             scale_by_temperature_squared: bool = False,
                             chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`vocab_parallel_kl` (the same values and gradient), and the student's LM loss −log softmax(student
    logits)[label] at τ = 1 (global label ids [...]) from the same pass over the vocabulary: fp32 [...] each.
    The LM loss is what `reported_cross_entropy` gives, for reports: it carries no gradient (a run that
    trains on it adds megatron's vocab-parallel cross entropy), and costs no pass or collective of its own."""
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match student logits {tuple(student_logits.shape)}: "
                         "one label per token is needed")
    return _apply_kl(student_logits, teacher_logits, labels.to(torch.int64), group=group, temperature=temperature,
                     reverse=reverse, scale_by_temperature_squared=scale_by_temperature_squared,
                     chunk_size=chunk_size)


def _apply_kl(student_logits, teacher_logits, labels, *, group, temperature, reverse, scale_by_temperature_squared,
              chunk_size) -> tuple[torch.Tensor, torch.Tensor | None]:
    chunk = _check(student_logits, teacher_logits, temperature, chunk_size)
    with_grad = torch.is_grad_enabled() and student_logits.requires_grad  # (inside forward, autograd is off)
    out = _VocabParallelKL.apply(student_logits, teacher_logits.detach(), labels, group, float(temperature), reverse,
                                 chunk, with_grad)
    kl, lm = out if labels is not None else (out, None)
    return (kl * temperature**2 if scale_by_temperature_squared else kl), lm


@torch.no_grad()
def reported_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, group=None,
                           chunk_size: int | None = None) -> torch.Tensor:
    """Per-token cross entropy −log softmax(logits)[label] over the global (padded) vocabulary split over
    `group`, fp32 [...] for logits [..., V_local] and labels [...]: for reports only (no gradient).

    What megatron's vocab_parallel_cross_entropy returns, up to fp32 rounding (log-sum-exp − the label's
    logit instead of log Σ exp(x − max) − (label logit − max)), without what only its backward needs:
    no copy of the input (megatron's works in place), no softmax, two collectives per chunk instead of
    three and none on a group of one; `chunk_size` tokens at a time as in vocab_parallel_kl."""
    vocab_local = logits.shape[-1]
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)} without their "
                         "vocabulary dim")
    chunk = chunk_size or _default_chunk(vocab_local, logits.device)
    logits2d = logits.reshape(-1, vocab_local)
    labels_part = _label_logits(logits2d, labels, group)
    loss = torch.empty(logits2d.shape[0], dtype=COMPUTE_DTYPE, device=logits.device)
    for i in range(0, logits2d.shape[0], chunk):
        rows = slice(i, i + chunk)
        x = logits2d[rows]
        top = _all_reduce(x.amax(-1).to(COMPUTE_DTYPE), dist.ReduceOp.MAX, group)
        sum_exp = x.to(COMPUTE_DTYPE).sub(top.unsqueeze(-1)).exp_().sum(-1)
        label, sum_exp = _all_reduce(torch.stack((labels_part[rows], sum_exp)), dist.ReduceOp.SUM, group)
        loss[rows] = sum_exp.log_().add_(top).sub_(label)
    return loss.reshape(labels.shape)


# ------------------------------------------------------------------------------------------- top-k
def _local_top_k(teacher2d: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """Indices of each row's k largest teacher logits on this rank (chunked to bound top-k's workspace)."""
    return torch.cat([teacher2d[i:i + chunk_size].topk(k, dim=-1).indices
                      for i in range(0, teacher2d.shape[0], chunk_size)])


def top_k_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, k: int, group=None,
             temperature: float = 1.0, reverse: bool = False, scale_by_temperature_squared: bool = False,
             chunk_size: int | None = None) -> torch.Tensor:
    """Per-token KL restricted to the teacher's top-k tokens; fp32 [...] for logits [..., V_local].

    Definition: S = the k tokens with the largest teacher logits over the global vocabulary (ties broken
    by torch.topk, so exactly tied logits may pick another set at another TP size); both distributions
    are renormalised over S, p̃ = softmax(logits_S / τ), and the loss is KL(p̃_t ‖ p̃_s) (reverse:
    KL(p̃_s ‖ p̃_t)), optionally × τ². Tokens outside S get no gradient. The global set is found by
    gathering each rank's local top-min(k, V_local) teacher logits and the student logits at the same
    tokens (the global top-k lies within their union), then choosing the top-k of that list, identically
    on every rank; only N x k values per rank cross the group, never the vocabulary. Plain autograd
    from there: the k-wide math is small, and the backward of the gather scatters into one buffer."""
    chunk = _check(student_logits, teacher_logits, temperature, chunk_size)
    vocab_local, world = student_logits.shape[-1], _group_size(group)
    if not 1 <= k <= vocab_local * world:
        raise ValueError(f"k must be in [1, global vocabulary {vocab_local * world}], got {k}")
    student2d = student_logits.reshape(-1, vocab_local)
    teacher2d = teacher_logits.detach().reshape(-1, vocab_local)
    local = _local_top_k(teacher2d, min(k, vocab_local), chunk)
    teacher_all = _all_gather_last(teacher2d.gather(-1, local).to(COMPUTE_DTYPE), group)
    student_all = _GatherReplicated.apply(student2d.gather(-1, local).to(COMPUTE_DTYPE), group)
    chosen = teacher_all.topk(k, dim=-1).indices
    log_pt = (teacher_all.gather(-1, chosen) / temperature).log_softmax(-1)
    log_ps = (student_all.gather(-1, chosen) / temperature).log_softmax(-1)
    log_p, log_q = (log_ps, log_pt) if reverse else (log_pt, log_ps)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).reshape(student_logits.shape[:-1])
    return kl * temperature**2 if scale_by_temperature_squared else kl


# ------------------------------------------------------------------------------ intermediate losses
def hidden_cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 − cos(student, teacher) per token over the last (hidden) dim, fp32, e.g. [s, b] for [s, b, h].
    Inputs are already normalised and mapped to the teacher's width by the caller. Scale-free, so a
    mapped layer whose norm differs from the teacher's is judged by direction only; the teacher is
    detached, and `eps` keeps an all-zero row (padding) finite."""
    _check_hidden(student_hidden, teacher_hidden)
    student, teacher = student_hidden.float(), teacher_hidden.detach().float()
    cos = torch.nn.functional.cosine_similarity(student, teacher, dim=-1, eps=eps)
    return 1.0 - cos


def hidden_mse_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean over the hidden dim of (student − teacher)² per token, fp32; the teacher is detached."""
    _check_hidden(student_hidden, teacher_hidden)
    return (student_hidden.float() - teacher_hidden.detach().float()).square().mean(-1)


def _check_hidden(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"student hidden {tuple(student.shape)} and teacher hidden {tuple(teacher.shape)} differ: "
                         "map the student's hidden size to the teacher's before the loss")
