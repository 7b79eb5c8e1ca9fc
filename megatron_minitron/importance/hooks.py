"""Forward hooks that turn this rank's activations into importance statistics, and the reductions
that make them global.

Every hook reduces an activation to per-sample moments over the sequence (`stats.sequence_moments`);
`Collector._flush` turns those into the three sequence aggregations, batched over many calls, and
adds their batch sums into a float64 accumulator: nothing proportional to the number of tokens is
kept. What each rank sees:

- input of `linear_proj` [s, b, local heads * kv]: this TP rank's query heads (and groups);
- input of `linear_fc2` [s, b, local ffn]: this TP rank's neurons (post-activation);
  output of `linear_fc1`: the same neurons before the activation (gate and up halves for GLU);
- LayerNorm outputs [s, b, h]: replicated over TP, or split along the sequence under sequence
  parallelism. Either way each TP rank reduces one tp-th of the tokens (its SP chunk, or its share
  of the replicated output: on the `small` preset at TP2 the norms were half of the activation
  elements the hooks read, so the work is shared rather than repeated). The per-sample partial sums
  are summed over the TP group before the (non-linear) sequence aggregation, batched in `_flush`,
  and each rank then folds in one tp-th of the hidden channels (the other columns stay zero, and
  `reduce` sums them over TP). With the Transformer-Engine spec the two LayerNorms of a layer are
  fused into `linear_qkv` / `linear_fc1`; their output is recomputed from the fused module's input
  and its `layer_norm_weight` / `layer_norm_bias` (the same formula, in fp32);
- input and output of each TransformerLayer: Block Importance, 1 - mean cosine over tokens (split
  over TP by tokens, like the norms);
- MoE layers: the routed experts in `importance/moe.py` (`ExpertStats`); the shared expert's
  `linear_fc2` input as a dense MLP's (key shared_ffn); the pre-MLP norm as a module of its own, also
  with the Transformer-Engine spec (no fc1 to fuse it into).

`Collector.reduce` then gathers head/neuron slices over TP in rank order, sums over DP and
assembles the layers of all pipeline stages, naming the process group of every collective.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Iterator, Optional

import torch

from megatron_minitron.importance.stats import (RAW_WIDTH, partial_sums, raw_update, sequence_aggregates,
                                               sequence_moments, whole_sequence_aggregates)


def norm_output(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *, normalization: str,
                eps: float, zero_centered_gamma: bool) -> torch.Tensor:
    """LayerNorm/RMSNorm of x in fp32, as megatron's norms compute it (used where TE fuses the norm
    into the following linear layer, so there is no norm module to hook)."""
    x = x.float()
    gamma = weight.float() + 1 if zero_centered_gamma else weight.float()
    if normalization == "RMSNorm":
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * gamma
    var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + eps) * gamma
    return out if bias is None else out + bias.float()


class _Pending:
    """One key's hook calls not yet folded in: their accumulator rows, and a buffer of slots for
    their values, all from activations of one shape."""

    def __init__(self, shape: torch.Size, buffer: torch.Tensor) -> None:
        self.shape, self.buffer = shape, buffer
        self.rows: list[int] = []


class Collector:
    """Importance statistics of the layers on this rank's pipeline stage.

    Use `with collector.attached(): <forward passes>` then `collector.reduce()` on every rank.

    hook_threads: intra-op threads for the hooks' operations (None: the forward pass's). The hooks run
    many operations of 0.1-2 M elements, each of which, split over the intra-op threads, pays their
    synchronisation; `benchmarks/importance_overhead.py --hook-threads 1` measures whether running
    them on one thread costs less. On 2 CPU cores with no other job it did not (small-moe: throughput
    ratio 0.909 with 1 thread against 0.916 with the pass's 2), so the default stays None.
    """

    def __init__(self, model, runtime, arch, *, seq_length: int, ffn_pre: bool = False, use_te: bool = False,
                 expert_weighting: str = "router", hook_threads: Optional[int] = None):
        from megatron_minitron.model.build import unwrap

        if hook_threads is not None and hook_threads < 1:
            raise ValueError(f"hook_threads must be None or at least 1, got {hook_threads}")
        self.hook_threads = hook_threads

        self.gpt = unwrap(model)
        self.runtime, self.arch, self.seq_length = runtime, arch, seq_length
        self.ffn_pre, self.use_te = ffn_pre, use_te
        self.sp = runtime.parallel.sequence_parallel
        tp = runtime.parallel.tensor_parallel
        # Norm outputs and layer inputs/outputs: without SP every TP rank holds them whole, and each
        # reduces one tp-th of the tokens; with SP each already holds one tp-th of the sequence.
        # Either way the per-sample sums are completed over TP before the (non-linear) sequence
        # aggregation, and each rank then folds in one tp-th of the hidden channels.
        self.tp, self.tp_index = tp, runtime.tp_rank
        self.shared = tp > 1 and not self.sp
        self.channels = self._part(arch.hidden_size) if tp > 1 else slice(None)
        self._sequence_split = {"hidden", "final_norm"} if tp > 1 else set()
        self.layers = list(self.gpt.decoder.layers)
        self.first_layer = self.layers[0].layer_number - 1 if self.layers else 0
        n, dev = len(self.layers), runtime.device
        heads, groups = arch.num_attention_heads // tp, arch.query_groups // tp
        ffn = arch.ffn_hidden_size // tp

        def zeros(*shape):
            return torch.zeros(*shape, RAW_WIDTH, dtype=torch.float64, device=dev)

        self.acc = {"heads": zeros(n, heads), "query_groups": zeros(n, groups), "ffn": zeros(n, ffn),
                    "hidden": zeros(2 * n, arch.hidden_size), "final_norm": zeros(1, arch.hidden_size)}
        # MoE layers: routed experts in importance/moe.py; a shared expert's neurons as a dense MLP's
        self.moe_rows = [arch.moe_layers[layer.layer_number - 1] for layer in self.layers] if arch.is_moe \
            else [False] * n
        self.experts = None
        if arch.is_moe:
            from megatron_minitron.importance.moe import ExpertStats

            self.experts = ExpertStats(self.layers, arch, runtime, seq_length=seq_length, weighting=expert_weighting)
            if arch.moe_shared_expert_ffn_hidden_size is not None:
                self.acc["shared_ffn"] = zeros(n, arch.moe_shared_expert_ffn_hidden_size // tp)
        # activations whose columns feed several accumulators, in order
        self._columns = {"attention": ("heads", "query_groups")}
        if ffn_pre:
            for key in (("ffn_pre_gate", "ffn_pre_up") if arch.gated else ("ffn_pre",)):
                self.acc[key] = zeros(n, ffn)
            if arch.gated:  # fc1's output holds the gate's columns, then the up projection's
                self._columns["ffn_pre"] = ("ffn_pre_gate", "ffn_pre_up")
        self.bi = torch.zeros(n, 2, dtype=torch.float64, device=dev)  # sum of cosines, token count
        self._work = torch.empty(0, dtype=torch.float32, device=dev)  # scratch of the largest activation seen
        self._handles: list = []
        self._views: dict = {}  # shape -> a view of _work
        self.hook_seconds = 0.0  # this thread's CPU time inside the hooks (and their flushes) so far
        # this process's CPU time (all threads) inside them: adds the intra-op worker threads' part of the
        # hooks' parallel operations, which `hook_seconds` does not see
        self.hook_process_seconds = 0.0
        self.hook_wall_seconds = 0.0  # wall time inside them (with waits: for other ranks, other threads)
        self._pending: dict[str, _Pending] = {}  # key -> its calls not yet folded in: see `_flush`

    # ------------------------------------------------------------------------------------ hooks
    # Every tensor operation has a fixed cost (3-10 us inside a forward pass here, even for a view),
    # so the hooks run as few as they can: the activation-sized passes, and nothing else. Everything
    # small runs batched over up to 64 hook calls in `_flush`.
    def _add(self, key: str, row: int, activation: torch.Tensor) -> None:
        """Reduce one activation [s, b, c] to its per-sample moments for accumulator row `row` of `key`."""
        slot = self._slot(key, activation.shape, (3, math.prod(activation.shape[1:])))
        sequence_moments(activation, self._scratch(activation), out=slot)
        self._commit(key, row)

    def _slot(self, key: str, shape: torch.Size, entry: tuple) -> torch.Tensor:
        """Where one hook call on an activation of `shape` writes its values (fp32 `entry`) for
        `_flush`: the next slot of a buffer each key keeps, allocated once (the hooks allocate nothing
        that outlives a call, and `_flush` reads the slots without stacking them). How freed
        activation memory is kept for the forward pass itself: `runtime.host_memory`."""
        pending = self._pending.get(key)
        if pending is not None and pending.shape != shape:  # a shorter last micro-batch
            self._flush(key)
            pending = None
        if pending is None:
            capacity = max(1, min(64, (1 << 22) // math.prod(entry)))  # at most 16 MB a key
            pending = self._pending[key] = _Pending(shape, torch.empty(capacity, *entry, dtype=torch.float32,
                                                                       device=self._work.device))
        return pending.buffer[len(pending.rows)]

    def _commit(self, key: str, row: int) -> None:
        """The slot `_slot` gave for `key` now holds accumulator row `row`'s values."""
        pending = self._pending[key]
        pending.rows.append(row)
        if len(pending.rows) == pending.buffer.shape[0]:
            self._flush(key)

    def _flush(self, key: Optional[str] = None) -> None:
        """Fold the pending values of `key` (of every key by default) into the accumulators: per-sample
        moments for the channel scores, per-token head norms, per-token dot products and norms for
        Block Importance. Every TP rank flushes the same keys at the same calls (the same hooks see
        the same micro-batches), so the sequence-split keys all-reduce their sums here, batched."""
        for name in [key] if key is not None else list(self._pending):
            pending = self._pending[name]
            n, shape = len(pending.rows), pending.shape
            if n == 0:
                continue
            rows = torch.tensor(pending.rows, device=self.bi.device)
            pending.rows.clear()
            values = pending.buffer[:n]
            if name == "bi":  # dot, |before|, |after| per token
                dot, before, after = values.flatten(2).unbind(1)
                # the cosine as F.cosine_similarity takes it: each norm at least 1e-8
                cos = dot / (before.clamp(min=1e-8) * after.clamp(min=1e-8))
                self.bi.index_add_(0, rows, torch.stack([cos.double().sum(-1), torch.full_like(
                    rows, cos.shape[-1], dtype=torch.float64)], dim=-1))
                continue
            if name == "attention":
                values = self._head_moments(values)
            else:
                values = values.view(n, 3, *shape[1:])
            if name in self._sequence_split:  # complete each sample's sums over the TP ranks' tokens
                sums = partial_sums(values, shape[0])  # [n, b, c, 3]
                torch.distributed.all_reduce(sums, group=self.runtime.tp_group)
                seq = sequence_aggregates(sums[:, :, self.channels], self.seq_length)
            else:
                seq = whole_sequence_aggregates(values, self.seq_length)
            updates = raw_update(seq.transpose(0, 1))  # [n, c, 6]
            if name in self._columns:  # one activation holding several accumulators' columns
                start = 0
                for target in self._columns[name]:
                    width = self.acc[target].shape[1]
                    self.acc[target].index_add_(0, rows, updates[:, start:start + width])
                    start += width
                continue
            acc = self.acc[name][:, self.channels] if name in ("hidden", "final_norm") else self.acc[name]
            acc.index_add_(0, rows, updates)

    def _head_moments(self, norms: torch.Tensor) -> torch.Tensor:
        """Moments [n, 3, b, heads + groups] of n calls' per-token head norms [n, s, b, heads]: the
        heads' columns, then their groups' (a group's norm is the square root of the sum of its heads'
        squared norms), reduced together as the columns of one tensor."""
        n, s, b, _ = norms.shape
        per_group = self.arch.num_attention_heads // self.arch.query_groups
        norms = norms.transpose(0, 1)  # [s, n, b, heads]: the sequence first, as the moments take it
        groups = norms.square().reshape(s, n, b, -1, per_group).sum(-1).sqrt_()
        columns = torch.cat([norms, groups], dim=-1)
        return sequence_moments(columns).view(3, n, b, -1).transpose(0, 1)

    def _part(self, n: int) -> slice:
        """This TP rank's tp-th of n items."""
        return slice(self.tp_index * n // self.tp, (self.tp_index + 1) * n // self.tp)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens of an activation [s, ...] this rank reduces: one tp-th of the sequence of an
        activation every TP rank holds whole; all of it otherwise (an SP chunk, or anything at TP1)."""
        return x[self._part(x.shape[0])] if self.shared else x

    def _scratch(self, x: torch.Tensor) -> torch.Tensor:
        """A contiguous fp32 [s, rest] view, for an activation x [s, ...], over one buffer reused by
        every hook call (its contents do not survive the next call): see `stats.sequence_moments`
        for why not a fresh one. The views are kept, as each costs an operation."""
        shape = (x.shape[0], math.prod(x.shape[1:]))
        view = self._views.get(shape)
        if view is None:
            if self._work.numel() < shape[0] * shape[1]:
                self._work = torch.empty(shape[0] * shape[1], dtype=torch.float32, device=self._work.device)
                self._views.clear()
            view = self._views[shape] = self._work[:shape[0] * shape[1]].view(shape)
        return view

    def _attention_hook(self, i: int):
        kv = self.arch.head_dim

        def hook(_module, args):
            x = args[0]
            s, b = x.shape[:2]
            x = x if x.dtype == torch.float32 else x.float()
            heads = x.reshape(s, b, -1, kv)
            torch.linalg.vector_norm(heads, dim=-1, out=self._slot("attention", x.shape, heads.shape[:3]))
            self._commit("attention", i)
        return hook

    def _fc2_hook(self, i: int, key: str = "ffn"):
        def hook(_module, args):
            self._add(key, i, args[0])
        return hook

    def _fc1_hook(self, i: int):
        def hook(_module, _args, output):
            out, bias = output
            pre = out if bias is None else out + bias
            self._add("ffn_pre", i, pre)
        return hook

    def _norm_output_hook(self, key: str, row: int):
        def hook(_module, _args, output):
            self._add(key, row, self._tokens(output[0] if isinstance(output, tuple) else output))
        return hook

    def _fused_norm_hook(self, row: int):
        config = self.gpt.config

        def hook(module, args):
            normed = norm_output(self._tokens(args[0]), module.layer_norm_weight,
                                 getattr(module, "layer_norm_bias", None), normalization=config.normalization,
                                 eps=config.layernorm_epsilon,
                                 zero_centered_gamma=config.layernorm_zero_centered_gamma)
            self._add("hidden", row, normed)
        return hook

    def _block_hook(self, i: int):
        def hook(_module, _args, kwargs, output):
            before = self._tokens(kwargs["hidden_states"] if "hidden_states" in kwargs else _args[0])
            after = self._tokens(output[0] if isinstance(output, tuple) else output)
            before = before if before.dtype == torch.float32 else before.float()
            after = after if after.dtype == torch.float32 else after.float()
            # per token [s, b]: the dot product (through the scratch buffer) and both norms; the
            # cosines follow in `_flush`
            slot = self._slot("bi", before.shape, (3, *before.shape[:2]))
            torch.sum(torch.mul(before, after, out=self._scratch(before).view(before.shape)), -1, out=slot[0])
            torch.linalg.vector_norm(before, dim=-1, out=slot[1])
            torch.linalg.vector_norm(after, dim=-1, out=slot[2])
            self._commit("bi", i)
        return hook

    @contextlib.contextmanager
    def attached(self) -> Iterator["Collector"]:
        """Hooks on every layer of this stage while the block runs; removed afterwards."""
        timed = self._timed
        try:
            for i, layer in enumerate(self.layers):
                attn, mlp = layer.self_attention, layer.mlp
                self._handles.append(attn.linear_proj.register_forward_pre_hook(timed(self._attention_hook(i))))
                if self.moe_rows[i]:
                    if "shared_ffn" in self.acc:
                        self._handles.append(mlp.shared_experts.linear_fc2.register_forward_pre_hook(
                            timed(self._fc2_hook(i, "shared_ffn"))))
                else:
                    self._handles.append(mlp.linear_fc2.register_forward_pre_hook(timed(self._fc2_hook(i))))
                    if self.ffn_pre:
                        self._handles.append(mlp.linear_fc1.register_forward_hook(timed(self._fc1_hook(i))))
                if self.use_te:
                    self._handles.append(attn.linear_qkv.register_forward_pre_hook(
                        timed(self._fused_norm_hook(2 * i))))
                    # a MoE layer has no fc1 to fuse its pre-MLP norm into: it is a module of its own
                    self._handles.append(layer.pre_mlp_layernorm.register_forward_hook(
                        timed(self._norm_output_hook("hidden", 2 * i + 1))) if self.moe_rows[i] else
                        mlp.linear_fc1.register_forward_pre_hook(timed(self._fused_norm_hook(2 * i + 1))))
                else:
                    self._handles.append(layer.input_layernorm.register_forward_hook(
                        timed(self._norm_output_hook("hidden", 2 * i))))
                    self._handles.append(layer.pre_mlp_layernorm.register_forward_hook(
                        timed(self._norm_output_hook("hidden", 2 * i + 1))))
                self._handles.append(layer.register_forward_hook(timed(self._block_hook(i)), with_kwargs=True))
            if self.experts is not None:
                self._handles += self.experts.attach(timed)
            final = getattr(self.gpt.decoder, "final_layernorm", None)
            if final is not None:
                self._handles.append(final.register_forward_hook(timed(self._norm_output_hook("final_norm", 0))))
            yield self
            timed(self._flush)()  # (not after a failure: it may all-reduce with TP ranks that are not there)
            if self.experts is not None:
                timed(self.experts.flush)()
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    def _timed(self, function):
        """function, adding the thread's CPU time inside it to `hook_seconds` (thread time: waits for
        other ranks in a flush's all-reduce do not count, work does) and the process's to
        `hook_process_seconds` (with several intra-op threads, the hooks' larger operations also run
        on the others, and `hook_seconds` misses that part of their cost), and the wall time to
        `hook_wall_seconds`. With `hook_threads`, function runs on that many intra-op threads."""
        @functools.wraps(function)
        def timed(*args, **kwargs):
            start, start_process, start_wall = time.thread_time(), time.process_time(), time.perf_counter()
            threads = None if self.hook_threads is None else torch.get_num_threads()
            if threads is not None:
                torch.set_num_threads(self.hook_threads)
            try:
                return function(*args, **kwargs)
            finally:
                if threads is not None:
                    torch.set_num_threads(threads)
                self.hook_seconds += time.thread_time() - start
                self.hook_process_seconds += time.process_time() - start_process
                self.hook_wall_seconds += time.perf_counter() - start_wall
        return timed

    # ------------------------------------------------------------------------------- reductions
    def reduce(self) -> dict[str, torch.Tensor]:
        """Global raw statistics on every rank: raw.heads [L, H, 6], raw.query_groups, raw.ffn (and
        raw.ffn_pre*), raw.hidden [2L + 1, h, 6] and bi [L, 2]; float64 on the CPU. A MoE model adds
        raw.experts, raw.expert_ffn, experts_router_mass (importance/moe.py) and raw.shared_ffn."""
        rt = self.runtime
        out = {}
        for key in [k for k in self.acc if k not in ("hidden", "final_norm")]:
            out[f"raw.{key}"] = self._over_pipeline(self._over_data(self._gather_tensor_parallel(self.acc[key])))
        hidden = self._over_data(self._over_shares(self.acc["hidden"]))
        hidden = self._over_pipeline(hidden.reshape(len(self.layers), 2, *hidden.shape[1:])).flatten(0, 1)
        final = self._over_data(self._over_shares(self.acc["final_norm"]))
        if rt.parallel.pipeline_parallel > 1:  # the final norm lives on the last stage: share it
            torch.distributed.broadcast(final, src=rt.last_stage_rank, group=rt.pp_group)
        out["raw.hidden"] = torch.cat([hidden, final.cpu()])
        bi = self.bi.clone()
        if self.tp > 1:  # each TP rank saw a chunk of the sequence, or took a share of the tokens
            torch.distributed.all_reduce(bi, group=rt.tp_group)
        out["bi"] = self._over_pipeline(self._over_data(bi))
        if self.experts is not None:
            out.update(self._moe_rows(out))
        return out

    def _moe_rows(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The routed experts' statistics; NaN rows where a layer has no such MLP: dense-MLP keys on MoE
        layers (dropped when every layer is MoE), shared-expert keys on dense layers."""
        moe = torch.tensor(self.arch.moe_layers)
        for key in [k for k in out if k.startswith("raw.ffn")]:
            if moe.all():
                del out[key]
            else:
                out[key][moe] = float("nan")
        if "raw.shared_ffn" in out:
            out["raw.shared_ffn"][~moe] = float("nan")
        return self.experts.reduce()

    def _over_shares(self, t: torch.Tensor) -> torch.Tensor:
        """Sum the hidden-channel shares of the TP ranks (each filled only its own columns)."""
        t = t.clone()
        if self.tp > 1:
            torch.distributed.all_reduce(t, group=self.runtime.tp_group)
        return t

    def _gather_tensor_parallel(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate the channel slices [L, c, 6] of the TP ranks in rank order (dim 1)."""
        tp = self.runtime.parallel.tensor_parallel
        if tp == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(tp)]
        torch.distributed.all_gather(parts, local.contiguous(), group=self.runtime.tp_group)
        return torch.cat(parts, dim=1)

    def _over_data(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel replicas (each saw different samples)."""
        t = t.clone()
        if self.runtime.data_parallel > 1:
            torch.distributed.all_reduce(t, group=self.runtime.dp_group)
        return t

    def _over_pipeline(self, local: torch.Tensor) -> torch.Tensor:
        """Stack the per-layer rows [L_stage, ...] of all pipeline stages (uneven stages too) into
        [L, ...], in layer order, on the CPU."""
        rt = self.runtime
        if rt.parallel.pipeline_parallel == 1:
            return local.cpu()
        counts = rt.parallel.layers_per_stage(self.arch.num_layers)
        padded = torch.zeros(max(counts), *local.shape[1:], dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in counts]
        torch.distributed.all_gather(parts, padded, group=rt.pp_group)
        return torch.cat([part[:n] for part, n in zip(parts, counts)]).cpu()
