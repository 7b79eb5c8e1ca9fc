"""Forward passes outside training: full-vocabulary logits through megatron's schedule (any TP/PP)."""

from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def forward_logits(model, tokens: torch.Tensor, position_ids: torch.Tensor, runtime) -> Optional[torch.Tensor]:
    """Logits [batch, seq, padded vocab] of one micro-batch on the last pipeline stage (None on other
    stages), gathered over the tensor-parallel group in rank order."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    captured: list[torch.Tensor] = []
    tokens, position_ids = tokens.to(runtime.device), position_ids.to(runtime.device)

    def forward_step(_data_iterator, chunk):
        logits = chunk(tokens, position_ids, None)

        def capture(output: torch.Tensor):
            captured.append(gather_from_tensor_model_parallel_region(output.float()))
            zero = output.float().sum() * 0
            return zero, torch.ones((), dtype=torch.int), {"zero": torch.stack([zero, zero])}

        return logits, capture

    was_training = model.training
    model.eval()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
                                forward_only=True)
    model.train(was_training)
    return captured[0] if captured else None
