"""Router statistics of a Mixture-of-Experts model in training: auxiliary loss and expert load.

megatron-core adds the routers' load-balancing loss to the gradient through an autograd hook, not to
the loss a forward step returns, and keeps its value in a module-level tracker (per layer, summed over
micro-batches). `RouterStats` reads that tracker once per step and counts, with forward hooks on the
routers, how many tokens each expert received. Both are reduced over this step's ranks with the groups
the runtime names, so every rank gets the same numbers:

- `moe aux loss`: what the routers added to the objective, per micro-batch: sum over MoE layers of
  coefficient x load-balancing loss (megatron's Switch-Transformer loss, E * sum_i f_i * P_i);
- `moe load-balancing loss`: the same loss without the coefficient, averaged over MoE layers;
- `moe expert load`: for each MoE layer (global index), the fraction of routed token slots each
  expert received (sums to 1);
- `moe load imbalance`: the largest expert's load times the number of experts, over all layers
  (1.0 is perfectly balanced; E means one expert got everything).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_minitron.config import ArchConfig
from megatron_minitron.runtime.dist import Runtime

TRACKER_NAME = "load_balancing_loss"  # the name megatron's router logs its aux loss under


class RouterStats:
    """Forward hooks on every router of this rank's model chunks, and the per-step reduction."""

    def __init__(self, chunks: list, arch: ArchConfig, runtime: Runtime, aux_loss_coeff: float) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.arch, self.runtime, self.aux_loss_coeff = arch, runtime, aux_loss_coeff
        self.tokens = torch.zeros(arch.num_layers, arch.num_experts, dtype=torch.float64)
        self.handles = []
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self.handles.append(module.register_forward_hook(self._count))

    def _count(self, router, _inputs, outputs) -> None:
        if router.training and torch.is_grad_enabled():
            _probs, routing_map = outputs
            self.tokens[router.layer_number - 1] += routing_map.sum(dim=0).to(self.tokens)

    def reset(self) -> None:
        """Forget what earlier forward passes (evaluation, another step) left behind."""
        from megatron.core.transformer.moe import moe_utils

        self.tokens.zero_()
        moe_utils.clear_aux_losses_tracker()

    def reduce(self, num_microbatches: int) -> dict:
        """This step's statistics, identical on every rank; resets for the next step."""
        rt = self.runtime
        tokens = self.tokens.to(rt.device)
        # Router inputs are split over sequence (SP: TP ranks), data (DP) and layers (PP): sum all three.
        for group in (rt.tp_group, rt.dp_group, rt.pp_group):
            torch.distributed.all_reduce(tokens, group=group)
        out: dict = {}
        moe_layers = [i for i, is_moe in enumerate(self.arch.moe_layers) if is_moe]
        load = tokens[moe_layers] / tokens[moe_layers].sum(dim=1, keepdim=True).clamp(min=1)
        out["moe expert load"] = {str(layer): [round(float(x), 6) for x in row] for layer, row in zip(moe_layers, load)}
        out["moe load imbalance"] = float(load.max() * self.arch.num_experts)
        if self.aux_loss_coeff > 0:
            out.update(self._aux_loss(num_microbatches, moe_layers))
        self.reset()
        return out

    def _aux_loss(self, num_microbatches: int, moe_layers: list[int]) -> dict:
        from megatron.core.transformer.moe import moe_utils

        rt = self.runtime
        entry = moe_utils.get_moe_layer_wise_logging_tracker().get(TRACKER_NAME)
        values = (entry["values"].detach().clone() if entry is not None
                  else torch.zeros(self.arch.num_layers, device=rt.device)).to(torch.float64)
        # Each layer lives on one stage; under SP each TP rank's loss covers its share of the tokens
        # (megatron reduces over its TP x CP group the same way); data-parallel ranks are averaged.
        torch.distributed.all_reduce(values, group=rt.pp_group)
        torch.distributed.all_reduce(values, group=rt.tp_group)
        torch.distributed.all_reduce(values, group=rt.dp_group)
        per_layer = values[moe_layers] / (rt.data_parallel * num_microbatches)
        return {"moe aux loss": float(self.aux_loss_coeff * per_layer.sum()),
                "moe load-balancing loss": float(per_layer.mean())}

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


def router_stats(chunks: list, arch: ArchConfig, runtime: Runtime, aux_loss_coeff: float) -> Optional[RouterStats]:
    """RouterStats for a MoE model, None for a dense one."""
    return RouterStats(chunks, arch, runtime, aux_loss_coeff) if arch.is_moe else None
