"""The normalization layer of our local (no Transformer Engine) layer spec.

megatron-core's local spec falls back to `WrappedTorchNorm` without apex, which refuses sequence
parallelism and zero-centred gamma. This module does both: it is a plain LayerNorm/RMSNorm whose
weights are tagged `sequence_parallel` so that megatron's `finalize_model_grads` all-reduces their
gradients over the tensor-parallel group when each rank only sees part of the sequence. Its state
dict keys (`weight`, `bias`) are those of torch's norms, so checkpoints are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LocalNorm(torch.nn.Module):
    """LayerNorm or RMSNorm over the last dimension, built the way megatron builds norms."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.zero_centered = bool(config.layernorm_zero_centered_gamma)
        self.eps = eps
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for param in self.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered else self.weight
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), weight, self.bias, self.eps)
