"""The demo's stages, run by every rank of one torchrun job (one start-up for the whole method).

Read it top to bottom: `run_demo` calls the stages in the order of the method --
`teacher` (train it, or find it in the cache), `importance` (calibration pass with hooks plus the
depth LM-loss passes), `plans` (width, depth, random and the 3x3 aggregation grid), `prune`
(streaming rewrites, the ranks sharing the work), `zero_shot` (validation LM loss of each pruned
model), `retrain` (the four arms, each for the same steps x batch x sequence = equal tokens) and
`tasks` (the built-in downstream task on the teacher and every retrained student); `repeat` runs the
last three once per seed of --seeds (data order, validation samples, from-scratch weights and the random
ranking change; the teacher, the scores and the importance plans do not).
It returns what rank 0 needs to write results.json; the metrics themselves stay in each run's
metrics.jsonl, which the report reads back.

Every model is built from its checkpoint's own architecture at the job's layout; every collective
goes through the runtime's groups (the pruner's work-sharing uses the job's world group).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_minitron.demo.config import AGGREGATIONS, MARKER, DemoConfig, default_targets


@dataclasses.dataclass
class Context:
    """What every stage shares: config, runtime, data and the log."""

    cfg: DemoConfig
    runtime: object
    out: Path
    data_cfg: object
    tokenizer: object
    train_ds: object
    valid_ds: object
    seed: int
    """The data and RNG seed of the repeat this context serves (cfg.seed for the first)."""
    timings: dict = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def log(self, line: str) -> None:
        if self.runtime.is_logging_rank:
            print(f"[demo {time.perf_counter() - self.started:6.0f}s] {line}", flush=True)

    def train_cfg(self, iters: int, lr: float, warmup: int, *, eval_interval: int, log_interval: int):
        from megatron_minitron.training.loop import TrainConfig

        c = self.cfg
        return TrainConfig(train_iters=iters, micro_batch_size=c.micro_batch_size,
                           global_batch_size=c.global_batch_size, seq_length=c.seq_length, lr=lr, min_lr=lr / 10,
                           lr_warmup_iters=warmup, eval_interval=eval_interval, eval_iters=c.eval_iters,
                           log_interval=log_interval, seed=self.seed)

    def batches(self, dataset, start: int = 0):
        from megatron_minitron.data.loader import batch_iterator

        rt = self.runtime
        return batch_iterator(dataset, micro_batch_size=self.cfg.micro_batch_size, dp_rank=rt.dp_rank,
                              dp_size=rt.data_parallel, start_sample=start)

    def valid_batches(self):
        return self.batches(self.valid_ds)

    def train_batches(self, start: int):
        return self.batches(self.train_ds, start)

    def tokenizer_json(self) -> dict:
        return (self.data_cfg.tokenizer or self.tokenizer.ref).to_json()

    def stage(self, name: str):
        return _Stage(self, name)


class _Stage:
    """Times one stage into ctx.timings: wall seconds and this process's CPU seconds (on a shared
    machine the CPU time says what the stage costs; the wall time, what it took)."""

    def __init__(self, ctx: Context, name: str) -> None:
        self.ctx, self.name = ctx, name

    def __enter__(self):
        self.ctx.log(f"--- {self.name}")
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def __exit__(self, *exc) -> None:
        self.ctx.timings[self.name] = {"wall_s": round(time.perf_counter() - self.t0, 2),
                                       "cpu_s": round(time.process_time() - self.c0, 2)}
        gc.collect()


def run_demo(cfg: DemoConfig) -> Optional[dict]:
    """Every stage, on every rank; rank 0 gets back the raw results (None elsewhere)."""
    from megatron_minitron.runtime import ParallelConfig, initialize, shutdown

    runtime = initialize(ParallelConfig(tensor_parallel=cfg.tensor_parallel, pipeline_parallel=cfg.pipeline_parallel),
                         seed=cfg.seed)
    try:
        if runtime.rank == 0:
            prepare_out(cfg)
        runtime.barrier()
        ctx = _context(cfg, runtime)
        with ctx.stage("teacher"):
            teacher, teacher_record = train_teacher(ctx)
        width_target, depth_target = default_targets(teacher.arch, cfg)
        block = teacher.arch.num_layers - depth_target.num_layers
        with ctx.stage("importance"):
            scores = importance(ctx, teacher, block_size=block)
        with ctx.stage("plans"):
            named = plans(ctx, scores, teacher.arch, width_target, depth_target)
        with ctx.stage("prune"):
            checkpoints = prune(ctx, teacher, named)
        repeats = [repeat(ctx if k == 0 else for_seed(ctx, seed), k, teacher, checkpoints, named["width"].target)
                   for k, (seed, _) in enumerate(cfg.seed_values)]
        raw = None
        if runtime.rank == 0:
            raw = {"config": cfg.to_json(), "teacher": teacher_record, "timings": ctx.timings,
                   "layout": {"tp": cfg.tensor_parallel, "pp": cfg.pipeline_parallel, "dp": runtime.data_parallel,
                              "world_size": runtime.world_size, "device": runtime.device.type,
                              "backend": runtime.backend},
                   "scores": str(ctx.out / "scores"), "block_size": block,
                   "plans": {name: str(ctx.out / "plans" / f"{name}.json") for name in named},
                   "checkpoints": {name: str(path) for name, path in checkpoints.items()},
                   "repeats": repeats}
        runtime.barrier()
        return raw
    finally:
        shutdown()


RECIPES = (("width_kd", ("kd", "width")), ("depth_kd", ("kd", "depth")), ("scratch", ("lm", None)),
           ("width_lm", ("lm", "width")))
"""Each arm: (retraining loss, pruned checkpoint it starts from; None: the width architecture from random weights)."""


def repeat(ctx: Context, k: int, teacher, checkpoints: dict, width_arch) -> dict:
    """Repeat k of the comparisons at ctx.seed: zero-shot validation losses (with this repeat's random
    ranking under the name "random"), the four arms, and the built-in task on them (on the teacher too in
    the first repeat: it does not change)."""
    several = ctx.cfg.seeds > 1
    tag = f" seed {ctx.seed}" if several else ""
    with ctx.stage("zero-shot" + tag):
        zero = zero_shot(ctx, teacher, checkpoints, k)
    arms = {}
    for arm, how in RECIPES:
        with ctx.stage(f"retrain {arm}{tag}"):
            run = f"{arm}-seed{ctx.seed}" if several else arm
            arms[arm] = retrain(ctx, run, teacher, how, checkpoints, width_arch)
    with ctx.stage("tasks" + tag):
        models = {arm: Path(a["path"]) for arm, a in arms.items()}
        tasks = task_scores(ctx, {"teacher": teacher.root, **models} if k == 0 else models)
    return {"seed": ctx.seed, "random_seed": ctx.cfg.seed_values[k][1], "zero_shot": zero, "arms": arms,
            "tasks": tasks}


def prepare_out(cfg: DemoConfig) -> None:
    """An empty --out holding only the demo's config (a previous demo run there is removed; anything
    else was refused before the processes started)."""
    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text(json.dumps(cfg.to_json(), indent=2) + "\n")


def _context(cfg: DemoConfig, runtime) -> Context:
    from megatron_minitron.data.blend import parse_blend
    from megatron_minitron.data.loader import DataConfig, load_tokenizer
    from megatron_minitron.data.tokenizer import TokenizerRef, tokenizer_ref_for
    from megatron_minitron.model.checkpoint import resolve

    tokenizer_ref = None
    if cfg.tokenizer:
        tokenizer_ref = tokenizer_ref_for(cfg.tokenizer)
    elif cfg.teacher and resolve(cfg.teacher).tokenizer:
        tokenizer_ref = TokenizerRef.from_json(resolve(cfg.teacher).tokenizer)
    data_cfg = DataConfig(blend=parse_blend(list(cfg.data_path or ())), valid_blend=parse_blend(
        list(cfg.valid_data_path or ())), split=cfg.split, seq_length=cfg.seq_length, seed=cfg.seed,
        cache_dir=cfg.cache_dir, tokenizer=tokenizer_ref)
    tokenizer = load_tokenizer(data_cfg)
    train_ds, valid_ds = _datasets(cfg, data_cfg, tokenizer)
    out = Path(cfg.out)
    return Context(cfg=cfg, runtime=runtime, out=out, data_cfg=data_cfg, tokenizer=tokenizer, train_ds=train_ds,
                   valid_ds=valid_ds, seed=cfg.seed)


def _datasets(cfg: DemoConfig, data_cfg, tokenizer) -> tuple:
    """(train, valid) datasets, shuffled with data_cfg.seed."""
    from megatron_minitron.data.loader import build_datasets

    gbs = cfg.global_batch_size
    train_ds, valid_ds, _ = build_datasets(data_cfg, tokenizer, (max(cfg.teacher_iters, cfg.retrain_iters) * gbs,
                                                                 cfg.eval_iters * gbs, 0))
    if valid_ds is None:
        from megatron_minitron.config import ConfigError

        raise ConfigError("the data gives no validation samples; pass --valid-data-path or a --split with a "
                          "validation share")
    return train_ds, valid_ds


def for_seed(ctx: Context, seed: int) -> Context:
    """The context of another repeat: the same config, runtime, tokenizer and log, the training and
    validation data shuffled with `seed` (which also seeds the arms' RNGs)."""
    data_cfg = dataclasses.replace(ctx.data_cfg, seed=seed)
    train_ds, valid_ds = _datasets(ctx.cfg, data_cfg, ctx.tokenizer)
    return dataclasses.replace(ctx, data_cfg=data_cfg, train_ds=train_ds, valid_ds=valid_ds, seed=seed)


# ------------------------------------------------------------------------------------------- teacher
def train_teacher(ctx: Context):
    """The teacher's CheckpointInfo and a record of where it came from. A finished teacher of the
    same configuration in the cache is reused; an unfinished one is trained again from scratch."""
    from megatron_minitron.config import load_arch
    from megatron_minitron.model.checkpoint import latest_iteration, resolve
    from megatron_minitron.training.loop import RunPaths, build_trainer, lm_task, train

    cfg, rt = ctx.cfg, ctx.runtime
    if cfg.teacher:
        info = resolve(cfg.teacher)
        ctx.log(f"teacher: {info.root} (given), {info.arch.num_parameters() / 1e6:.2f}M parameters")
        return info, {"path": str(info.root), "source": "given", "train_seconds": 0.0}
    arch = load_arch(cfg.arch)
    if not Path(cfg.arch).is_file():  # a preset takes the tokenizer's vocabulary
        arch = arch.replace(vocab_size=ctx.tokenizer.vocab_size, padded_vocab_size=None)
    arch.check_parallel(tensor_parallel=cfg.tensor_parallel, pipeline_parallel=cfg.pipeline_parallel)
    save = Path(cfg.teacher_cache) / f"teacher-{cfg.teacher_key(arch, rt.world_size)}"
    finished = latest_iteration(save) == str(cfg.teacher_iters)
    rt.barrier()  # every rank has looked before rank 0 may clear an unfinished one
    if finished:
        ctx.log(f"teacher: reusing {save} (trained earlier with the same settings; delete it to train again)")
        return resolve(save), {"path": str(save), "source": "cache", "train_seconds": 0.0}
    if rt.rank == 0:
        shutil.rmtree(save, ignore_errors=True)
        save.mkdir(parents=True)
        (save / "run.json").write_text(json.dumps({"arch": arch.to_json(), "demo": cfg.to_json()}, indent=2,
                                                  default=str) + "\n")
    rt.barrier()
    tcfg = ctx.train_cfg(cfg.teacher_iters, cfg.teacher_lr, cfg.warmup_iters,
                         eval_interval=max(1, cfg.teacher_iters // 5), log_interval=max(1, cfg.teacher_iters // 10))
    ctx.log(f"teacher: training {arch.num_parameters() / 1e6:.2f}M parameters for {cfg.teacher_iters} steps at "
            f"TP={cfg.tensor_parallel} PP={cfg.pipeline_parallel} DP={rt.data_parallel} into {save}")
    t0 = time.perf_counter()
    trainer = build_trainer(arch, rt, tcfg)
    train(trainer, task=lm_task(rt.device), train_batches=ctx.train_batches, valid_batches=ctx.valid_batches,
          paths=RunPaths(save=save, metrics=save / "metrics.jsonl"), tokenizer=ctx.tokenizer_json(),
          provenance={"command": "demo", "role": "teacher"})
    del trainer
    return resolve(save), {"path": str(save), "source": "trained", "train_seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------- importance
def importance(ctx: Context, teacher, *, block_size: Optional[int] = None):
    """Scores of the teacher at the job's layout, written to OUT/scores and read back on every rank. With
    `block_size`, also the LM loss without each layer and without each block of that many layers (what the
    depth plans rank by); without it, one calibration pass, which gives a MoE teacher's expert and expert
    neuron scores with the dense axes' (its model is built with the all-gather token dispatcher, whose token
    order the expert hooks read)."""
    from megatron_minitron.importance.calibration import CalibrationData, build_calibration_dataset, micro_batches
    from megatron_minitron.importance.run import ImportanceConfig, collect, make_scores
    from megatron_minitron.importance.scores import load_scores, save_scores
    from megatron_minitron.model.build import build_model, transformer_engine_available
    from megatron_minitron.model.checkpoint import load_checkpoint

    cfg, rt, arch = ctx.cfg, ctx.runtime, teacher.arch
    calibration = CalibrationData(data_path=cfg.data_path, num_samples=cfg.calib_samples, seq_length=cfg.seq_length,
                                  seed=cfg.seed, cap=True, cache_dir=cfg.cache_dir)
    if block_size is None:
        icfg = ImportanceConfig(micro_batch_size=cfg.micro_batch_size)
        measured = f", experts weighted by the router's probability ({icfg.expert_weighting})" if arch.is_moe else ""
    else:
        icfg = ImportanceConfig(micro_batch_size=cfg.micro_batch_size, lm_loss=True, block_sizes=(block_size,),
                                lm_loss_samples=cfg.lm_loss_samples)
        measured = f", LM loss without each layer and without each block of {block_size} layers"
    icfg.validate(arch.num_layers)
    dataset, num_samples = build_calibration_dataset(calibration, ctx.tokenizer, model_vocab_size=arch.vocab_size)
    use_te = transformer_engine_available()
    model = build_model(arch, rt, use_te=use_te, **({"moe_dispatcher": "allgather"} if arch.is_moe else {}))
    load_checkpoint(teacher, model=model)

    def batches():
        return micro_batches(dataset, num_samples, micro_batch_size=icfg.micro_batch_size, dp_rank=rt.dp_rank,
                             dp_size=rt.data_parallel)

    ctx.log(f"importance: {num_samples} calibration samples x {cfg.seq_length} tokens{measured}")
    tensors, loss = collect(model, rt, arch, batches, num_samples, cfg.seq_length, icfg, use_te=use_te, log=ctx.log)
    scores = make_scores(tensors, arch=arch, info=teacher, calibration=calibration, num_samples=num_samples,
                         cfg=icfg, use_te=use_te, runtime=rt, lm_loss=loss)
    out = ctx.out / "scores"
    if rt.rank == 0:
        save_scores(scores, out)
    rt.barrier()
    del model
    return load_scores(out)


# --------------------------------------------------------------------------------------------- plans
def plans(ctx: Context, scores, arch, width_target, depth_target) -> dict:
    """name -> Plan: width (seq mean, batch L2: the paper's best), depth (best contiguous block by LM
    loss), random (random ranking, width target; one per repeat, see random_name) and grid-SEQ-BATCH for
    the 3x3 aggregations (from the raw statistics, no forward pass). Written to OUT/plans/NAME.json by rank 0."""
    from megatron_minitron.plan import make_plan, random_plan

    layout = dict(tensor_parallel=ctx.cfg.tensor_parallel, pipeline_parallel=ctx.cfg.pipeline_parallel)
    named = {"width": make_plan(scores.aggregated(seq="mean", batch="l2"), width_target, **layout),
             "depth": make_plan(scores, depth_target, **layout)}
    for k, (_, random_seed) in enumerate(ctx.cfg.seed_values):
        named[random_name(k)] = random_plan(arch.explicit(), width_target, random_seed, **layout)
    for seq in AGGREGATIONS:
        for batch in AGGREGATIONS:
            named[f"grid-{seq}-{batch}"] = make_plan(scores.aggregated(seq=seq, batch=batch), width_target, **layout)
    if ctx.runtime.rank == 0:
        (ctx.out / "plans").mkdir(parents=True, exist_ok=True)
        for name, plan in named.items():
            plan.save(ctx.out / "plans" / f"{name}.json")
    for name in ("width", "depth"):
        plan, src = named[name], named[name].source
        ctx.log(f"{name} plan: layers {src.num_layers}->{plan.target.num_layers}, hidden {src.hidden_size}->"
                f"{plan.target.hidden_size}, ffn {src.ffn_hidden_size}->{plan.target.ffn_hidden_size}, heads "
                f"{src.num_attention_heads}->{plan.target.num_attention_heads}: {plan.params_before / 1e6:.2f}M -> "
                f"{plan.params_after / 1e6:.2f}M parameters, dropped layers {plan.scores.get('dropped_layers')}")
    return named


def random_name(k: int) -> str:
    """The random-ranking plan of repeat k (seeded with random_seed + k)."""
    return "random" if k == 0 else f"random-{k}"


def _kept(plan) -> tuple:
    """What a plan keeps (two plans that keep the same indices give the same checkpoint)."""
    return plan.layers, plan.hidden, plan.ffn, plan.query_groups, plan.heads, plan.experts, plan.expert_ffn, \
        plan.shared_ffn


# --------------------------------------------------------------------------------------------- prune
def prune(ctx: Context, teacher, named: dict) -> dict[str, Path]:
    """name -> pruned checkpoint root; plans that keep the same indices share one checkpoint."""
    from megatron_minitron.prune.rewrite import prune_checkpoint

    written: dict[tuple, Path] = {}
    out: dict[str, Path] = {}
    for name, plan in named.items():
        key = _kept(plan)
        if key not in written:
            written[key] = ctx.out / "pruned" / name
            prune_checkpoint(teacher.root, plan, written[key], group=torch.distributed.group.WORLD,
                             print_fn=lambda _line: None)
        out[name] = written[key]
    ctx.log(f"pruned {len(written)} distinct checkpoints for {len(named)} plans into {ctx.out / 'pruned'}")
    return out


# ----------------------------------------------------------------------------------------- zero-shot
def zero_shot(ctx: Context, teacher, checkpoints: dict, k: int) -> dict:
    """name -> validation LM loss of every pruned checkpoint (repeat k's random ranking as "random", the
    other repeats' left out) and of the teacher; a checkpoint that several plans share is evaluated once."""
    names = {name: path for name, path in checkpoints.items() if not name.startswith("random")}
    names["random"] = checkpoints[random_name(k)]
    losses, by_path = {}, {}
    for name, path in names.items():
        if path not in by_path:
            by_path[path] = zero_shot_loss(ctx, path)
        losses[name] = by_path[path]
    losses["teacher"] = zero_shot_loss(ctx, teacher.root)
    ctx.log("zero-shot validation LM loss: " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))
    return losses


def zero_shot_loss(ctx: Context, path: Path) -> float:
    """Validation LM loss of a checkpoint as it is, at the job's layout."""
    cfg = ctx.train_cfg(ctx.cfg.retrain_iters, ctx.cfg.retrain_lr, 0, eval_interval=0, log_interval=1)
    return evaluate_checkpoint(path, ctx.runtime, cfg, ctx.valid_batches)["lm loss"]


def evaluate_checkpoint(path, runtime, train_cfg, valid_batches: Callable) -> dict:
    """Validation losses of a checkpoint's weights: the same samples, schedule and token-weighted
    reduction as the training loop's validation (train_cfg gives the batch shape and eval_iters)."""
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.checkpoint import load_checkpoint, resolve
    from megatron_minitron.training.loop import Trainer, evaluate, lm_task

    info = resolve(path)
    model = build_model(info.arch, runtime)
    load_checkpoint(info, model=model)
    evaluator = Trainer(arch=info.arch, runtime=runtime, cfg=train_cfg, model=[model], optimizer=None, scheduler=None)
    return evaluate(evaluator, lm_task(runtime.device), valid_batches(), train_cfg.eval_iters)


# ------------------------------------------------------------------------------------------- retrain
def retrain(ctx: Context, arm: str, teacher, how: tuple, checkpoints: dict, width_arch) -> dict:
    """One arm for cfg.retrain_iters steps into OUT/arms/ARM (ARM names the arm and, over several seeds,
    the seed): ("kd", start) distils from the teacher, ("lm", start) trains on the LM loss alone (start
    None: width_arch from random weights seeded with ctx.seed)."""
    from megatron_minitron.model.checkpoint import resolve
    from megatron_minitron.runtime.dist import set_seed
    from megatron_minitron.training.loop import MetricsLog, RunPaths, build_trainer, evaluate, init_from, lm_task, train

    cfg, rt = ctx.cfg, ctx.runtime
    loss, start = how
    save = ctx.out / "arms" / arm
    tcfg = ctx.train_cfg(cfg.retrain_iters, cfg.retrain_lr, cfg.retrain_warmup_iters, eval_interval=cfg.eval_interval,
                         log_interval=max(1, cfg.retrain_iters // 4))
    student = checkpoints[start] if start else None
    arch = resolve(student).arch if student else width_arch
    if rt.rank == 0:
        save.mkdir(parents=True, exist_ok=True)
        (save / "run.json").write_text(json.dumps({
            "arm": arm, "seed": ctx.seed, "loss": loss, "start": str(student) if student else "random init",
            "teacher": str(teacher.root), "arch": arch.to_json(), "train": tcfg.to_json()}, indent=2) + "\n")
    rt.barrier()
    set_seed(ctx.seed)  # the same RNG state for every arm of a repeat (the from-scratch weights, dropout)
    what = "KD from the teacher" if loss == "kd" else "LM loss"
    ctx.log(f"{arm}: {arch.num_parameters() / 1e6:.2f}M parameters, {what}, starting from "
            f"{student or 'random weights'}")
    t0 = time.perf_counter()
    provenance = {"command": "demo", "arm": arm}
    if loss == "kd":
        from megatron_minitron.distill.loop import DistillConfig, distill

        distill(teacher_info=teacher, student_info=resolve(student), runtime=rt, train_cfg=tcfg, cfg=DistillConfig(),
                train_batches=ctx.train_batches, valid_batches=ctx.valid_batches, save=save,
                tokenizer=ctx.tokenizer_json(), provenance=provenance)
    else:
        trainer = build_trainer(arch, rt, tcfg)
        if student:
            init_from(trainer, student)
        task = lm_task(rt.device)
        # the curve's first point (0 tokens), as distillation logs it before its first step
        val = evaluate(trainer, task, ctx.valid_batches(), cfg.eval_iters)
        MetricsLog(save / "metrics.jsonl", enabled=rt.is_logging_rank).write(
            {"kind": "valid", "iteration": 0, **{f"val {k}": v for k, v in val.items()},
             "val ppl": math.exp(min(val["lm loss"], 50.0))})
        train(trainer, task=task, train_batches=ctx.train_batches, valid_batches=ctx.valid_batches,
              paths=RunPaths(save=save, metrics=save / "metrics.jsonl"), tokenizer=ctx.tokenizer_json(),
              provenance=provenance)
        del trainer
    return {"path": str(save), "loss": loss, "start": start or "random", "seconds": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------------------------- tasks
def task_scores(ctx: Context, models: dict[str, Path]) -> Optional[dict]:
    """The built-in task minitron_continuation on cfg.task_limit documents for each named checkpoint (its last
    iteration): {"task", "chance", "limit", "documents", "models": {name: {"acc", "acc_mutual_info", ...}}} on
    rank 0, None elsewhere or when skipped (task_limit 0, lm-eval not installed)."""
    import importlib.util

    if not ctx.cfg.task_limit or importlib.util.find_spec("lm_eval") is None:
        ctx.log("tasks: skipped (" + ("--task-limit 0" if not ctx.cfg.task_limit else "lm-eval is not installed: "
                                      "pip install -e .[eval]") + ")")
        return None
    from megatron_minitron.evaluation.builtin import CHANCE, CONTINUATION_TASK
    from megatron_minitron.evaluation.run import TaskConfig, evaluate_tasks
    from megatron_minitron.model.checkpoint import resolve

    # batches of 32 took 22% less time than batches of 8 on the small teacher
    tcfg = TaskConfig(tasks=(CONTINUATION_TASK,), limit=ctx.cfg.task_limit, batch_size=32,
                      cache_dir=ctx.cfg.cache_dir, seed=ctx.cfg.seed)  # the same documents every repeat
    tokenizer_ref = ctx.data_cfg.tokenizer or ctx.tokenizer.ref
    scores, documents = {}, None
    for name, path in models.items():
        results = evaluate_tasks(resolve(path), tokenizer_ref, ctx.runtime, tcfg)
        if results is None:
            continue
        metrics = results["results"][CONTINUATION_TASK]
        scores[name] = {key: metrics[f"{key},none"] for key in ("acc", "acc_stderr", "acc_norm", "acc_mutual_info",
                                                                 "acc_mutual_info_stderr")}
        documents = results["n-samples"][CONTINUATION_TASK]["effective"]
        ctx.log(f"tasks: {name} {CONTINUATION_TASK} acc {scores[name]['acc']:.3f} ± {scores[name]['acc_stderr']:.3f} "
                f"on {documents} documents (chance {CHANCE[CONTINUATION_TASK]:.2f})")
    if ctx.runtime.rank != 0:
        return None
    return {"task": CONTINUATION_TASK, "chance": CHANCE[CONTINUATION_TASK], "limit": ctx.cfg.task_limit,
            "documents": documents, "models": scores}
