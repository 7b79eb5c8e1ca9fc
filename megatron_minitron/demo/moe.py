"""`minitron demo --moe`: which way of halving a Mixture-of-Experts model's experts loses least.

The stages, run by every rank of one torchrun job as the dense demo's (its teacher, pruning, zero-shot
and retraining stages are reused from run.py):

    teacher     a MoE teacher (default `small-moe`) trained on the embedded corpus, or found in the cache
    importance  one calibration pass with the expert hooks (expert output norms, expert neurons)
    plans       at equal total parameters (see moe_targets):
                  experts      each MoE layer keeps its best half of the experts, each at full width
                  width        every expert kept, each at half its width (its own best neurons)
                  random-SEED  half the experts chosen at random, for RANDOM_SEEDS seeds
    prune       one streaming rewrite per plan
    zero-shot   validation LM loss of the teacher and every pruned model
    retrain     experts_kd, width_kd, random_kd (the first random seed): the same distillation, the same
                steps x batch x sequence (equal tokens) from the frozen teacher

`moe_report.py` turns what this returns into results.json and report.md.
"""

from __future__ import annotations

from typing import Optional

from megatron_minitron.config import ArchConfig, ConfigError
from megatron_minitron.demo.config import DemoConfig

RANDOM_SEEDS = 3
"""Random expert choices scored zero-shot (seeds random_seed, random_seed + 1, ...): one random draw may keep
good experts by luck, their mean is the baseline the importance ranking must beat. The first is distilled."""

ARMS = ("experts_kd", "width_kd", "random_kd")
"""The distilled arms, in the report's order; ARM_PLANS names the pruned model each starts from."""


def arm_plans(cfg: DemoConfig) -> dict[str, str]:
    """arm -> the plan (and pruned checkpoint) it starts from."""
    return {"experts_kd": "experts", "width_kd": "width", "random_kd": f"random-{cfg.random_seed}"}


def random_seeds(cfg: DemoConfig) -> list[int]:
    return [cfg.random_seed + i for i in range(RANDOM_SEEDS)]


def moe_targets(teacher: ArchConfig, cfg: DemoConfig):
    """(experts Target, width Target) of equal total parameters.

    The expert count is what is equalised: keeping k of E experts at width F holds k*F expert neurons per
    layer, so the width arm keeps all E experts at width F*k/E (rounded to the tensor-parallel size when it
    does not divide). The two then differ only by the router rows of the dropped experts (hidden_size
    parameters each per MoE layer) and any rounding: well under 1% of the student. Active parameters
    differ by design: the experts arm routes each token through top-k full-width experts, the width
    arm through top-k narrower ones.
    """
    from megatron_minitron.plan import Target

    check_moe_teacher(teacher, cfg)
    E, F, tp = teacher.num_experts, teacher.expert_ffn_hidden_size, cfg.tensor_parallel
    keep = E // 2
    width = max(tp, round(F * keep / E / tp) * tp)
    return Target(num_experts=keep), Target(moe_ffn_hidden_size=width)


def check_moe_teacher(arch: ArchConfig, cfg: DemoConfig) -> None:
    """A clear error, before any process starts, when the teacher cannot be halved by experts."""
    what = f"--teacher {cfg.teacher}" if cfg.teacher else f"--arch {cfg.arch}"
    if not arch.is_moe:
        raise ConfigError(f"--moe needs a Mixture-of-Experts teacher; {what} is dense (num_experts is None): use "
                          f"--arch small-moe, tiny-moe or an ArchConfig with num_experts")
    if arch.num_experts // 2 < arch.moe_router_topk:
        raise ConfigError(f"--moe keeps half of the teacher's {arch.num_experts} experts, fewer than its router's "
                          f"top-k ({arch.moe_router_topk}); {what}: use a teacher with at least "
                          f"{2 * arch.moe_router_topk} experts")


def run_moe_demo(cfg: DemoConfig) -> Optional[dict]:
    """Every stage, on every rank; rank 0 gets back the raw results (None elsewhere)."""
    from megatron_minitron.demo.run import (_context, importance, prepare_out, prune, retrain, train_teacher,
                                            zero_shot_loss)
    from megatron_minitron.runtime import ParallelConfig, initialize, shutdown

    # megatron-core's MoE layers need sequence parallelism at TP > 1
    runtime = initialize(ParallelConfig(tensor_parallel=cfg.tensor_parallel, pipeline_parallel=cfg.pipeline_parallel,
                                        sequence_parallel=cfg.tensor_parallel > 1), seed=cfg.seed)
    try:
        if runtime.rank == 0:
            prepare_out(cfg)
        runtime.barrier()
        ctx = _context(cfg, runtime)
        with ctx.stage("teacher"):
            teacher, teacher_record = train_teacher(ctx)
        with ctx.stage("importance"):
            scores = importance(ctx, teacher)  # no layer LM-loss passes: no plan here drops layers
        with ctx.stage("plans"):
            named = moe_plans(ctx, scores, teacher.arch)
        with ctx.stage("prune"):
            checkpoints = prune(ctx, teacher, named)
        with ctx.stage("zero-shot"):
            zero = {name: zero_shot_loss(ctx, path) for name, path in checkpoints.items()}
            zero["teacher"] = zero_shot_loss(ctx, teacher.root)
            ctx.log("zero-shot validation LM loss: " + ", ".join(f"{k} {v:.3f}" for k, v in zero.items()))
        arms = {}
        for arm, start in arm_plans(cfg).items():
            with ctx.stage(f"retrain {arm}"):
                arms[arm] = retrain(ctx, arm, teacher, ("kd", start), checkpoints, None)
        raw = None
        if runtime.rank == 0:
            raw = {"config": cfg.to_json(), "teacher": teacher_record, "timings": ctx.timings,
                   "layout": {"tp": cfg.tensor_parallel, "pp": cfg.pipeline_parallel, "dp": runtime.data_parallel,
                              "world_size": runtime.world_size, "device": runtime.device.type,
                              "backend": runtime.backend},
                   "scores": str(ctx.out / "scores"),
                   "plans": {name: str(ctx.out / "plans" / f"{name}.json") for name in named},
                   "checkpoints": {name: str(path) for name, path in checkpoints.items()},
                   "zero_shot": zero, "arms": arms}
        runtime.barrier()
        return raw
    finally:
        shutdown()


def moe_plans(ctx, scores, arch: ArchConfig) -> dict:
    """name -> Plan (experts, width, random-SEED...), written to OUT/plans/NAME.json by rank 0."""
    from megatron_minitron.plan import make_plan, random_plan

    experts_target, width_target = moe_targets(arch, ctx.cfg)
    layout = dict(tensor_parallel=ctx.cfg.tensor_parallel, pipeline_parallel=ctx.cfg.pipeline_parallel)
    named = {"experts": make_plan(scores, experts_target, **layout),
             "width": make_plan(scores, width_target, **layout)}
    for seed in random_seeds(ctx.cfg):
        named[f"random-{seed}"] = random_plan(arch.explicit(), experts_target, seed, **layout)
    if ctx.runtime.rank == 0:
        (ctx.out / "plans").mkdir(parents=True, exist_ok=True)
        for name, plan in named.items():
            plan.save(ctx.out / "plans" / f"{name}.json")
    for name, plan in named.items():
        t = plan.target
        ctx.log(f"{name} plan: {t.num_experts} experts x {t.expert_ffn_hidden_size} wide, {plan.params_before / 1e6:.3f}M"
                f" -> {plan.params_after / 1e6:.3f}M parameters ({plan.active_params_after / 1e6:.3f}M active); "
                f"experts kept in layer 0: {list(plan.experts[0])}")
    return named
