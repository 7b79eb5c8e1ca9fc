"""The one reduction of per-token losses that every task hands megatron's schedule (pure torch)."""

from __future__ import annotations

import torch


def masked_sum(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ of the loss over unmasked tokens as fp32, number of unmasked tokens as int): megatron's
    per-token-loss pair. The schedule sums both over micro-batches and DP ranks and divides once, so the
    mean is exact whatever the split; the division is the caller's.

    Masked tokens are selected out with `where` rather than multiplied by 0, so a NaN or inf computed at a
    masked position (say, a padded sequence) can neither reach the sum nor its gradient; a fully masked
    micro-batch gives (0., 0) with zero gradients."""
    if per_token_loss.shape != loss_mask.shape:  # megatron's logits are [s, b, V], its loss mask [b, s]
        raise ValueError(f"per-token loss {tuple(per_token_loss.shape)} and loss mask {tuple(loss_mask.shape)} "
                         "differ in shape (transpose [s, b] losses to the mask's [b, s])")
    keep = loss_mask.reshape(-1).bool()
    loss = per_token_loss.reshape(-1).float()
    total = torch.where(keep, loss, torch.zeros((), dtype=loss.dtype, device=loss.device)).sum()
    return total, keep.sum().to(torch.int)
