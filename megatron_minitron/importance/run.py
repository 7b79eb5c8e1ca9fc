"""Importance on calibration data: the forward passes, with hooks, and the depth (LM-loss) passes.

`collect` runs every calibration micro-batch once through megatron's forward-only pipeline schedule
with the hooks of `hooks.Collector` attached and returns global scores. `layer_removal_losses` runs
the data again once per removed layer (or contiguous block): a forward hook on each removed
TransformerLayer hands its input through as its output, which is exactly the model built without
that layer (the layer's own computation is simply discarded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Iterable, Iterator, Optional

import torch

from megatron_minitron.importance.calibration import micro_batch_sizes
from megatron_minitron.importance.moe import WEIGHTINGS
from megatron_minitron.importance.scores import WIDTH_KEYS, Scores, ScoresManifest, hidden_scores
from megatron_minitron.importance.stats import aggregate, check_aggregation


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImportanceConfig:
    """How importance is measured (the calibration data itself is a CalibrationData)."""

    micro_batch_size: int = 4
    """Samples per forward pass."""
    seq_aggregation: str = "mean"
    """Aggregation over the sequence of the reported scores: mean (of |x|), l2 or var."""
    batch_aggregation: str = "l2"
    """Aggregation over samples of the reported scores: mean, l2 or var (paper's best: mean, l2)."""
    ffn_source: str = "post"
    """MLP neuron score from the post-activation (input of linear_fc2) or the pre-activation X·W1ᵀ."""
    hidden_final_norm: bool = False
    """Include the final LayerNorm's output in the hidden-channel score."""
    lm_loss: bool = False
    """Also measure the LM loss with each single layer removed (one extra pass per layer)."""
    block_sizes: tuple[int, ...] = ()
    """Also measure the LM loss with each contiguous block of k layers removed, for each k."""
    lm_loss_samples: Optional[int] = None
    """Samples used for the LM-loss passes (default: all calibration samples)."""
    expert_weighting: str = "router"
    """MoE models: whether an expert's output norm per token (and its neurons' activations) are
    weighted by the token's routing probability for that expert ("router") or not ("plain"). Default
    router: a MoE layer's output is sum_e p_e(x) expert_e(x), so the weighted norm is what the expert
    actually adds to each token; "plain" ranks an expert by what it computes, even where the router
    gives it little weight."""

    def validate(self, num_layers: int) -> None:
        check_aggregation(self.seq_aggregation, axis="sequence")
        check_aggregation(self.batch_aggregation, axis="batch")
        if self.micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if self.ffn_source not in ("post", "pre"):
            raise ValueError(f"--ffn-source {self.ffn_source!r}: choose post or pre")
        for k in self.block_sizes:
            if not 1 <= k < num_layers:
                raise ValueError(f"--lm-loss-blocks {k}: a block must hold 1..{num_layers - 1} layers of the "
                                 f"model's {num_layers}")
        if self.lm_loss_samples is not None and self.lm_loss_samples < 1:
            raise ValueError(f"--lm-loss-samples must be >= 1, got {self.lm_loss_samples}")
        if self.expert_weighting not in WEIGHTINGS:
            raise ValueError(f"--expert-weighting {self.expert_weighting!r}: choose one of {', '.join(WEIGHTINGS)}")

    def check_expert_parallel(self, num_samples: int, *, data_parallel: int, expert_parallel: int) -> None:
        """At EP > 1 the data-parallel ranks exchange tokens inside every MoE layer, so all of them must
        run the same micro-batches: the samples (and the LM-loss samples) must fill whole rounds of
        micro-batch-size x DP."""
        if expert_parallel == 1:
            return
        round_ = self.micro_batch_size * data_parallel
        lm_samples = min(self.lm_loss_samples or num_samples, num_samples) if self.lm_loss or self.block_sizes else None
        for flag, n in (("--num-samples", num_samples), ("--lm-loss-samples", lm_samples)):
            if n is not None and n % round_:
                raise ValueError(f"{flag} {n} is not a multiple of --micro-batch-size x data-parallel size = "
                                 f"{self.micro_batch_size} x {data_parallel}; at --ep {expert_parallel} every "
                                 f"data-parallel rank must run the same micro-batches (use {n - n % round_ or round_})")


class Progress:
    """Samples done, samples/s and ETA, printed by the logging rank every few seconds."""

    def __init__(self, what: str, total: int, enabled: bool, every: float = 10.0) -> None:
        self.what, self.total, self.enabled, self.every = what, total, enabled, every
        self.start = self.last = time.time()
        self.done = 0

    def update(self, samples: int) -> None:
        self.done += samples
        now = time.time()
        if self.enabled and (now - self.last >= self.every or self.done >= self.total):
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"{self.what}: {self.done}/{self.total} samples  {rate:.1f} samples/s  ETA {eta:.0f}s", flush=True)
            self.last = now


def forward_passes(model, runtime, batches: Iterable[dict], sizes: list[int], seq_length: int,
                   progress: Optional[Progress] = None) -> tuple[float, float]:
    """Run this DP rank's micro-batches forward only; returns (loss sum, token count) of the LM loss
    summed over the data-parallel group and known on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_minitron.training.loop import lm_loss_with_report

    device = runtime.device
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    iterator = iter(batches)

    def forward_step(data_iterator, chunk):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
        per_token = chunk(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss(output):
            loss_sum, count, report = lm_loss_with_report(output, torch.ones_like(batch["loss_mask"]))
            totals.add_(report["lm loss"].double())
            return loss_sum, count, report
        return per_token, loss

    model.eval()
    with torch.no_grad():
        for size, count in _runs(sizes):  # one schedule call per run of equal-size micro-batches
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iterator, model=[model],
                                        num_microbatches=count, seq_length=seq_length, micro_batch_size=size,
                                        forward_only=True)
            if progress is not None:
                progress.update(size * count * runtime.data_parallel)
    if runtime.is_last_stage and runtime.data_parallel > 1:
        torch.distributed.all_reduce(totals, group=runtime.dp_group)
    if runtime.parallel.pipeline_parallel > 1:
        torch.distributed.broadcast(totals, src=runtime.last_stage_rank, group=runtime.pp_group)
    return float(totals[0]), float(totals[1])


def _runs(sizes: list[int]) -> Iterator[tuple[int, int]]:
    """(size, count) of consecutive equal sizes."""
    i = 0
    while i < len(sizes):
        j = i
        while j < len(sizes) and sizes[j] == sizes[i]:
            j += 1
        yield sizes[i], j - i
        i = j


@contextlib.contextmanager
def layers_removed(model, removed: set[int]):
    """While active, each TransformerLayer whose global index is in `removed` passes its input through."""
    from megatron_minitron.model.build import unwrap

    def passthrough(_module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return (hidden, output[1]) if isinstance(output, tuple) else hidden

    handles = [layer.register_forward_hook(passthrough, with_kwargs=True)
               for layer in unwrap(model).decoder.layers if layer.layer_number - 1 in removed]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def layer_removal_losses(model, runtime, batches: Callable[[], Iterable[dict]], sizes: list[int], seq_length: int,
                         num_layers: int, block_sizes: tuple[int, ...], *, singles: bool,
                         log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """LM loss with each single layer removed ([L]) and with each block of k layers removed ([K, L],
    NaN past the end)."""
    def loss_without(removed: set[int]) -> float:
        with layers_removed(model, removed):
            loss_sum, tokens = forward_passes(model, runtime, batches(), sizes, seq_length)
        return loss_sum / max(tokens, 1)

    out = {}
    if singles:
        out["layers_lm_loss"] = torch.tensor([loss_without({i}) for i in range(num_layers)])
        log("LM loss without each layer: " + " ".join(f"{v:.3f}" for v in out["layers_lm_loss"].tolist()))
    if block_sizes:
        table = torch.full((len(block_sizes), num_layers), float("nan"))
        for row, k in enumerate(block_sizes):
            for start in range(num_layers - k + 1):
                table[row, start] = loss_without(set(range(start, start + k)))
            log(f"LM loss without {k} layers from each start: " +
                " ".join(f"{v:.3f}" for v in table[row, : num_layers - k + 1].tolist()))
        out["blocks_lm_loss"] = table
    return out


def collect(model, runtime, arch, batches: Callable[[], Iterable[dict]], num_samples: int, seq_length: int,
            cfg: ImportanceConfig, *, use_te: bool, log: Callable[[str], None]) -> tuple[dict, float]:
    """Global score tensors (and raw statistics) from one pass over the calibration data, plus the
    model's LM loss on it."""
    from megatron_minitron.importance.hooks import Collector

    cfg.check_expert_parallel(num_samples, data_parallel=runtime.data_parallel,
                              expert_parallel=runtime.parallel.expert_parallel)
    sizes = micro_batch_sizes(num_samples, micro_batch_size=cfg.micro_batch_size, dp_rank=runtime.dp_rank,
                              dp_size=runtime.data_parallel)
    collector = Collector(model, runtime, arch, seq_length=seq_length, ffn_pre=cfg.ffn_source == "pre",
                          use_te=use_te, expert_weighting=cfg.expert_weighting)
    progress = Progress("importance", num_samples, runtime.is_logging_rank)
    start = time.thread_time()
    with collector.attached():
        loss_sum, tokens = forward_passes(model, runtime, batches(), sizes, seq_length, progress)
    forward = time.thread_time() - start - collector.hook_seconds
    log(f"importance hooks: {collector.hook_seconds:.1f} s of this rank's main-thread CPU time, against "
        f"{forward:.1f} s for the forward passes themselves ({100 * collector.hook_seconds / max(forward, 1e-9):.1f}%)")
    raw = collector.reduce()
    tensors = scores_from_raw(raw, num_samples, cfg)
    if cfg.lm_loss or cfg.block_sizes:
        n = min(cfg.lm_loss_samples or num_samples, num_samples)
        lm_sizes = micro_batch_sizes(n, micro_batch_size=cfg.micro_batch_size, dp_rank=runtime.dp_rank,
                                     dp_size=runtime.data_parallel)
        passes = (arch.num_layers if cfg.lm_loss else 0) + sum(arch.num_layers - k + 1 for k in cfg.block_sizes)
        log(f"depth: {passes} LM-loss passes over {n} samples")
        tensors.update(layer_removal_losses(model, runtime, batches, lm_sizes, seq_length, arch.num_layers,
                                            cfg.block_sizes, singles=cfg.lm_loss, log=log))
    return tensors, loss_sum / max(tokens, 1)


def scores_from_raw(raw: dict[str, torch.Tensor], num_samples: int, cfg: ImportanceConfig) -> dict:
    """Top-level score tensors under the configured aggregation, plus the raw statistics."""
    seq, batch = cfg.seq_aggregation, cfg.batch_aggregation
    tensors = {key: value.float() if key.startswith("raw.") else value for key, value in raw.items()
               if key != "bi"}
    for key in WIDTH_KEYS:
        if f"raw.{key}" in raw:
            tensors[key] = aggregate(raw[f"raw.{key}"], num_samples, seq=seq, batch=batch)
    if cfg.ffn_source == "pre" and "raw.ffn" in raw:
        tensors["ffn"] = tensors.get("ffn_pre_gate", tensors.get("ffn_pre"))
    tensors["hidden"] = hidden_scores(raw["raw.hidden"], num_samples, seq=seq, batch=batch,
                                      final_norm=cfg.hidden_final_norm)
    bi = raw["bi"]
    tensors["layers_bi"] = (1 - bi[:, 0] / bi[:, 1].clamp(min=1)).float()
    return tensors


def make_scores(tensors: dict, *, arch, info, calibration, num_samples: int, cfg: ImportanceConfig,
                use_te: bool, runtime, lm_loss: float) -> Scores:
    """Tensors plus the manifest that says where they come from."""
    import megatron.core

    p = runtime.parallel
    manifest = ScoresManifest(
        architecture=arch.explicit().to_json(), arch_fingerprint=arch.explicit().fingerprint(),
        checkpoint=str(info.root), iteration=info.iteration,
        data={**calibration.describe(), "tokenizer": info.tokenizer, "lm_loss": lm_loss},
        num_samples=num_samples, seq_length=calibration.seq_length, micro_batch_size=cfg.micro_batch_size,
        seed=calibration.seed, seq_aggregation=cfg.seq_aggregation, batch_aggregation=cfg.batch_aggregation,
        hidden_final_norm=cfg.hidden_final_norm, ffn_source=cfg.ffn_source, block_sizes=tuple(cfg.block_sizes),
        expert_weighting=cfg.expert_weighting,
        layer_spec="transformer_engine" if use_te else "local",
        layout={"tp": p.tensor_parallel, "pp": p.pipeline_parallel, "dp": runtime.data_parallel,
                "ep": p.expert_parallel,
                "sequence_parallel": p.sequence_parallel, "first_stage_layers": p.first_stage_layers,
                "last_stage_layers": p.last_stage_layers},
        megatron_core=megatron.core.__version__)
    return Scores(tensors=tensors, manifest=manifest)
