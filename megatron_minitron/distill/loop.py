"""Knowledge distillation in the Megatron training loop: the frozen teacher beside the student.

Read it top to bottom: `DistillConfig` (the losses), `check_models` (guards that need no process),
`build` (student trainer + teacher + one `DistillationChunk` per stage), `distill_task` (megatron's
forward step and loss function), `teacher_sanity_check`, and `run` (guards, then the shared training
loop of training/loop.py with this task).

Per micro-batch the last stage's loss is  kd_weight * KL(teacher || student) + lm_weight * CE(student)
summed over unmasked tokens (megatron's per-token convention: the schedule and DDP divide once by the
global token count). Intermediate losses are added on the stage that holds each pair of layers, each
pair's weight rescaled every step to the logit loss's magnitude (weight x KD / pair loss of the
previous step, as the Minitron paper rescales its intermediate loss to the logit loss).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from megatron_minitron.config import ArchConfig, ConfigError
from megatron_minitron.distill.model import (DistillationChunk, LayerPair, check_pairs_on_stages,
                                             parse_layer_pairs)
from megatron_minitron.training.losses import masked_sum

ADAPTERS = "distill_adapters"
"""Name of the student's submodule holding the hidden-size projections (checkpoint keys start with it)."""

LOSSES = ("loss", "kd loss", "lm loss", "teacher lm loss")


def trained_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The student's LM loss with its gradient, for a run that trains on it (lm_weight > 0): megatron's
    vocab-parallel cross entropy, on an fp32 copy of the logits (it writes into its input)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    copy = logits.float() if logits.dtype != torch.float32 else logits.clone()
    return vocab_parallel_cross_entropy(copy, labels)


def loss_triple(cfg, kd: torch.Tensor, lm: torch.Tensor, teacher_lm: torch.Tensor, mask: torch.Tensor):
    """What a megatron loss function returns for per-token losses: the masked sum of kd_weight * KD +
    lm_weight * LM, the token count, and the masked (sum, count) of each of LOSSES for the reports."""
    total = cfg.kd_weight * kd + cfg.lm_weight * lm
    loss_sum, count = masked_sum(total, mask)
    report = {}
    for name, value in zip(LOSSES, (total, kd, lm, teacher_lm)):
        value_sum, value_count = masked_sum(value.detach(), mask)
        report[name] = torch.stack([value_sum, value_count.float()])
    return loss_sum, count, report


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """What the student is trained to match."""

    kd_loss: str = "forward"
    """forward: KL(teacher || student) on the logits (the paper's choice); reverse: KL(student || teacher)."""
    temperature: float = 1.0
    """Softmax temperature of both models' logits (the paper found 1 best)."""
    temperature_squared: bool = False
    """Multiply the KL by temperature^2 (keeps gradient size independent of the temperature)."""
    top_k: Optional[int] = None
    """Restrict the KL to the teacher's top-k tokens (both distributions renormalised over them)."""
    kd_weight: float = 1.0
    """Weight of the logit KD loss."""
    lm_weight: float = 0.0
    """Weight of the student's LM cross-entropy (the paper's best: 0, KD alone)."""
    intermediate_layers: tuple[str, ...] = ()
    """TEACHER:STUDENT 0-based layer pairs whose hidden states are matched (e.g. "11:5")."""
    intermediate_loss: str = "cosine"
    """cosine (1 - cos) or mse between the normalised hidden states of each pair."""
    intermediate_weight: float = 1.0
    """Weight of each pair's loss relative to the KD loss (after rescaling)."""
    rescale_intermediate: bool = True
    """Rescale each pair's loss to the KD loss's magnitude (previous step's ratio)."""
    truncate_teacher_vocab: bool = False
    """Accept a teacher whose vocabulary is padded to more rows than the student's (same tokenizer): its
    embedding and output rows beyond the student's padded size are dropped when it is loaded. Those rows
    are padding (no token id reaches them), so only the softmax's tiny mass on them is lost."""
    teacher_check: bool = True
    """Refuse a teacher whose validation loss is not clearly below ln(vocab) (an untrained teacher)."""
    teacher_first_stage_layers: Optional[int] = None
    """Teacher layers on the first pipeline stage (default: even split of the teacher's depth)."""
    teacher_last_stage_layers: Optional[int] = None
    """Teacher layers on the last pipeline stage."""

    def __post_init__(self) -> None:
        if self.kd_loss not in ("forward", "reverse"):
            raise ConfigError(f"--kd-loss {self.kd_loss!r}: choose forward or reverse")
        if self.temperature <= 0:
            raise ConfigError(f"--kd-temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--kd-top-k must be >= 1, got {self.top_k}")
        if self.intermediate_loss not in ("cosine", "mse"):
            raise ConfigError(f"--intermediate-loss {self.intermediate_loss!r}: choose cosine or mse")
        if self.kd_weight < 0 or self.lm_weight < 0 or self.intermediate_weight < 0:
            raise ConfigError("loss weights must be >= 0")
        if self.kd_weight == 0 and not self.intermediate_layers:
            raise ConfigError("--kd-weight 0 without --intermediate-layers leaves nothing to learn from the "
                              "teacher; use `minitron pretrain --init` for LM-loss-only training")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def check_models(teacher: ArchConfig, student: ArchConfig, *, seq_length: int, truncate_teacher_vocab: bool = False
                 ) -> None:
    """Guards that need no process: one vocabulary, a student no larger than its teacher, and a
    sequence length both models accept."""
    if teacher.vocab_size != student.vocab_size or teacher.padded_vocab < student.padded_vocab:
        raise ConfigError(f"teacher and student vocabularies differ: teacher vocab_size={teacher.vocab_size} "
                          f"(padded {teacher.padded_vocab}), student vocab_size={student.vocab_size} (padded "
                          f"{student.padded_vocab}); distillation compares logits token by token")
    if teacher.padded_vocab != student.padded_vocab and not truncate_teacher_vocab:
        raise ConfigError(f"the teacher's vocabulary is padded to {teacher.padded_vocab} rows, the student's to "
                          f"{student.padded_vocab} (same vocab_size {teacher.vocab_size}); pass "
                          f"--truncate-teacher-vocab to drop the teacher's extra padding rows")
    fields = ["num_layers", "hidden_size", "num_attention_heads", "query_groups"]
    if not all(teacher.moe_layers) and not all(student.moe_layers):  # both have dense MLPs
        fields.append("ffn_hidden_size")
    if teacher.is_moe and student.is_moe:
        fields += ["num_experts", "expert_ffn_hidden_size"]
    for field in fields:
        if getattr(student, field) > getattr(teacher, field):
            raise ConfigError(f"the student is larger than the teacher: {field} {getattr(student, field)} > "
                              f"{getattr(teacher, field)}; did you swap --teacher and --student?")
    if student.num_parameters() > teacher.num_parameters():
        raise ConfigError(f"the student has more parameters ({student.num_parameters():,}) than the teacher "
                          f"({teacher.num_parameters():,}); did you swap --teacher and --student?")
    for name, arch in (("teacher", teacher), ("student", student)):
        if seq_length > arch.max_position_embeddings:
            raise ConfigError(f"--seq-length {seq_length} exceeds the {name}'s max_position_embeddings="
                              f"{arch.max_position_embeddings}")


def model_parallel(runtime_parallel, arch: ArchConfig):
    """The layout one of the two models is built at: the runtime's, except that a dense model beside a
    MoE one under expert parallelism gets EP 1 (it has no experts; its expert-parallel ranks are plain
    data-parallel ranks for it). A MoE model keeps the runtime's EP, which must divide its experts."""
    if arch.is_moe or runtime_parallel.expert_parallel == 1:
        return runtime_parallel
    return dataclasses.replace(runtime_parallel, expert_parallel=1)


def check_layout(runtime_parallel, teacher: ArchConfig, student: ArchConfig, cfg: DistillConfig):
    """Both models fit the layout (the student at the runtime's stage split, the teacher at its own);
    expert parallelism needs a MoE teacher or student. Returns the student's layout."""
    if runtime_parallel.expert_parallel > 1 and not (teacher.is_moe or student.is_moe):
        raise ConfigError(f"expert-parallel size {runtime_parallel.expert_parallel} needs a Mixture-of-Experts "
                          f"teacher or student; both are dense (num_experts is None): use --ep 1")
    parallel = model_parallel(runtime_parallel, student)
    try:
        parallel.check_arch(student)
    except ConfigError as e:
        raise ConfigError(f"the student: {e}") from None
    teacher_parallel(runtime_parallel, teacher, cfg)
    return parallel


def teacher_parallel(runtime_parallel, teacher: ArchConfig, cfg: DistillConfig):
    """The teacher's layout: the same TP/PP/SP (and EP if it has experts), its own split of its layers
    over the stages."""
    parallel = dataclasses.replace(model_parallel(runtime_parallel, teacher),
                                   first_stage_layers=cfg.teacher_first_stage_layers,
                                   last_stage_layers=cfg.teacher_last_stage_layers)
    try:
        parallel.check_arch(teacher)
    except ConfigError as e:
        raise ConfigError(f"the teacher: {e}") from None
    return parallel


def adapter_init(teacher: ArchConfig, student: ArchConfig, plan_hidden: Optional[list[int]]) -> torch.Tensor:
    """Initial student->teacher hidden projection [h_t, h_s]: for a width-pruned student the inverse of
    the pruning (student channel k goes back to teacher channel plan_hidden[k]), else a fixed random
    matrix (seeded, so every rank starts from the same one)."""
    if plan_hidden is not None and len(plan_hidden) == student.hidden_size:
        weight = torch.zeros(teacher.hidden_size, student.hidden_size)
        weight[torch.tensor(plan_hidden), torch.arange(student.hidden_size)] = 1.0
        return weight
    g = torch.Generator().manual_seed(0)
    return torch.randn(teacher.hidden_size, student.hidden_size, generator=g) / math.sqrt(student.hidden_size)


def build(teacher_info, student_info, runtime, train_cfg, cfg: DistillConfig, teacher=None):
    """(student Trainer whose schedule chunk is a DistillationChunk, all layer pairs). The teacher is
    loaded here unless an already loaded `teacher` (see `load_teacher`) is passed; the student's
    weights are loaded by `distill` (from --student or a resumed run)."""
    from megatron.core.distributed import finalize_model_grads

    from megatron_minitron.distill import losses
    from megatron_minitron.model.build import unwrap
    from megatron_minitron.training.loop import build_trainer

    teacher_arch, student_arch = teacher_info.arch, student_info.arch
    pairs = parse_layer_pairs(cfg.intermediate_layers, teacher_layers=teacher_arch.num_layers,
                              student_layers=student_arch.num_layers)
    t_parallel = teacher_parallel(runtime.parallel, teacher_arch, cfg)
    check_pairs_on_stages(pairs, t_parallel.layers_per_stage(teacher_arch.num_layers),
                          runtime.parallel.layers_per_stage(student_arch.num_layers))
    plan_hidden = (student_info.metadata.get("plan") or {}).get("hidden")
    local_pairs: list[LayerPair] = []

    def attach(gpt) -> None:
        """Projections for this stage's pairs whose hidden sizes differ, owned by the student model."""
        layers = {layer.layer_number - 1 for layer in gpt.decoder.layers}
        local_pairs.extend(p for p in pairs if p.student in layers)
        if student_arch.hidden_size == teacher_arch.hidden_size or not local_pairs:
            return
        dtype = next(gpt.parameters()).dtype
        adapters = torch.nn.ModuleDict()
        for pair in local_pairs:
            linear = torch.nn.Linear(student_arch.hidden_size, teacher_arch.hidden_size, bias=False)
            with torch.no_grad():
                linear.weight.copy_(adapter_init(teacher_arch, student_arch, plan_hidden))
            for param in linear.parameters():  # each TP rank sees a slice of the sequence under SP
                param.sequence_parallel = runtime.parallel.sequence_parallel
            adapters[pair.name] = linear.to(device=runtime.device, dtype=dtype)
        gpt.add_module(ADAPTERS, adapters)

    trainer = build_trainer(student_arch, runtime, train_cfg, attach=attach,
                            parallel=model_parallel(runtime.parallel, student_arch))
    if teacher is None:
        teacher = load_teacher(teacher_info, runtime, cfg, dtype=next(trainer.model[0].parameters()).dtype,
                               padded_vocab=student_arch.padded_vocab)
    loss_fn = losses.hidden_cosine_loss if cfg.intermediate_loss == "cosine" else losses.hidden_mse_loss
    student_gpt = unwrap(trainer.model[0])
    trainer.chunks = [DistillationChunk(
        trainer.model[0], teacher, student_hidden=student_arch.hidden_size, teacher_hidden=teacher_arch.hidden_size,
        is_last_stage=runtime.is_last_stage,
        finalize_model_grads=lambda _chunks, *args, **kwargs: finalize_model_grads(trainer.model, *args, **kwargs),
        tp_rank=runtime.tp_rank, pairs=tuple(local_pairs), adapters=getattr(student_gpt, ADAPTERS, None),
        intermediate_loss=loss_fn)]
    return trainer, pairs


def load_teacher(teacher_info, runtime, cfg: DistillConfig, *, dtype: torch.dtype, padded_vocab: int):
    """This stage of the teacher, loaded and frozen (reusable for several students, as the search does),
    with `padded_vocab` embedding/output rows (fewer than stored only with cfg.truncate_teacher_vocab)."""
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.checkpoint import load_checkpoint

    arch = teacher_info.arch
    truncate = padded_vocab != arch.padded_vocab
    if truncate and not cfg.truncate_teacher_vocab:
        raise ConfigError(f"the teacher has {arch.padded_vocab} padded vocabulary rows, the student {padded_vocab}; "
                          f"pass --truncate-teacher-vocab")
    arch = arch.replace(padded_vocab_size=padded_vocab)
    teacher = build_model(arch, runtime, dtype=dtype, parallel=teacher_parallel(runtime.parallel, arch, cfg))
    load_checkpoint(teacher_info, model=teacher, vocab_padding_may_differ=truncate)
    return teacher


def distill_task(runtime, cfg: DistillConfig, chunk: DistillationChunk, pairs: tuple[LayerPair, ...]):
    """megatron forward step + loss function, and the reduction of the intermediate losses."""
    from megatron_minitron.distill import losses
    from megatron_minitron.training.loop import Task

    device, group = runtime.device, runtime.tp_group

    def kd_and_lm(student_logits, teacher_logits, labels):
        """The KD loss, and the student's LM loss for reports (from the full KL's own pass over the vocabulary)."""
        options = dict(group=group, temperature=cfg.temperature, reverse=cfg.kd_loss == "reverse",
                       scale_by_temperature_squared=cfg.temperature_squared)
        if cfg.top_k is not None:  # (its LM loss is replaced when it is trained on)
            return (losses.top_k_kl(student_logits, teacher_logits, k=cfg.top_k, **options),
                    None if cfg.lm_weight > 0 else losses.reported_cross_entropy(student_logits, labels, group=group))
        return losses.vocab_parallel_kl_and_lm(student_logits, teacher_logits, labels, **options)

    def forward_step(data_iterator: Iterator[dict], model: DistillationChunk):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
        out = model(batch["tokens"], batch["position_ids"], None, loss_mask=batch["loss_mask"])
        if not model.is_last_stage:
            return out, None
        student_logits, teacher_logits = out
        mask = batch["loss_mask"]

        def loss_func(_output):
            kd_loss, lm = kd_and_lm(student_logits, teacher_logits, batch["labels"])
            if cfg.lm_weight > 0:
                lm = trained_cross_entropy(student_logits, batch["labels"])
            # the teacher's own loss is for validation reports only
            teacher_lm = (torch.zeros_like(kd_loss) if model.training
                          else losses.reported_cross_entropy(teacher_logits, batch["labels"], group=group))
            return loss_triple(cfg, kd_loss, lm, teacher_lm, mask)

        return student_logits, loss_func

    def stage_losses(reduced: dict, training: bool) -> dict[str, float]:
        if not pairs:
            return {}
        totals = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device)
        index = {p.name: i for i, p in enumerate(pairs)}
        for rows in chunk.reports:
            for pair, row in zip(chunk.pairs, rows):
                totals[index[pair.name]] += row.double()
        chunk.reports.clear()
        if runtime.parallel.sequence_parallel:  # each TP rank saw a slice of the sequence
            torch.distributed.all_reduce(totals, group=runtime.tp_group)
        if runtime.data_parallel > 1:
            torch.distributed.all_reduce(totals, group=runtime.dp_group)
        if runtime.parallel.pipeline_parallel > 1:  # each pair lives on one stage
            torch.distributed.all_reduce(totals, group=runtime.pp_group)
        values = {p.name: float(totals[i, 0] / totals[i, 1].clamp(min=1)) for i, p in enumerate(pairs)}
        if training:
            _rescale(chunk, cfg, values, reduced.get("kd loss", 0.0))
        out = {f"intermediate loss {name}": value for name, value in values.items()}
        out["intermediate loss"] = sum(values.values()) / len(values)
        return out

    def get_state() -> dict:
        return {"weights": dict(chunk.weights)}

    def set_state(saved: dict) -> None:
        chunk.weights.update(saved.get("weights", {}))

    _rescale(chunk, cfg, {}, 0.0)
    return Task(forward_step=forward_step, losses=LOSSES, stage_losses=stage_losses, get_state=get_state,
                set_state=set_state, eval_only=("teacher lm loss",))


def _rescale(chunk: DistillationChunk, cfg: DistillConfig, pair_losses: dict, kd_loss: float) -> None:
    """Weights of the next step's pair losses: weight x (KD loss / pair loss) of this step."""
    for pair in chunk.pairs:
        value = pair_losses.get(pair.name)
        if cfg.rescale_intermediate and value and kd_loss > 0 and cfg.kd_weight > 0:
            chunk.weights[pair.name] = cfg.intermediate_weight * cfg.kd_weight * kd_loss / value
        else:
            chunk.weights.setdefault(pair.name, cfg.intermediate_weight)


def teacher_sanity_check(trainer, task, valid_batches, *, vocab_size: int, eval_iters: int, log) -> dict:
    """Validation losses of the teacher (and the untrained student) before step 1; refuses a teacher whose
    loss is not at least 1 nat below ln(vocab) (random, zeroed or wrongly loaded weights score about
    ln(vocab): every token equally likely)."""
    from megatron_minitron.training.loop import evaluate

    val = evaluate(trainer, task, valid_batches(), eval_iters)
    log(f"before training: teacher lm loss {val['teacher lm loss']:.4f}, student lm loss {val['lm loss']:.4f}, "
        f"kd loss {val['kd loss']:.4f} (uniform prediction: {math.log(vocab_size):.4f})")
    check_teacher_loss(val["teacher lm loss"], vocab_size=vocab_size, where="--teacher")
    return val


def check_teacher_loss(loss: float, *, vocab_size: int, where: str) -> None:
    """Refuse a teacher whose validation LM loss is not at least 1 nat below ln(vocab); `where` names what
    holds the teacher (--teacher, or the logits cache it was read from)."""
    limit = math.log(vocab_size) - 1.0
    if not loss < limit:
        raise ConfigError(f"the teacher looks untrained: its validation loss {loss:.4f} is not below "
                          f"ln(vocab size {vocab_size}) - 1 = {limit:.4f}; check {where} (pass --skip-teacher-check "
                          f"to distill from it anyway)")


def distill(*, teacher_info, student_info, runtime, train_cfg, cfg: DistillConfig, train_batches, valid_batches,
            save, tokenizer: Optional[dict], provenance: dict, teacher=None, task_scores=None,
            task_scores_interval: int = 0) -> dict:
    """Build, check the teacher, train (or resume) to train_cfg.train_iters, and return the final
    validation of student and teacher (also written to SAVE/final_validation.json)."""
    import json

    from megatron_minitron.model.checkpoint import latest_iteration
    from megatron_minitron.training.loop import MetricsLog, RunPaths, evaluate, init_from, train

    trainer, pairs = build(teacher_info, student_info, runtime, train_cfg, cfg, teacher=teacher)
    task = distill_task(runtime, cfg, trainer.chunks[0], pairs)
    log = MetricsLog(save / "metrics.jsonl", enabled=runtime.is_logging_rank)
    try:
        if latest_iteration(save) is None:
            log.keep_until(-1)  # a run killed before its first checkpoint starts again from nothing
            init_from(trainer, student_info.root, optional_prefixes=(ADAPTERS + ".",))
            if valid_batches is not None and cfg.teacher_check:
                val = teacher_sanity_check(trainer, task, valid_batches, vocab_size=teacher_info.arch.vocab_size,
                                           eval_iters=train_cfg.eval_iters, log=log.say)
                log.write({"kind": "valid", "iteration": 0, **{f"val {k}": v for k, v in val.items()}})
        train(trainer, task=task, train_batches=train_batches, valid_batches=valid_batches,
              paths=RunPaths(save=save, metrics=save / "metrics.jsonl"), tokenizer=tokenizer, provenance=provenance,
              task_scores=task_scores, task_scores_interval=task_scores_interval)
        final = evaluate(trainer, task, valid_batches(), train_cfg.eval_iters) if valid_batches is not None else {}
    finally:
        trainer.chunks[0].close()
    if runtime.rank == 0 and final:
        (save / "final_validation.json").write_text(json.dumps(
            {"iteration": trainer.iteration, "student lm loss": final["lm loss"], "kd loss": final["kd loss"],
             "teacher lm loss": final["teacher lm loss"], **final}, indent=2) + "\n")
    return final
