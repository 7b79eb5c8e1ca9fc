"""Distillation from a logits cache (distill/logits_cache.py): the student alone in the training loop, the
teacher's targets read with the data. No teacher is built or loaded, so its memory and its forward pass
are gone; what the student optimises is `cached_kl` over the cached support and the rest, at any layout
(the targets are per sample, the loss vocab-parallel over the student's TP group).

Per micro-batch the last stage's loss is  kd_weight * KL + lm_weight * CE(student), summed over unmasked
tokens, as in loop.py. With K = the padded vocabulary the KL is the online one, so a run from the cache
follows the online run step for step. The teacher's LM loss, which validation reports as online, is read
from the cache (its log-probability of each label). Intermediate-layer losses need the teacher's hidden
states, which a cache does not hold.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from megatron_minitron.distill.loop import (LOSSES, DistillConfig, check_teacher_loss, loss_triple,
                                           trained_cross_entropy)
from megatron_minitron.distill.logits_cache import LABEL_KEY, TARGET_KEYS, LogitsCache, WithTeacherTargets


def cached_task(runtime, cfg: DistillConfig):
    """megatron forward step + loss function of distillation against cached targets, for a student built by
    `cached_trainer`."""
    from megatron_minitron.distill.cached_kl import cached_kl_and_lm
    from megatron_minitron.training.loop import Task

    device = runtime.device
    # the layout the output layer writes (cached_trainer): sequence-first only under sequence parallelism,
    # where GPTModel hands back a transposed copy; the KL's gradient goes out in that layout (no copy back)
    sequence_first = runtime.parallel.sequence_parallel

    def forward_step(data_iterator: Iterator[dict], model):
        batch = next(data_iterator)
        keys = ("tokens", "position_ids", "labels", "loss_mask",
                *((*TARGET_KEYS, LABEL_KEY) if runtime.is_last_stage else ()))
        batch = {k: batch[k].to(device, non_blocking=True) for k in keys}
        logits = model(batch["tokens"], batch["position_ids"], None)

        def loss_func(student_logits):
            # the student's LM loss for the reports comes from the KL's own pass over the vocabulary
            kd, lm = cached_kl_and_lm(student_logits, *(batch[k] for k in TARGET_KEYS), batch["labels"],
                                      group=runtime.tp_group, temperature=cfg.temperature,
                                      reverse=cfg.kd_loss == "reverse",
                                      scale_by_temperature_squared=cfg.temperature_squared,
                                      sequence_first=sequence_first)
            if cfg.lm_weight > 0:  # trained on: megatron's CE, as online
                lm = trained_cross_entropy(student_logits, batch["labels"])
            teacher_lm = batch[LABEL_KEY].to(torch.float32).neg()  # what the online teacher's CE gives
            return loss_triple(cfg, kd, lm, teacher_lm, batch["loss_mask"])

        return logits, loss_func

    return Task(forward_step=forward_step, losses=LOSSES, eval_only=("teacher lm loss",))


def cached_trainer(arch, runtime, train_cfg):
    """The student's Trainer, its output layer writing batch-major logits as online distillation's does
    (distill/model.py `batch_major_logits`): no logits copies, and the output weight's gradient summed
    over the tokens in the online run's order, so that a run from a full-vocabulary cache follows it."""
    from megatron_minitron.distill.model import batch_major_logits
    from megatron_minitron.model.build import unwrap
    from megatron_minitron.training.loop import build_trainer

    trainer = build_trainer(arch, runtime, train_cfg)
    batch_major_logits(unwrap(trainer.model[0]))  # kept for the model's life
    return trainer


def cached_batches(cache: LogitsCache, data_cfg, tokenizer, train_cfg, runtime, *, model_vocab_size: int) -> dict:
    """`train_batches(start)` / `valid_batches()` as data/loader.run_batches gives them, each sample with its
    cached targets, read ahead by a background thread (`prefetched`). The datasets are built for the cache's
    sample counts (megatron's shuffle depends on them), so a run shorter than the cache sees the cache's
    first samples, in its order."""
    from megatron_minitron.data.loader import batch_iterator, build_datasets, prefetched

    from megatron_minitron.distill.logits_cache import check_tokenizer

    check_tokenizer(cache, tokenizer)
    m = cache.manifest
    train_ds, valid_ds, _ = build_datasets(data_cfg, tokenizer, (m.samples("train"), m.samples("valid"), 0),
                                           model_vocab_size=model_vocab_size)
    dp = dict(micro_batch_size=train_cfg.micro_batch_size, dp_rank=runtime.dp_rank, dp_size=runtime.data_parallel)
    train = WithTeacherTargets(train_ds, cache, "train")
    valid = WithTeacherTargets(valid_ds, cache, "valid") if valid_ds is not None and m.eval_iters else None
    pin = runtime.device.type == "cuda"  # reading the cache overlaps the step; pinned: the copy to the GPU too
    return {"train_batches": lambda start: prefetched(batch_iterator(train, start_sample=start, **dp), pin_memory=pin),
            "valid_batches": ((lambda: prefetched(batch_iterator(valid, **dp), pin_memory=pin))
                              if valid is not None else None)}


def distill_from_cache(*, student_info, runtime, train_cfg, cfg: DistillConfig, train_batches, valid_batches, save,
                       tokenizer: Optional[dict], provenance: dict, task_scores=None,
                       task_scores_interval: int = 0) -> dict:
    """Train (or resume) the student to train_cfg.train_iters against the cached targets; returns the final
    validation (also SAVE/final_validation.json), empty without validation data."""
    import json

    from megatron_minitron.model.checkpoint import latest_iteration
    from megatron_minitron.training.loop import MetricsLog, RunPaths, evaluate, init_from, train

    trainer = cached_trainer(student_info.arch, runtime, train_cfg)
    task = cached_task(runtime, cfg)
    if latest_iteration(save) is None:
        log = MetricsLog(save / "metrics.jsonl", enabled=runtime.is_logging_rank)
        log.keep_until(-1)  # a run killed before its first checkpoint starts again from nothing
        init_from(trainer, student_info.root)
        if valid_batches is not None:  # the student before training (search ranks candidates by it too)
            val = evaluate(trainer, task, valid_batches(), train_cfg.eval_iters)
            log.say(f"before training: teacher lm loss {val['teacher lm loss']:.4f} (cached), student lm loss "
                    f"{val['lm loss']:.4f}, kd loss {val['kd loss']:.4f}")
            if cfg.teacher_check:  # the cache holds the teacher's label log-probabilities: the same check as online
                check_teacher_loss(val["teacher lm loss"], vocab_size=student_info.arch.vocab_size,
                                   where="the teacher the --teacher-logits cache was written from")
            log.write({"kind": "valid", "iteration": 0, **{f"val {k}": v for k, v in val.items()}})
    train(trainer, task=task, train_batches=train_batches, valid_batches=valid_batches,
          paths=RunPaths(save=save, metrics=save / "metrics.jsonl"), tokenizer=tokenizer, provenance=provenance,
          task_scores=task_scores, task_scores_interval=task_scores_interval)
    final = evaluate(trainer, task, valid_batches(), train_cfg.eval_iters) if valid_batches is not None else {}
    if runtime.rank == 0 and final:
        (save / "final_validation.json").write_text(json.dumps(
            {"iteration": trainer.iteration, "student lm loss": final["lm loss"], "kd loss": final["kd loss"],
             "teacher lm loss": final["teacher lm loss"], **final}, indent=2) + "\n")
    return final
