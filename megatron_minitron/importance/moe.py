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

PENDING_BYTES = 1 << 24
"""At most this many bytes of layers' per-(expert, sample) sums wait for `ExpertStats.flush` (else
every MoE layer of a micro-batch does)."""


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
        # raw statistics of each expert's neurons, then of its output norm, along the last axis (as
        # `flush` computes them): [rows, experts, 6, Fe + 1]
        self.stats = torch.zeros(n, self.local_experts, RAW_WIDTH, self.width + 1, dtype=torch.float64, device=dev)
        self.mass = torch.zeros(n, arch.num_experts, dtype=torch.float64, device=dev)
        self.tokens = torch.zeros(n, dtype=torch.float64, device=dev)  # router tokens per row
        self._call: dict = {}  # the MoE layer running now: its micro-batch shape, probabilities, rows filled
        self._work = torch.empty(0, dtype=torch.float32, device=dev)  # [x^2, |x|] of one fc2 input, reused
        # layers' per-(expert, sample) sums not yet folded into the accumulators: see `flush`
        self._pending: list[tuple[int, torch.Tensor, int]] = []
        self._pending_bytes = 0
        self.chunk_positions = self._chunk_positions()
        self._samples: dict = {}  # (batch, chunk) -> (sample of each gathered token, samples)

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
        if mlp.config.moe_permute_fusion:  # TE's fused permutation keeps another map than the token indices
            raise RuntimeError("expert importance reads the unfused permutation's token indices; build the model "
                               "with moe_permute_fusion=False")
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
            self._call = {"batch": x.shape[1], "chunk": x.shape[0] * x.shape[1]}
        return hook

    def _experts_pre_hook(self, mlp):
        dispatcher = self._dispatcher(mlp)

        def hook(_module, args):
            _tokens, per_expert, probs = args[:3]
            call = self._call
            token_sample, samples = self._token_samples(call["batch"], call["chunk"])
            # the gathered-token index of each dispatched row (expert-major, tokens in order), hence the
            # accumulator group (local expert, sample) of each row
            index = dispatcher.reversed_local_input_permutation_mapping
            first = torch.arange(self.local_experts, device=index.device) * samples
            groups = self.local_experts * samples
            # one zeroed buffer for the per-group sums (`flush` reads it whole): of x [groups, Fe], of x^2
            # and |x| [groups, 2, Fe], and of the output norm and its square [groups, 2]; contiguous
            # targets, as index_add_ into a strided one takes a slow path
            width = groups * self.width
            sums = torch.zeros(3 * width + 2 * groups, dtype=torch.float32, device=index.device)
            call.update(samples=samples, filled=0, sums=sums,
                        group=token_sample[index] + torch.repeat_interleave(first, per_expert.to(index.device)),
                        sum=sums[:width].view(groups, self.width),
                        square_abs=sums[width:3 * width].view(groups, 2, self.width),
                        norm=sums[3 * width:].view(groups, 2),
                        probs=probs.float().clamp(min=torch.finfo(torch.float32).tiny) if self.plain else None)
        return hook

    def _fc2_hook(self, _module, args):
        """The input x of an expert's linear_fc2 (of all local experts with grouped GEMM): x added into
        the per-(expert, sample) sums as it is, x^2 and |x| side by side in a scratch buffer and added
        into theirs, while x is still in cache (fp32 sums over at most a sequence, as the dense hooks'
        moments). Two elementwise passes and two index_add_: copying x beside its square and |x| for
        one index_add_ was a third pass over the activation."""
        call, x = self._call, args[0]
        start, stop = call["filled"], call["filled"] + x.shape[0]
        call["filled"] = stop
        if self.plain:  # undo megatron's scaling of the activation by the routing probability
            x = torch.div(x, call["probs"][start:stop, None])
        elif x.dtype != torch.float32:
            x = x.float()
        if self._work.numel() < x.numel() * 2:
            self._work = torch.empty(x.numel() * 2, dtype=torch.float32, device=self._work.device)
        work = self._work[:x.numel() * 2].view(x.shape[0], 2, x.shape[1])
        torch.square(x, out=work[:, 0])
        torch.abs(x, out=work[:, 1])
        group = call["group"][start:stop]
        call["sum"].index_add_(0, group, x)
        call["square_abs"].index_add_(0, group, work)

    def _experts_hook(self, row: int, experts):
        group = experts.tp_group
        split = torch.distributed.get_world_size(group=group) > 1

        def hook(_module, _args, output):
            call, self._call = self._call, {}
            out = output[0]
            if split:  # row-parallel partial sums: complete them
                out = out.float().clone()
                torch.distributed.all_reduce(out, group=group)
            norms = torch.linalg.vector_norm(out, dim=-1, dtype=torch.float32)
            if self.plain:
                norms = norms / call["probs"]
            # per (expert, sample): sum and sum of squares of the norms (fp32, as the neurons' sums)
            call["norm"].index_add_(0, call["group"], torch.stack([norms, norms.square()], dim=1))
            self._pending.append((row, call["sums"], call["samples"]))
            self._pending_bytes += call["sums"].numel() * call["sums"].element_size()
            if len(self._pending) == len(self.layers) or self._pending_bytes >= PENDING_BYTES:
                self.flush()
        return hook

    def flush(self) -> None:
        """Fold the pending layers' per-(expert, sample) sums over the sequence (x, x^2, |x| of each
        expert neuron [experts * samples, 3, Fe], and of the output norm) into the accumulators: their
        sequence aggregations and batch sums (fp64), for all pending layers of one micro-batch shape at
        once (a few small operations each, which per layer cost more than the hooks' arithmetic). The
        aggregations run in fp32, as the sums they read: fp64 here would only halve the speed."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        for samples in sorted({entry[2] for entry in pending}):
            batch = [entry for entry in pending if entry[2] == samples]
            rows = torch.tensor([entry[0] for entry in batch], device=self.stats.device)
            n, groups = len(batch), self.local_experts * samples
            total, square_abs, norm = torch.stack([entry[1] for entry in batch]).split(
                [groups * self.width, 2 * groups * self.width, 2 * groups], dim=1)  # see `_experts_pre_hook`
            sums = torch.cat([total.view(n, groups, 1, self.width), square_abs.view(n, groups, 2, self.width)], dim=2)
            norm = norm.view(n, groups, 2)[..., [0, 1, 0], None]  # a norm's x, x^2, |x|: it is never negative
            sums = torch.cat([sums, norm], dim=3)  # [n, groups, 3, Fe + 1]
            seq = sequence_aggregates(sums, self.seq_length, dim=2).view(n, self.local_experts, samples, 3, -1)
            self.stats.index_add_(0, rows, raw_update(seq, batch=2, dim=3))  # [n, experts, 6, Fe + 1]

    def _token_samples(self, batch: int, chunk: int) -> tuple[torch.Tensor, int]:
        """For each gathered token (chunk tokens [s, b] flattened from each rank of the TP x EP group),
        its sample among the group's (data-parallel position, then index in the micro-batch), and how
        many samples the group holds; kept per micro-batch shape."""
        key = (batch, chunk)
        if key not in self._samples:
            token = torch.arange(chunk * len(self.chunk_positions), device=self.runtime.device)
            positions = self.chunk_positions.to(token.device)
            self._samples[key] = (positions[token // chunk] * batch + token % chunk % batch,
                                  (int(self.chunk_positions.max()) + 1) * batch)
        return self._samples[key]

    # ------------------------------------------------------------------------------- reductions
    def reduce(self) -> dict[str, torch.Tensor]:
        """Global raw.experts [L, E, 6], raw.expert_ffn [L, E, Fe, 6] and experts_router_mass [L, E]
        on every rank (float64 on the CPU; NaN rows for dense layers): one all-reduce over the world."""
        self.flush()
        arch, rt = self.arch, self.runtime
        L, E, Fe = arch.num_layers, arch.num_experts, arch.expert_ffn_hidden_size
        ffn = torch.zeros(L, E, Fe, RAW_WIDTH, dtype=torch.float64, device=rt.device)
        output = torch.zeros(L, E, RAW_WIDTH, dtype=torch.float64, device=rt.device)
        mass = torch.zeros(L, E + 1, dtype=torch.float64, device=rt.device)
        for row, layer, mlp in self.layers:
            first = mlp.local_expert_indices[0]
            experts = slice(first, first + self.local_experts)
            rank = torch.distributed.get_rank(group=mlp.experts.tp_group)
            ffn[layer, experts, rank * self.width:(rank + 1) * self.width] = self.stats[row, :, :, :-1].transpose(1, 2)
            if rank == 0:  # every expert-TP rank has the whole output norm: one counts it
                output[layer, experts] = self.stats[row, :, :, -1]
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
