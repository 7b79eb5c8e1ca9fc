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
  (1.0 is perfectly balanced; E means one expert got everything);
- `moe starved experts`: for each MoE layer whose routing has collapsed, its starved experts (below).

Routing collapse, precisely: an expert is *starved* in a step when it received less than
`STARVED_SHARE` (10%) of its fair share of the layer's routed token slots (fair share = 1/E of them);
a layer whose step leaves any expert starved has collapsed onto the others. The logging rank prints a
warning naming the layers, the starved experts and their loads at the first step in which a layer
collapses; each layer once until `RECOVERED_AFTER` steps in a row have no starved expert at all, which
prints a line saying so. A router that flickers around the threshold (small batches do) therefore
does not fill the log; metrics.jsonl has every step.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_minitron.config import ArchConfig
from megatron_minitron.runtime.dist import Runtime

TRACKER_NAME = "load_balancing_loss"  # the name megatron's router logs its aux loss under

STARVED_SHARE = 0.1
"""An expert whose share of a layer's routed token slots in a step is below this fraction of the fair
share 1/E is starved: the routing of its layer has collapsed onto the other experts."""

RECOVERED_AFTER = 20
"""Steps in a row without any starved expert after which routing counts as recovered (and a layer that
collapses again is reported again): fewer let a router flickering around the threshold warn every few steps."""


def starved_experts(load: dict[str, list[float]], share: float = STARVED_SHARE) -> dict[str, list[int]]:
    """{layer: experts below `share` x 1/E of the layer's routed slots}, for layers with any (`load`
    as in `moe expert load`: per layer, each expert's fraction of the routed slots)."""
    out = {}
    for layer, row in load.items():
        low = [e for e, x in enumerate(row) if x < share / len(row)]
        if low:
            out[layer] = low
    return out


def collapse_message(starved: dict[str, list[int]], load: dict[str, list[float]], iteration: Optional[int]) -> str:
    """The warning line for a step whose routing collapsed in some layers."""
    where = f" at iteration {iteration}" if iteration is not None else ""
    parts = []
    for layer, experts in starved.items():
        row = load[layer]
        loads = ", ".join(f"{100 * row[e]:.1f}%" for e in experts)
        parts.append(f"layer {layer}: experts {experts} of {len(row)} got {loads} of the routed tokens (fair share "
                     f"{100 / len(row):.1f}%; busiest expert {100 * max(row):.1f}%)")
    return (f"warning: MoE routing collapse{where}: {'; '.join(parts)}. An expert counts as starved below "
            f"{STARVED_SHARE:g}x its fair share; a larger --moe-aux-loss-coeff pushes the routers toward balance")


class RouterStats:
    """Forward hooks on every router of this rank's model chunks, and the per-step reduction."""

    def __init__(self, chunks: list, arch: ArchConfig, runtime: Runtime, aux_loss_coeff: float) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.arch, self.runtime, self.aux_loss_coeff = arch, runtime, aux_loss_coeff
        # on the routers' device: a count added per router call stays there (on a GPU, a copy to the host
        # per router and micro-batch would wait for the forward pass each time); `reduce` reads it once a step
        self.tokens = torch.zeros(arch.num_layers, arch.num_experts, dtype=torch.float64, device=runtime.device)
        self.warned: set[str] = set()  # layers reported since routing last recovered
        self.clean_steps = 0  # steps in a row without a starved expert
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

    def reduce(self, num_microbatches: int, iteration: Optional[int] = None) -> dict:
        """This step's statistics, identical on every rank; resets for the next step. Warns (logging rank)
        when the set of starved experts changes (`iteration` names the step in the message).

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
        both = torch.cat([self.tokens.flatten(), torch.zeros(layers, dtype=torch.float64, device=rt.device)
                          if aux is None else aux.to(rt.device, torch.float64)])
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
        out["moe starved experts"] = self._check_collapse(out["moe expert load"], iteration)
        self.reset()
        return out

    def _check_collapse(self, load: dict[str, list[float]], iteration: Optional[int]) -> dict[str, list[int]]:
        starved = starved_experts(load)
        new = {layer: experts for layer, experts in starved.items() if layer not in self.warned}
        self.clean_steps = 0 if starved else self.clean_steps + 1
        recovered = bool(self.warned) and self.clean_steps == RECOVERED_AFTER
        if self.runtime.is_logging_rank:
            if new:
                print(collapse_message(new, load, iteration), flush=True)
            elif recovered:
                where = f" at iteration {iteration}" if iteration is not None else ""
                print(f"MoE routing recovered{where}: for {RECOVERED_AFTER} steps every expert got at least "
                      f"{STARVED_SHARE:g}x its fair share of the routed tokens", flush=True)
        self.warned = set() if recovered else self.warned | set(new)
        return starved

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


def router_stats(chunks: list, arch: ArchConfig, runtime: Runtime, aux_loss_coeff: float) -> Optional[RouterStats]:
    """RouterStats for a MoE model, None for a dense one."""
    return RouterStats(chunks, arch, runtime, aux_loss_coeff) if arch.is_moe else None
