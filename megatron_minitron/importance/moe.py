"""Importance of the routed experts of Mixture-of-Experts layers: hooks on megatron-core's MoE layer
(router, experts) and the reduction that makes their statistics global.

What is measured, per MoE layer and routed expert e (a token's value is 0 when its top-k does not
include e, so every statistic is one of the dense statistics over all tokens of the calibration set):

- the expert's output norm per token, ||p_e(x) expert_e(x)|| with `weighting` "router" (the expert's
  actual contribution to the layer's output, which is sum_e p_e(x) expert_e(x)), or ||expert_e(x)||
  with "plain"; aggregated over sequence and samples as every width score (raw.experts [L, E, 6]);
- each neuron of its MLP: the input of its linear_fc2 (raw.expert_ffn [L, E, Fe, 6]). megatron scales
  an expert's activation by the routing probability before linear_fc2, so with "router" this is the
  literal input of that layer; with "plain" it is divided by the probability again;
- the router's probability mass: the mean over tokens of p_e(x) (experts_router_mass [L, E]).

Where the tokens are (megatron-core 0.16.1, all-gather token dispatcher, which importance always
builds): the router sees this rank's tokens (its sequence-parallel chunk under TP); the dispatcher
gathers the tokens of its TP x EP group, so each expert on a rank sees, for its slice of the expert
width, every token of the group's samples routed to it: the per-sample sums are complete on the rank,
and each (layer, expert, width slice) is held by exactly one rank of each TP x EP group. The groups of
a pipeline stage see disjoint samples, so one all-reduce over the world of tensors that each rank
filled only at its own places counts every token once, at any TP/PP/EP/DP.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_minitron.importance.stats import RAW_WIDTH, raw_update, sequence_aggregates

WEIGHTINGS = ("router", "plain")
"""Values of --expert-weighting (see the module docstring)."""


class ExpertStats:
    """Statistics of the routed experts of this stage's MoE layers; `attach` then `reduce`."""

    def __init__(self, layers: list, arch, runtime, *, seq_length: int, weighting: str) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"--expert-weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
        self.arch, self.runtime, self.seq_length, self.plain = arch, runtime, seq_length, weighting == "plain"
        self.layers = [(row, layer.layer_number - 1, layer.mlp) for row, layer in enumerate(layers)
                       if arch.moe_layers[layer.layer_number - 1]]
        n, dev = len(layers), runtime.device
        ep, tp = runtime.parallel.expert_parallel, runtime.parallel.tensor_parallel
        self.local_experts, self.width = arch.num_experts // ep, arch.expert_ffn_hidden_size // tp
        self.ffn = torch.zeros(n, self.local_experts, self.width, RAW_WIDTH, dtype=torch.float64, device=dev)
        self.output = torch.zeros(n, self.local_experts, RAW_WIDTH, dtype=torch.float64, device=dev)
        self.mass = torch.zeros(n, arch.num_experts, dtype=torch.float64, device=dev)
        self.tokens = torch.zeros(n, dtype=torch.float64, device=dev)  # router tokens per row
        self._call: dict = {}  # the MoE layer running now: its micro-batch shape, probabilities, fc2 inputs
        self.chunk_positions = self._chunk_positions()

    def _chunk_positions(self) -> torch.Tensor:
        """For each rank of the dispatcher's TP x EP group (in group order, the order of the gathered
        tokens), the index of its data-parallel position among the group's: TP peers hold the same
        samples, EP peers other ones. One all-gather, before any forward pass."""
        if not self.layers:
            return torch.zeros(1, dtype=torch.long)
        group = self._dispatcher(self.layers[0][2]).tp_ep_group
        size = torch.distributed.get_world_size(group=group)
        if size == 1:
            return torch.zeros(1, dtype=torch.long)
        mine = torch.tensor([self.runtime.dp_rank], dtype=torch.long, device=self.runtime.device)
        parts = [torch.empty_like(mine) for _ in range(size)]
        torch.distributed.all_gather(parts, mine, group=group)
        ranks = torch.cat(parts).cpu()
        return torch.unique(ranks, return_inverse=True)[1]

    @staticmethod
    def _dispatcher(mlp):
        from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

        dispatcher = mlp.token_dispatcher
        if not isinstance(dispatcher, MoEAllGatherTokenDispatcher):
            raise RuntimeError(f"expert importance reads the all-gather token dispatcher's token order, but the model "
                               f"was built with {type(dispatcher).__name__}: build it with "
                               f"build_model(..., moe_dispatcher='allgather')")
        return dispatcher

    # ------------------------------------------------------------------------------------ hooks
    def attach(self, timed: Callable) -> list:
        """Register the hooks (each wrapped by `timed`); returns their handles."""
        handles = []
        for row, _layer, mlp in self.layers:
            experts = mlp.experts
            handles.append(mlp.router.register_forward_hook(timed(self._router_hook(row))))
            handles.append(experts.register_forward_pre_hook(timed(self._experts_pre_hook(mlp))))
            fc2s = [e.linear_fc2 for e in experts.local_experts] if hasattr(experts, "local_experts") \
                else [experts.linear_fc2]  # SequentialMLP: one MLP per expert; grouped GEMM: one for all
            for fc2 in fc2s:
                handles.append(fc2.register_forward_pre_hook(timed(self._fc2_hook)))
            handles.append(experts.register_forward_hook(timed(self._experts_hook(row, experts))))
        return handles

    def _router_hook(self, row: int):
        def hook(_module, args, output):
            x, probs = args[0], output[0]  # x [s, b, h] (this rank's tokens); probs [s * b, E], 0 off the top-k
            self.mass[row] += probs.sum(0, dtype=torch.float64)
            self.tokens[row] += probs.shape[0]
            self._call = {"batch": x.shape[1], "chunk": x.shape[0] * x.shape[1], "fc2": []}
        return hook

    def _experts_pre_hook(self, mlp):
        dispatcher = self._dispatcher(mlp)

        def hook(_module, args):
            _tokens, per_expert, probs = args[:3]
            # the gathered-token index of each dispatched row (expert-major, tokens in order)
            self._call.update(per_expert=per_expert, probs=probs,
                              index=dispatcher.reversed_local_input_permutation_mapping)
        return hook

    def _fc2_hook(self, _module, args):
        self._call["fc2"].append(args[0])

    def _experts_hook(self, row: int, experts):
        group = experts.tp_group

        def hook(_module, _args, output):
            call, self._call = self._call, {}
            out = output[0].float()
            if torch.distributed.get_world_size(group=group) > 1:  # row-parallel partial sums: complete them
                out = out.clone()
                torch.distributed.all_reduce(out, group=group)
            norms = torch.linalg.vector_norm(out, dim=-1)
            fc2 = call["fc2"]
            x = (fc2[0] if len(fc2) == 1 else torch.cat(fc2)).float()
            if self.plain:  # undo megatron's scaling of the activation by the routing probability
                p = call["probs"].float().clamp(min=torch.finfo(torch.float32).tiny)
                x, norms = x / p[:, None], norms / p
            self._add(row, torch.cat([x, norms[:, None]], dim=1), call,
                      leader=torch.distributed.get_rank(group=group) == 0)
        return hook

    def _add(self, row: int, values: torch.Tensor, call: dict, *, leader: bool) -> None:
        """Per-sample sums over the sequence of each expert's rows values [N, Fe + 1] (its neurons, then
        its output norm), their sequence aggregations, and their batch sums into the accumulators."""
        batch, chunk = call["batch"], call["chunk"]
        samples = int(self.chunk_positions.max()) + 1
        samples *= batch
        index = call["index"].to(torch.long)
        positions = self.chunk_positions.to(index.device)
        sample = positions[index // chunk] * batch + index % chunk % batch
        expert = torch.repeat_interleave(torch.arange(self.local_experts, device=index.device),
                                         call["per_expert"].to(index.device).long())
        values = values.double()
        sums = torch.zeros(self.local_experts * samples, values.shape[1], 3, dtype=torch.float64,
                           device=values.device)
        sums.index_add_(0, expert * samples + sample, torch.stack([values, values.square(), values.abs()], dim=-1))
        seq = sequence_aggregates(sums, self.seq_length).view(self.local_experts, samples, -1, 3)
        update = raw_update(seq.transpose(0, 1))  # [experts, Fe + 1, 6]
        self.ffn[row] += update[:, :-1]
        if leader:  # every expert-TP rank has the whole output norm: one of them counts it
            self.output[row] += update[:, -1]

    # ------------------------------------------------------------------------------- reductions
    def reduce(self) -> dict[str, torch.Tensor]:
        """Global raw.experts [L, E, 6], raw.expert_ffn [L, E, Fe, 6] and experts_router_mass [L, E]
        on every rank (float64 on the CPU; NaN rows for dense layers): one all-reduce over the world."""
        arch, rt = self.arch, self.runtime
        L, E, Fe = arch.num_layers, arch.num_experts, arch.expert_ffn_hidden_size
        ffn = torch.zeros(L, E, Fe, RAW_WIDTH, dtype=torch.float64, device=rt.device)
        output = torch.zeros(L, E, RAW_WIDTH, dtype=torch.float64, device=rt.device)
        mass = torch.zeros(L, E + 1, dtype=torch.float64, device=rt.device)
        for row, layer, mlp in self.layers:
            first = mlp.local_expert_indices[0]
            experts = slice(first, first + self.local_experts)
            rank = torch.distributed.get_rank(group=mlp.experts.tp_group)
            ffn[layer, experts, rank * self.width:(rank + 1) * self.width] = self.ffn[row]
            output[layer, experts] = self.output[row]
            mass[layer, :E], mass[layer, E] = self.mass[row], self.tokens[row]
        flat = torch.cat([ffn.flatten(), output.flatten(), mass.flatten()])
        torch.distributed.all_reduce(flat, group=torch.distributed.group.WORLD)
        ffn, output, mass = flat.split([ffn.numel(), output.numel(), mass.numel()])
        dense = torch.tensor([not flag for flag in arch.moe_layers])
        out = {"raw.experts": output.view(L, E, RAW_WIDTH).cpu(), "raw.expert_ffn": ffn.view(L, E, Fe, RAW_WIDTH).cpu()}
        mass = mass.view(L, E + 1).cpu()
        out["experts_router_mass"] = (mass[:, :E] / mass[:, E:].clamp(min=1)).float()
        for value in out.values():
            value[dense] = float("nan")
        return out
