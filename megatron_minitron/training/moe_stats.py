"""Router statistics of a Mixture-of-Experts model in training: auxiliary loss and expert load.

megatron-core adds the routers' load-balancing loss to the gradient through an autograd hook, not to
the loss a forward step returns, and keeps its value in a module-level tracker (per layer, summed over
micro-batches). `RouterStats` reads that tracker once per step and counts, with forward hooks on the
routers, how many tokens each expert received. Both are reduced over all ranks in one collective, so
every rank gets the same numbers:

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
        """This step's statistics, identical on every rank; resets for the next step.

        Router inputs are split over sequence (SP: TP ranks), data (DP) and layers (PP), and the world is
        exactly TP x DP x PP ranks (expert-parallel ranks are TP x DP ranks), so one all-reduce over the
        world sums every rank's token counts and aux-loss values once: the same as summing over the TP,
        DP and PP groups in turn, in one collective instead of six. Under SP each TP rank's aux loss
        covers its share of the tokens (megatron reduces over its TP x CP group the same way); the
        data-parallel ranks' losses are averaged."""
        from megatron.core.transformer.moe import moe_utils

        rt, layers = self.runtime, self.arch.num_layers
        entry = moe_utils.get_moe_layer_wise_logging_tracker().get(TRACKER_NAME)
        aux = entry["values"].detach() if entry is not None and self.aux_loss_coeff > 0 else None
        both = torch.cat([self.tokens.flatten(), torch.zeros(layers, dtype=torch.float64) if aux is None
                          else aux.to("cpu", torch.float64)]).to(rt.device)
        torch.distributed.all_reduce(both, group=torch.distributed.group.WORLD)
        tokens, aux_sum = both[:-layers].view(layers, -1), both[-layers:]
        moe_layers = [i for i, is_moe in enumerate(self.arch.moe_layers) if is_moe]
        load = tokens[moe_layers] / tokens[moe_layers].sum(dim=1, keepdim=True).clamp(min=1)
        out: dict = {"moe expert load": {str(layer): [round(float(x), 6) for x in row]
                                         for layer, row in zip(moe_layers, load.tolist())},
                     "moe load imbalance": float(load.max() * self.arch.num_experts)}
        if aux is not None:
            per_layer = aux_sum[moe_layers] / (rt.data_parallel * num_microbatches)
            out["moe aux loss"] = float(self.aux_loss_coeff * per_layer.sum())
            out["moe load-balancing loss"] = float(per_layer.mean())
        self.reset()
        return out

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


def router_stats(chunks: list, arch: ArchConfig, runtime: Runtime, aux_loss_coeff: float) -> Optional[RouterStats]:
    """RouterStats for a MoE model, None for a dense one."""
    return RouterStats(chunks, arch, runtime, aux_loss_coeff) if arch.is_moe else None
