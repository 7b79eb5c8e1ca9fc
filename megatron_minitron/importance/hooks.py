"""Forward hooks that turn this rank's activations into importance statistics, and the reductions
that make them global.

Every hook reduces an activation to per-sample sums over the sequence (`stats.sequence_sums`), turns
those into the three sequence aggregations, and adds their batch sums into a float64 accumulator:
nothing proportional to the number of tokens is kept. What each rank sees:

- input of `linear_proj` [s, b, local heads * kv]: this TP rank's query heads (and groups);
- input of `linear_fc2` [s, b, local ffn]: this TP rank's neurons (post-activation);
  output of `linear_fc1`: the same neurons before the activation (gate and up halves for GLU);
- LayerNorm outputs [s, b, h]: replicated over TP, or split along the sequence under sequence
  parallelism, in which case the per-sample partial sums are summed over the TP group before the
  (non-linear) sequence aggregation. Replicated, each TP rank reduces only its own slice of the
  hidden channels (the other ranks' columns stay zero, and `reduce` sums them over TP), so the
  work is shared rather than repeated: on the `small` preset at TP2 these norms were half of the
  activation elements the hooks read. With the Transformer-Engine spec the two LayerNorms of a layer
  are fused into `linear_qkv` / `linear_fc1`; their output is recomputed from the fused module's
  input and its `layer_norm_weight` / `layer_norm_bias` (the same formula, in fp32);
- input and output of each TransformerLayer: Block Importance, 1 - mean cosine over tokens (split
  over TP by tokens where the layer's input and output are replicated, like the norms).

`Collector.reduce` then gathers head/neuron slices over TP in rank order, sums over DP and
assembles the layers of all pipeline stages, naming the process group of every collective.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from megatron_minitron.importance.stats import RAW_WIDTH, raw_update, sequence_aggregates, sequence_sums


def norm_output(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *, normalization: str,
                eps: float, zero_centered_gamma: bool, channels: slice = slice(None)) -> torch.Tensor:
    """LayerNorm/RMSNorm of x in fp32, as megatron's norms compute it (used where TE fuses the norm
    into the following linear layer, so there is no norm module to hook); only the output `channels`
    (the statistics of each token are over all of them)."""
    x = x.float()
    gamma = (weight.float() + 1 if zero_centered_gamma else weight.float())[channels]
    if normalization == "RMSNorm":
        return x[..., channels] * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * gamma
    var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
    out = (x[..., channels] - mean) * torch.rsqrt(var + eps) * gamma
    return out if bias is None else out + bias.float()[channels]


class Collector:
    """Importance statistics of the layers on this rank's pipeline stage.

    Use `with collector.attached(): <forward passes>` then `collector.reduce()` on every rank.
    """

    def __init__(self, model, runtime, arch, *, seq_length: int, ffn_pre: bool = False, use_te: bool = False):
        from megatron_minitron.model.build import unwrap

        self.gpt = unwrap(model)
        self.runtime, self.arch, self.seq_length = runtime, arch, seq_length
        self.ffn_pre, self.use_te = ffn_pre, use_te
        self.sp = runtime.parallel.sequence_parallel
        tp = runtime.parallel.tensor_parallel
        # Activations every TP rank holds whole (norm outputs, layer inputs/outputs, without SP):
        # each rank reduces its share, hidden channels [lo, hi) and one tp-th of the tokens.
        self.shared = tp > 1 and not self.sp
        self._shares, self._share_index = (tp, runtime.tp_rank) if self.shared else (1, 0)
        self.channels = self._share(arch.hidden_size)
        self.layers = list(self.gpt.decoder.layers)
        self.first_layer = self.layers[0].layer_number - 1 if self.layers else 0
        n, dev = len(self.layers), runtime.device
        heads, groups = arch.num_attention_heads // tp, arch.query_groups // tp
        ffn = arch.ffn_hidden_size // tp

        def zeros(*shape):
            return torch.zeros(*shape, RAW_WIDTH, dtype=torch.float64, device=dev)

        self.acc = {"heads": zeros(n, heads), "query_groups": zeros(n, groups), "ffn": zeros(n, ffn),
                    "hidden": zeros(2 * n, arch.hidden_size), "final_norm": zeros(1, arch.hidden_size)}
        if ffn_pre:
            for key in (("ffn_pre_gate", "ffn_pre_up") if arch.gated else ("ffn_pre",)):
                self.acc[key] = zeros(n, ffn)
        self.bi = torch.zeros(n, 2, dtype=torch.float64, device=dev)  # sum of cosines, token count
        self._work = torch.empty(0, dtype=torch.float32, device=dev)  # scratch of the largest activation seen
        self._handles: list = []
        self._pending: dict[str, list] = {}  # key -> [(row, per-sample sums [b, c, 3])] not yet folded in

    # ------------------------------------------------------------------------------------ hooks
    def _add(self, key: str, row: int, activation: torch.Tensor, *, sequence_split: bool = False) -> None:
        """Reduce one activation [s, b, c] to its per-sample sums for accumulator row `row` of `key`.
        Turning sums into statistics takes a dozen small operations; they run batched over many rows
        in `_flush`, not once per hook call (per call, their fixed cost was most of the hooks' cost)."""
        sums = sequence_sums(activation, self._scratch(activation.shape))
        if sequence_split:  # each TP rank holds a chunk of the sequence: complete the per-sample sums
            torch.distributed.all_reduce(sums, group=self.runtime.tp_group)
        pending = self._pending.setdefault(key, [])
        if pending and pending[-1][1].shape != sums.shape:  # a shorter last micro-batch
            self._flush(key)
            pending = self._pending.setdefault(key, [])
        pending.append((row, sums))
        if len(pending) >= 64:
            self._flush(key)

    def _flush(self, key: Optional[str] = None) -> None:
        """Fold the pending sums of `key` (of every key by default) into the accumulators."""
        for name in [key] if key is not None else list(self._pending):
            pending = self._pending.pop(name, [])
            if not pending:
                continue
            rows = torch.tensor([row for row, _ in pending], device=self.acc[name].device)
            sums = torch.stack([s for _, s in pending])  # [n, b, c, 3]
            updates = raw_update(sequence_aggregates(sums, self.seq_length).transpose(0, 1))  # [n, c, 6]
            acc = self.acc[name][:, self.channels] if name in ("hidden", "final_norm") else self.acc[name]
            acc.index_add_(0, rows, updates)

    def _share(self, n: int) -> slice:
        """This rank's part of n items every TP rank holds (all n when nothing is shared)."""
        return slice(self._share_index * n // self._shares, (self._share_index + 1) * n // self._shares)

    def _scratch(self, shape: torch.Size) -> torch.Tensor:
        """A contiguous fp32 tensor of `shape` over one buffer reused by every hook call (its contents
        do not survive the next call): see `stats.sequence_sums` for why not a fresh one."""
        numel = shape.numel()
        if self._work.numel() < numel:
            self._work = torch.empty(numel, dtype=torch.float32, device=self._work.device)
        return self._work[:numel].view(shape)

    def _attention_hook(self, i: int):
        kv, per_group = self.arch.head_dim, self.arch.num_attention_heads // self.arch.query_groups

        def hook(_module, args):
            x = args[0]
            s, b = x.shape[:2]
            heads = torch.linalg.vector_norm(x.float().reshape(s, b, -1, kv), dim=-1)  # [s, b, local heads]
            self._add("heads", i, heads)
            # a group's norm from its heads' norms: sqrt of the sum of their squares
            self._add("query_groups", i, heads.square().reshape(s, b, -1, per_group).sum(-1).sqrt())
        return hook

    def _fc2_hook(self, i: int):
        def hook(_module, args):
            self._add("ffn", i, args[0])
        return hook

    def _fc1_hook(self, i: int):
        def hook(_module, _args, output):
            out, bias = output
            pre = out if bias is None else out + bias
            if self.arch.gated:
                gate, up = torch.chunk(pre, 2, dim=-1)
                self._add("ffn_pre_gate", i, gate)
                self._add("ffn_pre_up", i, up)
            else:
                self._add("ffn_pre", i, pre)
        return hook

    def _norm_output_hook(self, key: str, row: int):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            self._add(key, row, out[..., self.channels], sequence_split=self.sp)
        return hook

    def _fused_norm_hook(self, row: int):
        config = self.gpt.config

        def hook(module, args):
            normed = norm_output(args[0], module.layer_norm_weight, getattr(module, "layer_norm_bias", None),
                                 normalization=config.normalization, eps=config.layernorm_epsilon,
                                 zero_centered_gamma=config.layernorm_zero_centered_gamma, channels=self.channels)
            self._add("hidden", row, normed, sequence_split=self.sp)
        return hook

    def _block_hook(self, i: int):
        def hook(_module, _args, kwargs, output):
            before = kwargs["hidden_states"] if "hidden_states" in kwargs else _args[0]
            after = output[0] if isinstance(output, tuple) else output
            before, after = before.reshape(-1, before.shape[-1]), after.reshape(-1, after.shape[-1])
            tokens = self._share(before.shape[0])
            before, after = before[tokens].float(), after[tokens].float()
            # the cosine as F.cosine_similarity takes it (each norm at least 1e-8), without its
            # activation-sized temporaries: the product goes to the reused buffer
            dot = torch.mul(before, after, out=self._scratch(before.shape)).sum(-1)
            cos = dot / (torch.linalg.vector_norm(before, dim=-1).clamp(min=1e-8)
                         * torch.linalg.vector_norm(after, dim=-1).clamp(min=1e-8))
            self.bi[i, 0] += cos.double().sum()
            self.bi[i, 1] += cos.numel()
        return hook

    @contextlib.contextmanager
    def attached(self) -> Iterator["Collector"]:
        """Hooks on every layer of this stage while the block runs; removed afterwards."""
        try:
            for i, layer in enumerate(self.layers):
                attn, mlp = layer.self_attention, layer.mlp
                self._handles.append(attn.linear_proj.register_forward_pre_hook(self._attention_hook(i)))
                self._handles.append(mlp.linear_fc2.register_forward_pre_hook(self._fc2_hook(i)))
                if self.ffn_pre:
                    self._handles.append(mlp.linear_fc1.register_forward_hook(self._fc1_hook(i)))
                if self.use_te:
                    self._handles.append(attn.linear_qkv.register_forward_pre_hook(self._fused_norm_hook(2 * i)))
                    self._handles.append(mlp.linear_fc1.register_forward_pre_hook(self._fused_norm_hook(2 * i + 1)))
                else:
                    self._handles.append(layer.input_layernorm.register_forward_hook(
                        self._norm_output_hook("hidden", 2 * i)))
                    self._handles.append(layer.pre_mlp_layernorm.register_forward_hook(
                        self._norm_output_hook("hidden", 2 * i + 1)))
                self._handles.append(layer.register_forward_hook(self._block_hook(i), with_kwargs=True))
            final = getattr(self.gpt.decoder, "final_layernorm", None)
            if final is not None:
                self._handles.append(final.register_forward_hook(self._norm_output_hook("final_norm", 0)))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._flush()

    # ------------------------------------------------------------------------------- reductions
    def reduce(self) -> dict[str, torch.Tensor]:
        """Global raw statistics on every rank: raw.heads [L, H, 6], raw.query_groups, raw.ffn (and
        raw.ffn_pre*), raw.hidden [2L + 1, h, 6] and bi [L, 2]; float64 on the CPU."""
        rt = self.runtime
        out = {}
        for key in [k for k in self.acc if k not in ("hidden", "final_norm")]:
            out[f"raw.{key}"] = self._over_pipeline(self._over_data(self._gather_tensor_parallel(self.acc[key])))
        hidden = self._over_data(self._over_shares(self.acc["hidden"]))
        hidden = self._over_pipeline(hidden.reshape(len(self.layers), 2, *hidden.shape[1:])).flatten(0, 1)
        final = self._over_data(self._over_shares(self.acc["final_norm"]))
        if rt.parallel.pipeline_parallel > 1:  # the final norm lives on the last stage: share it
            from megatron.core import parallel_state

            torch.distributed.broadcast(final, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                        group=rt.pp_group)
        out["raw.hidden"] = torch.cat([hidden, final.cpu()])
        bi = self.bi.clone()
        if self.sp or self.shared:  # each TP rank saw a chunk of the sequence, or took a share of the tokens
            torch.distributed.all_reduce(bi, group=rt.tp_group)
        out["bi"] = self._over_pipeline(self._over_data(bi))
        return out

    def _over_shares(self, t: torch.Tensor) -> torch.Tensor:
        """Sum the hidden-channel shares of the TP ranks (each filled only its own columns)."""
        t = t.clone()
        if self.shared:
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
