"""`minitron distill`: retrain a pruned student by knowledge distillation from its unpruned teacher,
both in one megatron training loop at any TP/PP/EP/DP (the same layout for both; a dense model beside
a MoE one ignores --ep). A MoE student's router auxiliary loss (--moe-aux-loss-coeff) is added to the
KD loss and logged beside it with the per-expert load; the teacher's routers add nothing.

    torchrun --nproc-per-node 2 -m megatron_minitron distill --teacher runs/teacher \
        --student runs/pruned --tp 2 --train-iters 400 --save runs/student

The student's weights come from --student (a checkpoint, usually written by `minitron prune`); the
teacher is frozen. --save receives the student's checkpoints (Megatron-LM layout, with the
hidden-size projections of intermediate losses when there are any), metrics.jsonl, run.json and
final_validation.json. Every check that needs no forward pass runs before the processes start.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_minitron.cli._common import (add_data_arguments, add_parallel_arguments, add_training_arguments,
                                           check_checkpoint_space, check_data_files, check_run_dir, data_config,
                                           parallel_config, run_session, train_config, write_run_record)
from megatron_minitron.flags import field_argument, non_negative, positive
from megatron_minitron.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", default=None,
                        help="the unpruned model's checkpoint (with --teacher-logits: optional, and then it must be "
                             "the cache's teacher)")
    parser.add_argument("--teacher-logits", default=None, metavar="DIR",
                        help="distill from the teacher's top-k logits cached by `minitron cache-logits` (no teacher is "
                             "built); the cache must have been written with this run's data flags")
    parser.add_argument("--student", required=True, help="the student's initial checkpoint (e.g. a pruned one)")
    parser.add_argument("--save", required=True, help="run directory: checkpoints, metrics.jsonl, run.json")
    parser.add_argument("--resume", action="store_true", help="continue the run already in --save")
    parser.add_argument("--overwrite", action="store_true", help="delete a previous run in --save first")
    add_parallel_arguments(parser)
    field_argument(parser, *DISTILL, "teacher_first_stage_layers", type=positive())
    field_argument(parser, *DISTILL, "teacher_last_stage_layers", type=positive())
    add_data_arguments(parser)
    add_training_arguments(parser)
    add_loss_arguments(parser)
    e = parser.add_argument_group("downstream tasks during distillation (lm-evaluation-harness; pip install .[eval])")
    e.add_argument("--eval-tasks", default=None, metavar="T1,T2",
                   help="lm-eval tasks scored on the student, e.g. minitron_continuation (built in, offline)")
    e.add_argument("--eval-tasks-interval", type=non_negative(), default=None,
                   help="iterations between task scores (default: --eval-interval); always at the end")
    e.add_argument("--eval-tasks-limit", type=positive(float), default=None, help="documents per task (default: all)")
    e.add_argument("--eval-tasks-batch-size", type=positive(), default=8, help="sequences per forward pass per replica")


def eval_task_config(args: argparse.Namespace):
    """The TaskConfig of --eval-tasks (None without it); checked before any process starts."""
    if not getattr(args, "eval_tasks", None):
        return None
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("--eval-tasks needs lm-evaluation-harness: pip install 'megatron-minitron[eval]'")
    from megatron_minitron.evaluation.run import TaskConfig

    if args.eval_tasks_interval is not None and args.eval_tasks_interval < 0:
        raise ConfigError(f"--eval-tasks-interval must be >= 0, got {args.eval_tasks_interval}")
    return TaskConfig(tasks=tuple(t.strip() for t in args.eval_tasks.split(",")), limit=args.eval_tasks_limit,
                      batch_size=args.eval_tasks_batch_size, cache_dir=args.cache_dir, seed=args.seed)


DISTILL = ("megatron_minitron.distill.loop", "DistillConfig")
"""Where the distillation flags' fields are declared."""


def add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per DistillConfig field (default and help from the field)."""
    k = parser.add_argument_group("distillation losses")
    field_argument(k, *DISTILL, "kd_loss", choices=["forward", "reverse"])
    field_argument(k, *DISTILL, "temperature", flag="--kd-temperature", type=positive(float))
    field_argument(k, *DISTILL, "temperature_squared", flag="--kd-temperature-squared")
    field_argument(k, *DISTILL, "top_k", flag="--kd-top-k", type=positive())
    field_argument(k, *DISTILL, "kd_weight", type=non_negative(float))
    field_argument(k, *DISTILL, "lm_weight", flag="--lm-loss-weight", type=non_negative(float))
    field_argument(k, *DISTILL, "intermediate_layers", nargs="+", metavar="T:S")
    field_argument(k, *DISTILL, "intermediate_loss", choices=["cosine", "mse"])
    field_argument(k, *DISTILL, "intermediate_weight", type=non_negative(float))
    k.add_argument("--no-rescale-intermediate", action="store_true",
                   help="do not rescale intermediate losses to the KD loss's magnitude (the default rescales "
                        "each pair's loss to the KD loss's, by the previous step's ratio)")
    field_argument(k, *DISTILL, "truncate_teacher_vocab")
    k.add_argument("--skip-teacher-check", action="store_true",
                   help="distill even from a teacher whose validation loss is near ln(vocab) (the default refuses "
                        "an untrained teacher)")


def distill_config(args: argparse.Namespace):
    from megatron_minitron.distill.loop import DistillConfig

    return DistillConfig(kd_loss=args.kd_loss, temperature=args.kd_temperature,
                         temperature_squared=args.kd_temperature_squared, top_k=args.kd_top_k,
                         kd_weight=args.kd_weight, lm_weight=args.lm_loss_weight,
                         intermediate_layers=tuple(args.intermediate_layers), intermediate_loss=args.intermediate_loss,
                         intermediate_weight=args.intermediate_weight,
                         rescale_intermediate=not args.no_rescale_intermediate,
                         teacher_check=not args.skip_teacher_check,
                         truncate_teacher_vocab=args.truncate_teacher_vocab,
                         teacher_first_stage_layers=getattr(args, "teacher_first_stage_layers", None),
                         teacher_last_stage_layers=getattr(args, "teacher_last_stage_layers", None))


def run(args: argparse.Namespace) -> int:
    from megatron_minitron.distill.loop import check_layout, check_models, teacher_parallel
    from megatron_minitron.distill.model import check_pairs_on_stages, parse_layer_pairs
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.runtime import LaunchEnv

    # ---- everything that needs no process: fail fast, on every rank alike
    parallel = parallel_config(args)
    cfg, dcfg = train_config(args), distill_config(args)
    eval_cfg = eval_task_config(args)
    save = Path(args.save)
    check_run_dir(save, resume=args.resume, overwrite=args.overwrite)
    if args.teacher_logits is not None:
        return _run_cached(args, parallel, cfg, dcfg, eval_cfg, save)
    if args.teacher is None:
        raise ConfigError("--teacher is required (or --teacher-logits DIR, written by `minitron cache-logits`)")
    teacher, student = ckpt.resolve(args.teacher), ckpt.resolve(args.student)
    check_checkpoint_space(save, student.arch)
    for name, info in (("--teacher", teacher), ("--student", student)):
        if save.resolve() == info.root.resolve() or save.resolve().is_relative_to(info.root.resolve()):
            raise ConfigError(f"--save {save} is inside {name} {info.root}; write the run elsewhere")
    check_models(teacher.arch, student.arch, seq_length=cfg.seq_length,
                 truncate_teacher_vocab=dcfg.truncate_teacher_vocab)
    s_parallel = check_layout(parallel, teacher.arch, student.arch, dcfg)
    t_parallel = teacher_parallel(parallel, teacher.arch, dcfg)
    pairs = parse_layer_pairs(dcfg.intermediate_layers, teacher_layers=teacher.arch.num_layers,
                              student_layers=student.arch.num_layers)
    check_pairs_on_stages(pairs, t_parallel.layers_per_stage(teacher.arch.num_layers),
                          s_parallel.layers_per_stage(student.arch.num_layers))
    env = LaunchEnv.from_environ()
    cfg.num_microbatches(parallel.data_parallel(env.world_size))
    tokenizer = shared_tokenizer(args.tokenizer, teacher, student)
    data_cfg = data_config(args, tokenizer)
    check_data_files(data_cfg)
    check = None
    if args.resume:
        from megatron_minitron.training.resume import check_resume

        check = check_resume(save, {"train": cfg.to_json(), "distill": dcfg.to_json(), "data": data_cfg.to_json()},
                             train_iters=cfg.train_iters, exit_interval=cfg.exit_interval)
        if check.done:
            print(f"the run in {save} is already at iteration {check.iteration} (--train-iters); nothing to do, "
                  f"nothing was changed", flush=True)
            return 0
    return _distill(args, parallel, env, cfg, dcfg, teacher, student, data_cfg, save, check, eval_cfg)


def shared_tokenizer(tokenizer_path, teacher, student):
    """The one tokenizer of both models: --tokenizer, else the student's (which must be the teacher's)."""
    from megatron_minitron.data.loader import check_vocab_fits
    from megatron_minitron.data.tokenizer import TokenizerRef, tokenizer_ref_for

    refs = {name: TokenizerRef.from_json(info.tokenizer) for name, info in (("teacher", teacher),
                                                                            ("student", student)) if info.tokenizer}
    if len(refs) == 2:
        prints = {name: ref.load().fingerprint for name, ref in refs.items()}
        if prints["teacher"] != prints["student"]:
            raise ConfigError(f"teacher and student use different tokenizers ({refs['teacher'].path} vs "
                              f"{refs['student'].path}); distillation compares their logits token by token")
    ref = tokenizer_ref_for(tokenizer_path) if tokenizer_path else refs.get("student") or refs.get("teacher")
    if ref is not None:
        check_vocab_fits(ref.load(), student.arch.vocab_size)
    return ref


def _distill(args, parallel, env, cfg, dcfg, teacher, student, data_cfg, save: Path, check, eval_cfg=None) -> int:
    from megatron_minitron.data.loader import load_tokenizer, run_batches, tokenizer_json
    from megatron_minitron.distill.loop import distill

    with run_session(parallel, env, seed=cfg.seed, save=save, overwrite=args.overwrite) as runtime:
        tokenizer = load_tokenizer(data_cfg)
        batches = run_batches(data_cfg, tokenizer, cfg, runtime, model_vocab_size=student.arch.vocab_size)
        settings = {"train": cfg.to_json(), "distill": dcfg.to_json(), "data": data_cfg.to_json()}
        write_run_record(runtime, save, settings, check=check, teacher=str(teacher.root), student=str(student.root),
                         arch=student.arch.to_json(), teacher_arch=teacher.arch.to_json(),
                         world_size=env.world_size, parallel=vars(parallel))
        if runtime.is_logging_rank:
            print(f"distilling {teacher.arch.num_parameters() / 1e6:.2f}M -> {student.arch.num_parameters() / 1e6:.2f}M "
                  f"parameters at TP={parallel.tensor_parallel} PP={parallel.pipeline_parallel} "
                  f"EP={parallel.expert_parallel} DP={runtime.data_parallel} on {runtime.device.type} "
                  f"({runtime.backend})", flush=True)
            for name, info in (("teacher", teacher), ("student", student)):
                if info.arch.is_moe:
                    print(f"{name}: mixture of experts, {info.arch.num_experts} experts, top-"
                          f"{info.arch.moe_router_topk}, {info.arch.num_active_parameters() / 1e6:.2f}M active "
                          f"parameters per token" + (f"; router aux-loss coefficient {cfg.moe_aux_loss_coeff} "
                                                     f"(added to the KD loss)" if name == "student" else
                                                     "; frozen, in eval mode (no aux loss)"), flush=True)
        scorer, interval = _task_scorer(args, cfg, eval_cfg, runtime, tokenizer, student.arch)
        distill(teacher_info=teacher, student_info=student, runtime=runtime, train_cfg=cfg, cfg=dcfg, **batches,
                save=save, tokenizer=tokenizer_json(data_cfg, tokenizer), task_scores=scorer,
                task_scores_interval=interval,
                provenance={"command": "distill", "teacher": str(teacher.root), "student": str(student.root),
                            "plan": student.metadata.get("plan"), "distill": dcfg.to_json()})
    return 0


def _task_scorer(args, cfg, eval_cfg, runtime, tokenizer, arch):
    """(--eval-tasks' scorer or None, its interval in steps)."""
    if eval_cfg is None:
        return None, 0
    from megatron_minitron.evaluation.run import TaskScorer

    scorer = TaskScorer(eval_cfg, runtime=runtime, tokenizer_ref=tokenizer.ref, vocab_size=arch.vocab_size,
                        max_length=arch.max_position_embeddings)
    return scorer, cfg.eval_interval if args.eval_tasks_interval is None else args.eval_tasks_interval


def _run_cached(args, parallel, cfg, dcfg, eval_cfg, save: Path) -> int:
    """--teacher-logits: the checks of a cached run (the cache against this run, field by field), then train."""
    from megatron_minitron.config import ArchConfig
    from megatron_minitron.distill.logits_cache import LogitsCache, check_run
    from megatron_minitron.distill.loop import check_models
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.model.integrity import fingerprint
    from megatron_minitron.runtime import LaunchEnv

    cache, student = LogitsCache(args.teacher_logits), ckpt.resolve(args.student)
    check_checkpoint_space(save, student.arch)
    for name, root in (("--student", student.root), ("--teacher-logits", cache.root)):
        if save.resolve() == root.resolve() or save.resolve().is_relative_to(root.resolve()):
            raise ConfigError(f"--save {save} is inside {name} {root}; write the run elsewhere")
    teacher_print = fingerprint(ckpt.resolve(args.teacher).path) if args.teacher else None
    check_models(ArchConfig.from_json(cache.manifest.teacher_arch), student.arch, seq_length=cfg.seq_length,
                 truncate_teacher_vocab=dcfg.truncate_teacher_vocab)
    parallel.check_arch(student.arch)
    env = LaunchEnv.from_environ()
    cfg.num_microbatches(parallel.data_parallel(env.world_size))
    data_cfg = data_config(args, shared_tokenizer(args.tokenizer, student, student))
    check_run(cache, student_arch=student.arch, data_cfg=data_cfg, train_cfg=cfg, distill_cfg=dcfg,
              teacher_fingerprint=teacher_print)
    check_data_files(data_cfg)
    settings = {"train": cfg.to_json(), "distill": dcfg.to_json(), "data": data_cfg.to_json(),
                "cache": {"teacher_fingerprint": cache.manifest.teacher_fingerprint, "top_k": cache.manifest.top_k}}
    check = None
    if args.resume:
        from megatron_minitron.training.resume import check_resume

        check = check_resume(save, settings, train_iters=cfg.train_iters, exit_interval=cfg.exit_interval)
        if check.done:
            print(f"the run in {save} is already at iteration {check.iteration} (--train-iters); nothing to do, "
                  f"nothing was changed", flush=True)
            return 0
    return _distill_cached(args, parallel, env, cfg, dcfg, cache, student, data_cfg, settings, save, check, eval_cfg)


def _distill_cached(args, parallel, env, cfg, dcfg, cache, student, data_cfg, settings, save, check, eval_cfg) -> int:
    from megatron_minitron.data.loader import load_tokenizer, tokenizer_json
    from megatron_minitron.distill.cached import cached_batches, distill_from_cache

    with run_session(parallel, env, seed=cfg.seed, save=save, overwrite=args.overwrite) as runtime:
        tokenizer = load_tokenizer(data_cfg)
        batches = cached_batches(cache, data_cfg, tokenizer, cfg, runtime, model_vocab_size=student.arch.vocab_size)
        write_run_record(runtime, save, settings, check=check, teacher_logits=str(cache.root.resolve()),
                         student=str(student.root), arch=student.arch.to_json(), world_size=env.world_size,
                         parallel=vars(parallel))
        if runtime.is_logging_rank:
            print(f"distilling {student.arch.num_parameters() / 1e6:.2f}M parameters from the teacher's cached "
                  f"top-{cache.manifest.top_k} in {cache.root} at TP={parallel.tensor_parallel} "
                  f"PP={parallel.pipeline_parallel} DP={runtime.data_parallel} (no teacher in memory)", flush=True)
        scorer, interval = _task_scorer(args, cfg, eval_cfg, runtime, tokenizer, student.arch)
        distill_from_cache(student_info=student, runtime=runtime, train_cfg=cfg, cfg=dcfg, **batches, save=save,
                           tokenizer=tokenizer_json(data_cfg, tokenizer), task_scores=scorer,
                           task_scores_interval=interval,
                           provenance={"command": "distill", "teacher_logits": str(cache.root.resolve()),
                                       "teacher_fingerprint": cache.manifest.teacher_fingerprint,
                                       "student": str(student.root), "plan": student.metadata.get("plan"),
                                       "distill": dcfg.to_json()})
    return 0
