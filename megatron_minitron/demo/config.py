"""What the demo runs: one frozen, documented config value, and the default pruning targets.

The defaults are sized for 2 CPU cores (the whole demo, teacher included, in under 15 minutes);
every size, step count, layout and the data can be scaled up from the command line. Nothing here
imports megatron.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Optional

from megatron_minitron.config import ArchConfig, ConfigError, unknown_fields

MARKER = "demo_config.json"
"""The file that marks a directory as a demo run (so that a new run may replace it)."""

AGGREGATIONS = ("mean", "l2", "var")
"""Sequence and batch aggregations of the 3x3 grid (the paper's Table 11)."""

ARMS = ("width_kd", "depth_kd", "scratch", "width_lm")
"""The retrained arms, all at the same number of training tokens."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Every knob of `minitron demo`."""

    out: Optional[str] = None
    """Run directory: scores, pruned checkpoints, arms, results.json, report.md, plots/ (default runs/demo, or
    runs/demo-moe with --moe)."""
    arch: Optional[str] = None
    """Teacher architecture: a preset name or an ArchConfig JSON file (vocabulary from the tokenizer);
    default "small", or "small-moe" with --moe."""
    teacher: Optional[str] = None
    """An existing teacher checkpoint to prune instead of training one."""
    teacher_cache: str = ".cache/minitron-demo"
    """Where trained teachers are kept, one directory per teacher configuration, so a second run
    with the same settings skips pretraining."""
    tensor_parallel: int = 2
    """Tensor-parallel size of every stage (teacher training, importance, retraining)."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size of every stage."""
    teacher_iters: int = 200
    """Teacher training steps."""
    teacher_lr: float = 1e-3
    """Teacher peak learning rate (cosine decay to a tenth of it)."""
    retrain_iters: int = 30
    """Steps of every retraining arm (equal tokens: the same steps, batch and sequence length). Kept
    short next to the teacher's steps, as in the papers (retraining tokens are ~1-2% of the teacher's):
    an arm trained on the LM loss for as long as the teacher would catch up with a teacher this small."""
    retrain_lr: float = 1e-3
    """Peak learning rate of every retraining arm (cosine decay to a tenth of it)."""
    warmup_iters: int = 10
    """Linear warm-up steps of the teacher."""
    retrain_warmup_iters: int = 3
    """Linear warm-up steps of every retraining arm."""
    seq_length: int = 256
    """Tokens per sample (training, validation and calibration)."""
    micro_batch_size: int = 4
    """Samples per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step."""
    eval_interval: int = 10
    """Validate every retraining arm every this many steps (the loss-vs-tokens curves)."""
    eval_iters: int = 10
    """Validation global batches per evaluation (the same samples for every model)."""
    calib_samples: int = 64
    """Calibration samples of the importance pass."""
    lm_loss_samples: int = 32
    """Samples of each depth (layer/block removed) LM-loss pass."""
    task_limit: int = 50
    """Documents of the built-in task minitron_continuation (choose the true continuation among four; chance
    25%) scored on the teacher and every retrained student (0: none; needs lm-eval, the eval extra). Each
    model's score costs about 4 s plus 0.07 s per document of one CPU core for the `small` teacher."""
    width_hidden_size: Optional[int] = None
    """Hidden size of the width-pruned arms (default: 3/4 of the teacher's, see default_targets)."""
    width_ffn_hidden_size: Optional[int] = None
    """MLP size of the width-pruned arms (default: half the teacher's)."""
    width_num_attention_heads: Optional[int] = None
    """Query heads of the width-pruned arms (default: half the heads of each query group)."""
    depth_num_layers: Optional[int] = None
    """Layers of the depth-pruned arm (default: the depth whose parameter count is nearest the width arm's)."""
    random_seed: int = 1
    """Seed of the random-ranking baseline."""
    seed: int = 1234
    """Seed of every RNG (weights of the teacher and the from-scratch arm, data order)."""
    seeds: int = 1
    """Repeats of every retraining arm and zero-shot comparison, repeat k with seed + k (training data
    order, held-out validation samples, from-scratch weights) and random_seed + k (the random ranking);
    the teacher and the importance scores are computed once. The report gives each comparison as mean
    ± sample standard deviation over the repeats and a verdict only when the margin exceeds it."""
    data_path: Optional[tuple] = None
    """Training blend (Megatron-LM's --data-path list); None: the embedded corpus."""
    valid_data_path: Optional[tuple] = None
    """Separate validation blend."""
    split: str = "98,2,0"
    """train,valid,test proportions of data_path (the embedded corpus has its own held-out split)."""
    tokenizer: Optional[str] = None
    """SentencePiece .model or HF tokenizer.json (default: one trained on the embedded corpus)."""
    cache_dir: str = ".cache/minitron-data"
    """Tokenizer, tokenized corpus and dataset index caches."""
    moe: bool = False
    """Run the Mixture-of-Experts demo instead (demo/moe.py): a MoE teacher pruned to half its experts'
    parameters by whole experts, by expert width and by random experts, each distilled at equal tokens."""
    started_at: Optional[float] = None
    """Wall-clock start (time.time()) of the command, for the report's wall time."""

    def __post_init__(self) -> None:
        for name, dense, moe in (("out", "runs/demo", "runs/demo-moe"), ("arch", "small", "small-moe")):
            if getattr(self, name) is None:
                object.__setattr__(self, name, moe if self.moe else dense)
        if self.moe and self.seeds != 1:
            raise ConfigError(f"--seeds {self.seeds} repeats the dense demo's comparisons; --moe runs one seed: "
                              f"drop --seeds or --moe")
        for name in ("tensor_parallel", "pipeline_parallel", "teacher_iters", "retrain_iters", "seeds", "seq_length",
                     "micro_batch_size", "global_batch_size", "eval_iters", "calib_samples", "lm_loss_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_interval", "task_limit"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for warmup, iters in (("warmup_iters", "teacher_iters"), ("retrain_warmup_iters", "retrain_iters")):
            if not 0 <= getattr(self, warmup) < getattr(self, iters):
                raise ConfigError(f"--{warmup.replace('_', '-')} {getattr(self, warmup)} must be >= 0 and below "
                                  f"--{iters.replace('_', '-')} {getattr(self, iters)}")
        for name in ("data_path", "valid_data_path"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        for name in ("data_path", "valid_data_path"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_json(cls, data: dict) -> "DemoConfig":
        unknown = unknown_fields(cls, data)
        if unknown:
            raise ConfigError(f"demo config has unknown keys {unknown}")
        return cls(**data)

    @property
    def seed_values(self) -> tuple:
        """(seed, random-ranking seed) of every repeat, the first the run's own --seed/--random-seed."""
        return tuple((self.seed + k, self.random_seed + k) for k in range(self.seeds))

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    def teacher_key(self, arch: ArchConfig, world_size: int) -> str:
        """Fingerprint of everything that makes a trained teacher what it is (the cache key)."""
        fields = {name: getattr(self, name) for name in (
            "teacher_iters", "teacher_lr", "warmup_iters", "seq_length", "micro_batch_size", "global_batch_size",
            "eval_iters", "seed", "data_path", "valid_data_path", "split", "tokenizer", "tensor_parallel",
            "pipeline_parallel")}
        blob = json.dumps({"arch": arch.to_json(), "world_size": world_size, **fields}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _round_down(value: int, multiple: int) -> int:
    return max(multiple, value // multiple * multiple)


def default_targets(teacher: ArchConfig, cfg: DemoConfig):
    """(width Target, depth Target) of about half the teacher's parameters unless the config names sizes.

    Width, as the paper's width-pruned models: hidden size x 3/4, MLP x 1/2, half the query heads of
    every group (whole groups halved when each holds one head), sizes kept divisible by the
    tensor-parallel size. Depth: the number of layers whose parameter count is nearest the width
    target's (ties to the deeper model), so the two compete at about equal parameters; the dropped
    layers are the contiguous block whose removal raises the LM loss least.
    """
    from megatron_minitron.plan import Target

    tp = cfg.tensor_parallel
    arch = teacher.explicit()
    per_group = arch.num_attention_heads // arch.query_groups
    if cfg.width_num_attention_heads is not None:
        heads, groups = cfg.width_num_attention_heads, None
    elif per_group >= 2:
        heads, groups = arch.query_groups * (per_group // 2), arch.query_groups
    else:
        groups = max(tp, arch.query_groups // 2)
        heads = groups
    width = Target(hidden_size=cfg.width_hidden_size or _round_down(arch.hidden_size * 3 // 4, 8 * tp),
                   ffn_hidden_size=cfg.width_ffn_hidden_size or _round_down(arch.ffn_hidden_size // 2, 8 * tp),
                   num_attention_heads=heads, num_query_groups=groups)
    if cfg.depth_num_layers is not None:
        layers = cfg.depth_num_layers
    else:
        from megatron_minitron.plan.make import check_target

        width_params = arch.replace(**check_target(arch, width), kv_channels=arch.head_dim).num_parameters()
        candidates = range(max(1, cfg.pipeline_parallel), arch.num_layers)
        layers = min(candidates, key=lambda n: (abs(arch.replace(num_layers=n).num_parameters() - width_params), -n))
    if not 1 <= layers < arch.num_layers:
        raise ConfigError(f"--depth-num-layers {layers}: keep 1..{arch.num_layers - 1} of the teacher's "
                          f"{arch.num_layers} layers")
    return width, Target(num_layers=layers, layer_metric="block")
