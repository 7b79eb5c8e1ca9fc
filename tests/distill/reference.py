"""Plain single-process references for the distillation losses: full-vocabulary log-softmax in
float64 and torch's own kl_div, differentiated by autograd (no chunks, no collectives)."""

from __future__ import annotations

import torch


def kl_reference(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0, reverse: bool = False,
                 k: int | None = None) -> torch.Tensor:
    """Per-token KL over the whole vocabulary (or renormalised over the teacher's top-k), float64."""
    s, t = student.double() / temperature, teacher.detach().double() / temperature
    if k is not None:
        top = t.topk(k, dim=-1).indices
        s, t = s.gather(-1, top), t.gather(-1, top)
    log_ps, log_pt = s.log_softmax(-1), t.log_softmax(-1)
    target, model = (log_ps, log_pt) if reverse else (log_pt, log_ps)
    # kl_div(input=log q, target=log p) = p (log p - log q), elementwise
    return torch.nn.functional.kl_div(model, target, reduction="none", log_target=True).sum(-1)
