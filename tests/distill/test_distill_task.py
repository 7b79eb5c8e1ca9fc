"""The distillation task's reported losses equal the loss functions applied to the two models' own
logits (one process): forward, reverse and top-k KL, and the LM loss; and the CLI flags reach the
DistillConfig."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_minitron.config import preset
from megatron_minitron.distill import losses
from megatron_minitron.distill.loop import ADAPTERS, DistillConfig, build, distill_task
from megatron_minitron.training.loop import TrainConfig, evaluate, init_from

SEQ, MBS = 32, 2


@pytest.fixture(scope="module")
def pair(single_rank_runtime, tmp_path_factory):
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.checkpoint import resolve, save_checkpoint
    from megatron_minitron.plan import Target, random_plan
    from megatron_minitron.prune.rewrite import prune_checkpoint

    arch, root = preset("tiny"), tmp_path_factory.mktemp("pair")
    save_checkpoint(root / "teacher", model=build_model(arch, single_rank_runtime), arch=arch,
                    runtime=single_rank_runtime, iteration=None)
    plan = random_plan(arch.explicit(), Target(ffn_hidden_size=96, num_attention_heads=2, num_query_groups=1), seed=4)
    prune_checkpoint(root / "teacher", plan, root / "student", print_fn=lambda _: None)
    return resolve(root / "teacher"), resolve(root / "student")


def _batch(vocab):
    tokens = torch.randint(0, vocab, (MBS, SEQ + 1), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(MBS, SEQ)
    mask[0, :5] = 0  # some masked tokens
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
            "position_ids": torch.arange(SEQ).expand(MBS, SEQ)}


@pytest.mark.parametrize("options", [dict(), dict(kd_loss="reverse", temperature=2.0, temperature_squared=True),
                                     dict(top_k=7), dict(lm_weight=0.5, kd_weight=2.0)])
def test_reported_losses_equal_the_loss_functions(pair, single_rank_runtime, options):
    from megatron_minitron.model.forward import forward_logits

    teacher, student = pair
    rt, cfg = single_rank_runtime, DistillConfig(**options)
    trainer, pairs = build(teacher, student, rt, TrainConfig(train_iters=2, micro_batch_size=MBS,
                                                             global_batch_size=MBS, seq_length=SEQ,
                                                             lr_warmup_iters=0), cfg)
    init_from(trainer, student.root, optional_prefixes=(ADAPTERS + ".",))
    task = distill_task(rt, cfg, trainer.chunks[0], pairs)
    batch = _batch(teacher.arch.vocab_size)
    got = evaluate(trainer, task, iter([batch]), 1)
    chunk = trainer.chunks[0]
    s_logits = forward_logits(chunk.module, batch["tokens"], batch["position_ids"], rt)
    t_logits = forward_logits(chunk.teacher, batch["tokens"], batch["position_ids"], rt)
    kw = dict(temperature=cfg.temperature, reverse=cfg.kd_loss == "reverse",
              scale_by_temperature_squared=cfg.temperature_squared)
    kd = (losses.top_k_kl(s_logits, t_logits, k=cfg.top_k, **kw) if cfg.top_k
          else losses.vocab_parallel_kl(s_logits, t_logits, **kw))
    lm = torch.nn.functional.cross_entropy(s_logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten().bool()
    expected_kd = kd.flatten()[mask].mean()
    expected_lm = lm[mask].mean()
    assert got["kd loss"] == pytest.approx(float(expected_kd), rel=1e-5)
    assert got["lm loss"] == pytest.approx(float(expected_lm), rel=1e-5)
    assert got["loss"] == pytest.approx(cfg.kd_weight * float(expected_kd) + cfg.lm_weight * float(expected_lm),
                                        rel=1e-5)
    chunk.close()


def test_logits_are_the_output_layers_own_batch_major_tensor(pair, single_rank_runtime):
    """Both models' logits come out of the chunk as the output layer's storage (no transposed copy), equal
    to the logits of the same models without the chunk's hooks, and the student's gradient still flows."""
    from megatron_minitron.model.build import unwrap

    teacher, student = pair
    rt = single_rank_runtime
    trainer, pairs = build(teacher, student, rt, TrainConfig(train_iters=2, micro_batch_size=MBS,
                                                             global_batch_size=MBS, seq_length=SEQ,
                                                             lr_warmup_iters=0), DistillConfig())
    chunk = trainer.chunks[0]
    models = (unwrap(chunk.module), unwrap(chunk.teacher))
    written: dict = {}  # registered after the chunk's hooks: sees what GPTModel receives
    probes = [m.output_layer.register_forward_hook(lambda layer, _a, out: written.update({layer: out[0]}))
              for m in models]
    batch = _batch(teacher.arch.vocab_size)
    s_out, t_out = chunk(batch["tokens"], batch["position_ids"], None)
    for probe in probes:
        probe.remove()
    for out, model in zip((s_out, t_out), models):
        assert out.shape == (MBS, SEQ, student.arch.padded_vocab) and out.is_contiguous()
        assert out.data_ptr() == written[model.output_layer].data_ptr()
    s_out.float().square().sum().backward()
    assert unwrap(chunk.module).output_layer.weight.main_grad.abs().sum() > 0
    chunk.close()  # the models as megatron alone runs them: [s, b, V] logits, transposed and copied
    with torch.no_grad():
        for out, model in zip((s_out, t_out), models):
            plain = model(batch["tokens"], batch["position_ids"], None)
            torch.testing.assert_close(out.detach(), plain, rtol=1e-6, atol=1e-6)


def test_cli_flags_reach_the_config():
    from megatron_minitron.cli.distill import add_arguments, distill_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--teacher", "t", "--student", "s", "--save", "o", "--kd-loss", "reverse",
                              "--kd-temperature", "2", "--kd-temperature-squared", "--kd-top-k", "5",
                              "--kd-weight", "0.5", "--lm-loss-weight", "0.25", "--intermediate-layers", "3:1",
                              "--intermediate-loss", "mse", "--intermediate-weight", "2", "--no-rescale-intermediate",
                              "--skip-teacher-check", "--teacher-first-stage-layers", "3"])
    assert distill_config(args) == DistillConfig(
        kd_loss="reverse", temperature=2.0, temperature_squared=True, top_k=5, kd_weight=0.5, lm_weight=0.25,
        intermediate_layers=("3:1",), intermediate_loss="mse", intermediate_weight=2.0, rescale_intermediate=False,
        teacher_check=False, teacher_first_stage_layers=3)


def test_a_teacher_with_more_vocabulary_padding_is_truncated_on_request(pair, single_rank_runtime, tmp_path):
    """Teacher padded to 1152 rows, student to 1024 (same 1000-token vocabulary): refused without the
    option; with it the KD loss is the KL against the teacher's first 1024 logits."""
    from megatron_minitron.config import ConfigError
    from megatron_minitron.distill.loop import check_models
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.checkpoint import resolve, save_checkpoint
    from megatron_minitron.model.forward import forward_logits

    _, student = pair
    rt, arch = single_rank_runtime, preset("tiny").replace(padded_vocab_size=1152)
    wide = build_model(arch, rt)
    save_checkpoint(tmp_path / "teacher", model=wide, arch=arch, runtime=rt, iteration=None)
    teacher = resolve(tmp_path / "teacher")
    with pytest.raises(ConfigError, match="pass --truncate-teacher-vocab"):
        check_models(teacher.arch, student.arch, seq_length=SEQ)
    check_models(teacher.arch, student.arch, seq_length=SEQ, truncate_teacher_vocab=True)
    with pytest.raises(ConfigError, match="vocabularies differ"):  # never the other way round
        check_models(student.arch, teacher.arch, seq_length=SEQ, truncate_teacher_vocab=True)

    cfg = DistillConfig(truncate_teacher_vocab=True)
    trainer, pairs = build(teacher, student, rt, TrainConfig(train_iters=2, micro_batch_size=MBS, global_batch_size=MBS,
                                                             seq_length=SEQ, lr_warmup_iters=0), cfg)
    init_from(trainer, student.root, optional_prefixes=(ADAPTERS + ".",))
    batch = _batch(arch.vocab_size)
    got = evaluate(trainer, distill_task(rt, cfg, trainer.chunks[0], pairs), iter([batch]), 1)
    s_logits = forward_logits(trainer.chunks[0].module, batch["tokens"], batch["position_ids"], rt)
    t_logits = forward_logits(wide, batch["tokens"], batch["position_ids"], rt)[..., :1024]
    mask = batch["loss_mask"].flatten().bool()
    expected = losses.vocab_parallel_kl(s_logits, t_logits).flatten()[mask].mean()
    assert got["kd loss"] == pytest.approx(float(expected), rel=1e-5)
    trainer.chunks[0].close()
