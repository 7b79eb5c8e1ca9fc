"""Loading weights into a trainer (fine-tuning, distillation students) with a bf16 mixed-precision
optimizer: its fp32 main weights must follow the loaded weights, or the first step would restore the
random initialisation (a step at learning rate 0 must leave the loaded weights as they are)."""

from __future__ import annotations

import torch

from megatron_minitron.config import preset
from megatron_minitron.model.build import build_model, unwrap
from megatron_minitron.model.checkpoint import save_checkpoint
from megatron_minitron.runtime import set_seed
from megatron_minitron.training.loop import TrainConfig, build_trainer, init_from, lm_task, train_step


def test_a_zero_learning_rate_step_keeps_the_loaded_bf16_weights(single_rank_runtime, tmp_path):
    rt, arch = single_rank_runtime, preset("tiny")
    set_seed(1)
    source = build_model(arch, rt, dtype=torch.bfloat16)
    save_checkpoint(tmp_path / "ckpt", model=source, arch=arch, runtime=rt, iteration=None)
    set_seed(2)  # the trainer's own random initialisation differs from the checkpoint
    cfg = TrainConfig(train_iters=4, micro_batch_size=2, global_batch_size=2, seq_length=16, lr_warmup_iters=1,
                      bf16=True)
    trainer = build_trainer(arch, rt, cfg)
    init_from(trainer, tmp_path / "ckpt")
    tokens = torch.randint(0, arch.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 16),
             "position_ids": torch.arange(16).expand(2, 16)}
    train_step(trainer, lm_task(rt.device), iter([batch]))  # warm-up: the first step runs at learning rate 0
    expected = {k: v for k, v in unwrap(source).state_dict().items() if torch.is_tensor(v) and "extra_state" not in k}
    got = unwrap(trainer.model[0]).state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
