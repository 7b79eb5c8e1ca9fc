"""The Megatron training loop: DDP + megatron optimizer + forward-backward schedule + checkpoints.

Read it top to bottom: `TrainConfig` (what a run asks for), `build_trainer` (model, DDP, optimizer,
scheduler), `train_step` (one global batch through megatron's schedule), `evaluate`, and `train`
(the loop: resume, step, log, validate, save). The loss lives in a *task*: a function
`forward_step(data_iterator, model) -> (output, loss_func)` in megatron's schedule convention, so
distillation reuses this loop with its own task. Losses are per-token sums (megatron's
`calculate_per_token_loss`): masked tokens count for nothing and DP sizes agree exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from megatron_minitron.config import ArchConfig, ConfigError
from megatron_minitron.model import checkpoint as ckpt
from megatron_minitron.model.build import build_model
from megatron_minitron.runtime.dist import Runtime
from megatron_minitron.training.losses import masked_sum
from megatron_minitron.training.moe_stats import RouterStats, router_stats


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation and bookkeeping of one training run."""

    train_iters: int = 300
    """Optimizer steps of the whole run (a resumed run continues up to this number)."""
    micro_batch_size: int = 4
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all data-parallel ranks (a multiple of micro_batch_size x DP)."""
    seq_length: int = 256
    """Tokens per sequence."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    lr_warmup_iters: int = 20
    """Linear warm-up steps."""
    lr_decay_style: str = "cosine"
    """"cosine", "linear" or "constant" after warm-up."""
    weight_decay: float = 0.01
    """Decoupled weight decay (megatron skips biases and norms)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (megatron's DistributedOptimizer)."""
    bf16: Optional[bool] = None
    """bf16 parameters with fp32 main weights; None means bf16 on GPU, fp32 on CPU."""
    log_interval: int = 10
    """Print a progress line every this many steps."""
    eval_interval: int = 100
    """Validate every this many steps (0: only at the end)."""
    eval_iters: int = 10
    """Validation global batches per evaluation."""
    save_interval: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    exit_interval: Optional[int] = None
    """Save and stop once this iteration is reached (to split a run into jobs)."""
    seed: int = 1234
    """Seed of every RNG (weights of a model trained from scratch, dropout)."""
    moe_aux_loss_coeff: float = 0.01
    """Weight of the routers' load-balancing loss of a Mixture-of-Experts model (Switch Transformer's
    auxiliary loss, summed over MoE layers; 0 turns it off; ignored for dense models)."""

    def __post_init__(self) -> None:
        for name in ("train_iters", "micro_batch_size", "global_batch_size", "seq_length", "log_interval",
                     "eval_iters"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"global_batch_size={self.global_batch_size} is not a multiple of "
                              f"micro_batch_size={self.micro_batch_size}")
        if not 0 <= self.lr_warmup_iters < self.train_iters:
            raise ConfigError(f"lr_warmup_iters={self.lr_warmup_iters} must be >= 0 and below "
                              f"train_iters={self.train_iters}")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(f"lr_decay_style={self.lr_decay_style!r} is not one of cosine, linear, constant")
        if not self.moe_aux_loss_coeff >= 0:
            raise ConfigError(f"moe_aux_loss_coeff must be >= 0, got {self.moe_aux_loss_coeff}")

    def num_microbatches(self, data_parallel: int) -> int:
        """Micro-batches per step on each data-parallel rank."""
        per_step = self.micro_batch_size * data_parallel
        if self.global_batch_size % per_step:
            raise ConfigError(f"global_batch_size={self.global_batch_size} is not divisible by micro_batch_size x "
                              f"data-parallel size = {self.micro_batch_size} x {data_parallel}")
        return self.global_batch_size // per_step

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Trainer:
    """The student side of training: model chunks in DDP, optimizer and scheduler."""

    arch: ArchConfig
    runtime: Runtime
    cfg: TrainConfig
    model: list
    optimizer: object
    scheduler: object
    iteration: int = 0
    consumed_samples: int = 0
    chunks: Optional[list] = None
    """What megatron's schedule runs, when it is not `model` itself (distillation wraps the student
    and the teacher of each stage in one chunk); the optimizer and checkpoints still see `model`."""
    moe_stats: Optional[RouterStats] = None
    """Router statistics (aux loss, expert load) of a Mixture-of-Experts model; None when dense."""

    @property
    def schedule_chunks(self) -> list:
        return self.chunks if self.chunks is not None else self.model


def build_trainer(arch: ArchConfig, runtime: Runtime, cfg: TrainConfig,
                  attach: Optional[Callable[[torch.nn.Module], None]] = None, parallel=None) -> Trainer:
    """Model (DDP-wrapped), megatron optimizer and LR scheduler for this rank. `attach(model)` may add
    trainable submodules (distillation projections) before DDP and the optimizer see the model.
    `parallel` overrides the runtime's layout for this model as build_model allows (a dense student
    distilled from a MoE teacher under expert parallelism is built without it)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    cfg.num_microbatches(runtime.data_parallel)
    bf16 = cfg.bf16 if cfg.bf16 is not None else runtime.device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    module = build_model(arch, runtime, dtype=dtype, moe_aux_loss_coeff=cfg.moe_aux_loss_coeff, parallel=parallel)
    if attach is not None:
        attach(module.module if hasattr(module, "module") else module)
    config = module.config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=cfg.use_distributed_optimizer)
    model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)]
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad, bf16=bf16, params_dtype=dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer), model)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=cfg.lr_warmup_iters,
        lr_decay_steps=cfg.train_iters, lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay, wd_incr_steps=cfg.train_iters, wd_incr_style="constant")
    # Hooks megatron's schedule calls: gradient sync control and the final all-reduce/scaling.
    config.no_sync_func = model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return Trainer(arch=arch, runtime=runtime, cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler,
                   moe_stats=router_stats([module], arch, runtime, cfg.moe_aux_loss_coeff))


# ----------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True, kw_only=True)
class Task:
    """What the loop optimises: a megatron forward step and the names of the losses it reports."""

    forward_step: Callable
    """`forward_step(data_iterator, model) -> (output, loss_func)`; loss_func returns megatron's
    per-token triple (loss sum, token count, {name: tensor([sum, count])})."""
    losses: tuple[str, ...]
    """Names in the report dict, in a fixed order; the first is the one that is optimised."""
    stage_losses: Optional[Callable[[dict, bool], dict[str, float]]] = None
    """`stage_losses(reduced, training)`: losses computed on any pipeline stage (not only the last),
    reduced over all ranks and reset, after each schedule run; gets the reduced last-stage losses
    (distillation's intermediate losses, rescaled to the KD loss)."""
    eval_only: tuple[str, ...] = ()
    """Losses the task computes only in evaluation (not reported by training steps)."""
    get_state: Optional[Callable[[], dict]] = None
    """State the task carries from step to step, saved in checkpoints for an exact resume."""
    set_state: Optional[Callable[[dict], None]] = None
    """Restores what get_state returned."""


def lm_task(device: torch.device) -> Task:
    """Language-model task: next-token cross-entropy, summed over unmasked tokens."""

    def forward_step(data_iterator: Iterator[dict], model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        position_ids = batch["position_ids"].to(device, non_blocking=True)
        loss_mask = batch["loss_mask"].to(device, non_blocking=True)
        per_token = model(tokens, position_ids, None, labels=labels)
        return per_token, lambda output: lm_loss_with_report(output, loss_mask)

    return Task(forward_step=forward_step, losses=("lm loss",))


def lm_loss_with_report(per_token_loss: torch.Tensor, loss_mask: torch.Tensor):
    """megatron's per-token-loss convention: (loss sum, token count, {"lm loss": [sum, count]})."""
    loss_sum, num_tokens = masked_sum(per_token_loss, loss_mask)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


# ----------------------------------------------------------------------------------------- steps
def reduce_reports(reports: list[dict], names: tuple[str, ...], runtime: Runtime) -> dict[str, float]:
    """Token-weighted mean of each reported loss over micro-batches and data-parallel ranks, known on
    every rank (summed over DP on the last pipeline stage, then broadcast along the pipeline)."""
    totals = torch.zeros(len(names), 2, dtype=torch.float64, device=runtime.device)
    for report in reports:  # only the last stage has reports
        for i, name in enumerate(names):
            totals[i] += report[name].to(totals)
    if runtime.is_last_stage:
        torch.distributed.all_reduce(totals, group=runtime.dp_group)
    torch.distributed.broadcast(totals, src=runtime.last_stage_rank, group=runtime.pp_group)
    out = {name: float(totals[i, 0] / totals[i, 1].clamp(min=1)) for i, name in enumerate(names)}
    out["tokens"] = float(totals[0, 1])
    return out


def train_step(trainer: Trainer, task: Task, data_iterator: Iterator[dict]) -> dict[str, float]:
    """One optimizer step on one global batch; returns the reduced losses, grad norm and lr."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg, runtime = trainer.cfg, trainer.runtime
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    if trainer.moe_stats is not None:
        trainer.moe_stats.reset()
    reports = get_forward_backward_func()(
        forward_step_func=task.forward_step, data_iterator=data_iterator, model=trainer.schedule_chunks,
        num_microbatches=cfg.num_microbatches(runtime.data_parallel), seq_length=cfg.seq_length,
        micro_batch_size=cfg.micro_batch_size, forward_only=False)
    success, grad_norm, _ = trainer.optimizer.step()
    if not success:
        raise FloatingPointError(f"optimizer step {trainer.iteration + 1} failed (non-finite gradients)")
    trainer.scheduler.step(increment=1)
    trainer.iteration += 1
    trainer.consumed_samples += cfg.global_batch_size
    out = reduce_reports(reports, task.losses, runtime)
    for name in task.eval_only:
        out.pop(name)
    if task.stage_losses is not None:
        out.update(task.stage_losses(out, True))
    if trainer.moe_stats is not None:
        out.update(trainer.moe_stats.reduce(cfg.num_microbatches(runtime.data_parallel), trainer.iteration))
    out.update(grad_norm=float(grad_norm or 0.0), lr=trainer.optimizer.param_groups[0]["lr"])
    return out


@torch.no_grad()
def evaluate(trainer: Trainer, task: Task, data_iterator: Iterator[dict], num_iters: int) -> dict:
    """Token-weighted mean losses over num_iters global batches, forward only."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg, runtime = trainer.cfg, trainer.runtime
    for chunk in trainer.schedule_chunks:
        chunk.eval()
    reports: list[dict] = []
    for _ in range(num_iters):
        reports += get_forward_backward_func()(
            forward_step_func=task.forward_step, data_iterator=data_iterator, model=trainer.schedule_chunks,
            num_microbatches=cfg.num_microbatches(runtime.data_parallel), seq_length=cfg.seq_length,
            micro_batch_size=cfg.micro_batch_size, forward_only=True)
    for chunk in trainer.schedule_chunks:
        chunk.train()
    out = reduce_reports(reports, task.losses, runtime)
    if task.stage_losses is not None:
        out.update(task.stage_losses(out, False))
    return out


# ------------------------------------------------------------------------------------- the loop
@dataclass(frozen=True, kw_only=True)
class RunPaths:
    """Where a run writes: checkpoints and metrics."""

    save: Path
    """Checkpoint root (Megatron-LM layout)."""
    metrics: Path
    """JSONL metrics file (one object per step and per evaluation)."""


class MetricsLog:
    """Appends JSON lines on the logging rank; prints progress lines to stdout."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = path
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def keep_until(self, iteration: int) -> int:
        """Drop the records of steps after `iteration` (written before a kill, replayed by the resumed
        run) and a last line cut short, so the file reads one trajectory; returns the lines dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if record.get("iteration", 0) <= iteration:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        return dropped

    def say(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)


def resume(trainer: Trainer, root: Path, task: Optional[Task] = None) -> bool:
    """Restore model, optimizer, scheduler, RNG and data position from root's latest checkpoint."""
    if ckpt.latest_iteration(root) is None:
        return False
    info = ckpt.resolve(root)
    ckpt.check_architecture(trainer.arch, info.arch, where=str(info.path))
    saved = {"expert_parallel": 1, **info.metadata.get("saved_with", {})}  # older checkpoints: no EP
    runtime = trainer.runtime
    same_layout = saved == ckpt.saved_layout(runtime)
    state = ckpt.load_checkpoint(info, model=trainer.model[0], runtime=runtime, optimizer=trainer.optimizer,
                                 scheduler=trainer.scheduler, load_rng=same_layout)
    trainer.iteration = int(state.get("iteration", info.iteration))
    trainer.consumed_samples = int(state.get("consumed_samples", 0))
    if task is not None and task.set_state is not None and "task" in state:
        task.set_state(state["task"])
    return True


def init_from(trainer: Trainer, path: Path, optional_prefixes: tuple[str, ...] = ()) -> ckpt.CheckpointInfo:
    """Load only the weights of a checkpoint (fine-tuning, distillation students); its architecture
    must be the trainer's. Parameters under `optional_prefixes` may be absent from it."""
    info = ckpt.resolve(path)
    ckpt.check_architecture(trainer.arch, info.arch, where=str(info.path))
    ckpt.load_checkpoint(info, model=trainer.model[0], optional_prefixes=optional_prefixes)
    # A mixed-precision optimizer copied the model's initial weights into its fp32 main weights when
    # it was built; without this refresh its first step would write those back over the loaded ones.
    trainer.optimizer.reload_model_params()
    return info


def save(trainer: Trainer, root: Path, *, tokenizer: Optional[dict], provenance: Optional[dict] = None,
         task: Optional[Task] = None) -> Path:
    """Checkpoint with optimizer, scheduler, RNG, data position and the task's state."""
    train_state = {"iteration": trainer.iteration, "consumed_samples": trainer.consumed_samples}
    if task is not None and task.get_state is not None:
        train_state["task"] = task.get_state()
    return ckpt.save_checkpoint(root, model=trainer.model[0], arch=trainer.arch, runtime=trainer.runtime,
                                iteration=trainer.iteration, tokenizer=tokenizer, optimizer=trainer.optimizer,
                                scheduler=trainer.scheduler, provenance=provenance, train_state=train_state)


def train(trainer: Trainer, *, task: Task, train_batches: Callable[[int], Iterator[dict]],
          valid_batches: Optional[Callable[[], Iterator[dict]]], paths: RunPaths, tokenizer: Optional[dict] = None,
          provenance: Optional[dict] = None, task_scores: Optional[Callable[[Trainer], dict]] = None,
          task_scores_interval: int = 0) -> list[dict]:
    """Run (or resume) until cfg.train_iters; returns this process's per-step records.

    train_batches(start_sample) yields this rank's micro-batches from a global sample index (so a
    resumed run sees exactly the data it would have seen); valid_batches() restarts validation data.
    task_scores(trainer), called by every rank every task_scores_interval iterations and at the end, returns
    downstream scores (evaluation/run.py's TaskScorer) for metrics.jsonl and the progress log.
    """
    cfg, runtime = trainer.cfg, trainer.runtime
    log = MetricsLog(paths.metrics, enabled=runtime.is_logging_rank)
    if resume(trainer, paths.save, task):
        log.say(f"resumed from {paths.save} at iteration {trainer.iteration} "
                f"({trainer.consumed_samples} samples consumed)")
    dropped = log.keep_until(trainer.iteration)
    if dropped:
        log.say(f"dropped {dropped} lines of {paths.metrics} past iteration {trainer.iteration} (steps run after "
                f"the last checkpoint, run again now)")
    data = train_batches(trainer.consumed_samples)
    stop = min(cfg.train_iters, cfg.exit_interval or cfg.train_iters)
    records, start, first_iter = [], time.perf_counter(), trainer.iteration
    tokens_per_step = cfg.global_batch_size * cfg.seq_length
    while trainer.iteration < stop:
        t0 = time.perf_counter()
        out = train_step(trainer, task, data)
        dt = time.perf_counter() - t0
        bad = {k: v for k, v in out.items() if k.endswith("loss") and not math.isfinite(v)}
        if bad:
            terms = ", ".join(f"{k} {v}" for k, v in out.items() if k.endswith("loss"))
            raise FloatingPointError(f"non-finite {', '.join(bad)} at iteration {trainer.iteration} ({terms})")
        done = trainer.iteration - first_iter
        elapsed = time.perf_counter() - start
        record = {"iteration": trainer.iteration, **out, "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                  "consumed_samples": trainer.consumed_samples, "elapsed_s": elapsed}
        records.append(record)
        log.write({"kind": "train", **record})
        if trainer.iteration % cfg.log_interval == 0 or trainer.iteration == stop:
            eta = elapsed / done * (stop - trainer.iteration)
            losses = " ".join(f"{k} {v:.4f}" for k, v in out.items() if k.endswith("loss"))
            log.say(f"iter {trainer.iteration:6d}/{cfg.train_iters} | {losses} | lr {out['lr']:.3e} | "
                    f"grad norm {out['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s | "
                    f"ETA {_fmt_seconds(eta)}")
        at_end = trainer.iteration == stop
        if valid_batches is not None and ((cfg.eval_interval and trainer.iteration % cfg.eval_interval == 0) or at_end):
            val = evaluate(trainer, task, valid_batches(), cfg.eval_iters)
            val_record = {"kind": "valid", "iteration": trainer.iteration, **{f"val {k}": v for k, v in val.items()}}
            val_record["val ppl"] = math.exp(min(val.get("lm loss", val[task.losses[0]]), 50.0))
            log.write(val_record)
            log.say(f"validation at iter {trainer.iteration}: " +
                    " | ".join(f"{k} {v:.4f}" for k, v in val_record.items()
                               if k.endswith("loss") or k.endswith("ppl")))
            records[-1]["valid"] = val
        if task_scores is not None and ((task_scores_interval and trainer.iteration % task_scores_interval == 0)
                                        or at_end):
            scores = task_scores(trainer)
            log.write({"kind": "tasks", "iteration": trainer.iteration, **scores})
            log.say(f"tasks at iter {trainer.iteration}: " + " | ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            records[-1]["tasks"] = scores
        if (cfg.save_interval and trainer.iteration % cfg.save_interval == 0) or at_end:
            path = save(trainer, paths.save, tokenizer=tokenizer, provenance=provenance, task=task)
            log.say(f"saved checkpoint {path}")
    return records


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
