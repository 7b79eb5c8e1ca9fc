"""One prepared GPU check (run on a lent GPU machine; CI never runs it).

    torchrun --nproc-per-node 1 benchmarks/gpu_check.py --out $OUT/gpu_check.json

On one GPU with NCCL it: builds the tiny model with the local spec and with the Transformer-Engine
spec (when TE imports), loads both from one checkpoint saved by the local-spec model, compares
their logits (fp32), trains a few bf16 steps with the TE spec and checks the loss falls, saves and
reloads that bf16 checkpoint and checks the weights round-trip bit for bit; computes importance scores
with both specs (the TE spec recomputes the LayerNorms fused into linear_qkv/linear_fc1) and compares
them; runs bf16 distillation steps (TE spec) from the trained model into its width-pruned copy and
checks the KD loss falls; and for a Mixture-of-Experts model (tiny-moe): loads a local-spec checkpoint
(SequentialMLP experts) into the TE spec (grouped-GEMM experts) and compares logits, then trains bf16
steps with the NCCL all-to-all token dispatcher and checks the loss falls and the router aux loss is
logged. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_minitron.config import preset  # noqa: E402
from megatron_minitron.model import checkpoint as ckpt  # noqa: E402
from megatron_minitron.model.build import build_model, transformer_engine_available, unwrap  # noqa: E402
from megatron_minitron.model.forward import forward_logits  # noqa: E402
from megatron_minitron.runtime import ParallelConfig, initialize, shutdown  # noqa: E402
from megatron_minitron.training.loop import TrainConfig, build_trainer, lm_task, train_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    runtime = initialize(ParallelConfig())
    report: dict = {"device": str(runtime.device), "backend": runtime.backend,
                    "te_available": transformer_engine_available(),
                    "cuda": torch.version.cuda, "torch": torch.__version__}
    arch = preset("tiny")
    tokens = torch.randint(0, arch.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(64).expand(2, 64)
    with tempfile.TemporaryDirectory() as tmp:
        local = build_model(arch, runtime, dtype=torch.float32, use_te=False)
        ckpt.save_checkpoint(Path(tmp) / "local", model=local, arch=arch, runtime=runtime, iteration=None)
        info = ckpt.resolve(Path(tmp) / "local")
        reference = forward_logits(local, tokens, positions, runtime)
        if report["te_available"]:
            te = build_model(arch, runtime, dtype=torch.float32, use_te=True)
            ckpt.load_checkpoint(info, model=te)
            logits = forward_logits(te, tokens, positions, runtime)
            report["te_vs_local_logits_rel_diff"] = float((logits - reference).abs().max() / reference.abs().max())

        cfg = TrainConfig(train_iters=40, micro_batch_size=4, global_batch_size=8, seq_length=63, lr=3e-3,
                          lr_warmup_iters=2, bf16=True)
        trainer = build_trainer(arch, runtime, cfg)
        fixed = {"tokens": tokens[:, :-1].repeat(2, 1)[:4], "labels": tokens[:, 1:].repeat(2, 1)[:4],
                 "loss_mask": torch.ones(4, 63), "position_ids": torch.arange(63).expand(4, 63)}

        def data():
            while True:
                yield fixed

        losses = [train_step(trainer, lm_task(runtime.device), data())["lm loss"] for _ in range(20)]
        report["bf16_losses_first_last"] = [losses[0], losses[-1]]
        report["bf16_loss_fell"] = losses[-1] < losses[0] - 1.0
        ckpt.save_checkpoint(Path(tmp) / "bf16", model=trainer.model[0], arch=arch, runtime=runtime, iteration=20)
        again = build_model(arch, runtime, dtype=torch.bfloat16)
        ckpt.load_checkpoint(ckpt.resolve(Path(tmp) / "bf16"), model=again)
        saved = unwrap(trainer.model[0]).state_dict()
        report["bf16_roundtrip_bit_identical"] = all(
            torch.equal(value, unwrap(again).state_dict()[key]) for key, value in saved.items()
            if isinstance(value, torch.Tensor) and not key.endswith("_extra_state"))
        report.update(importance_and_distill(runtime, info, Path(tmp), report["te_available"], fixed))
        report.update(moe_check(runtime, Path(tmp), report["te_available"], fixed))
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    shutdown()


def importance_and_distill(runtime, info, tmp: Path, te: bool, batch_of_the_teacher: dict) -> dict:
    """Importance with both layer specs (fp32), then a few bf16 distillation steps."""
    from megatron_minitron.distill.loop import ADAPTERS, DistillConfig, build, distill_task
    from megatron_minitron.importance.calibration import micro_batches
    from megatron_minitron.importance.run import ImportanceConfig, collect
    from megatron_minitron.plan import Target, random_plan
    from megatron_minitron.prune.rewrite import prune_checkpoint
    from megatron_minitron.training.loop import init_from

    arch, out = info.arch, {}
    g = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(8):
        t = torch.randint(0, arch.vocab_size, (65,), generator=g)
        samples.append({"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(64), "position_ids": torch.arange(64)})
    scores = {}
    for spec in ([False, True] if te else [False]):
        model = build_model(arch, runtime, dtype=torch.float32, use_te=spec)
        ckpt.load_checkpoint(info, model=model)
        tensors, _ = collect(model, runtime, arch, lambda: micro_batches(samples, 8, micro_batch_size=4, dp_rank=0,
                                                                           dp_size=1),
                             8, 64, ImportanceConfig(micro_batch_size=4), use_te=spec, log=lambda _: None)
        scores[spec] = tensors
    if te:
        out["importance_te_vs_local_rel_diff"] = {
            key: float((scores[True][key] - scores[False][key]).abs().max() / scores[False][key].abs().max())
            for key in ("heads", "query_groups", "ffn", "hidden", "layers_bi")}
    teacher = ckpt.resolve(tmp / "bf16")  # the model trained above: confident logits worth distilling
    plan = random_plan(arch.explicit(), Target(hidden_size=48, ffn_hidden_size=96), seed=0)
    prune_checkpoint(teacher.root, plan, tmp / "student", print_fn=lambda _: None)
    student = ckpt.resolve(tmp / "student")
    cfg = TrainConfig(train_iters=20, micro_batch_size=4, global_batch_size=4, seq_length=64, lr=3e-3,
                      lr_warmup_iters=1, bf16=True)
    dcfg = DistillConfig(intermediate_layers=("1:1",))
    trainer, pairs = build(teacher, student, runtime, cfg, dcfg)
    init_from(trainer, student.root, optional_prefixes=(ADAPTERS + ".",))
    task = distill_task(runtime, dcfg, trainer.chunks[0], pairs)
    batch = batch_of_the_teacher
    kd = [train_step(trainer, task, iter([batch]))["kd loss"] for _ in range(10)]
    out["bf16_distill_kd_first_last"] = [kd[0], kd[-1]]
    out["bf16_distill_kd_fell"] = kd[-1] < kd[0]
    return out


def moe_check(runtime, tmp: Path, te: bool, batch: dict) -> dict:
    """tiny-moe: local-spec experts vs TE grouped-GEMM experts from one checkpoint (fp32), then bf16 steps."""
    from megatron_minitron.runtime.dist import moe_token_dispatcher

    arch, out = preset("tiny-moe", moe_shared_expert_ffn_hidden_size=32), {}
    out["moe_token_dispatcher"] = moe_token_dispatcher(runtime.backend)
    tokens, positions = batch["tokens"][:2], batch["position_ids"][:2]
    local = build_model(arch, runtime, dtype=torch.float32, use_te=False)
    ckpt.save_checkpoint(tmp / "moe_local", model=local, arch=arch, runtime=runtime, iteration=None)
    reference = forward_logits(local, tokens, positions, runtime)
    if te:
        grouped = build_model(arch, runtime, dtype=torch.float32, use_te=True)
        ckpt.load_checkpoint(ckpt.resolve(tmp / "moe_local"), model=grouped)
        logits = forward_logits(grouped, tokens, positions, runtime)
        out["moe_te_grouped_vs_local_logits_rel_diff"] = float((logits - reference).abs().max() / reference.abs().max())
    cfg = TrainConfig(train_iters=40, micro_batch_size=4, global_batch_size=8, seq_length=63, lr=3e-3,
                      lr_warmup_iters=2, bf16=True, moe_aux_loss_coeff=0.01)
    trainer = build_trainer(arch, runtime, cfg)
    steps = [train_step(trainer, lm_task(runtime.device), iter([batch] * 2)) for _ in range(20)]
    out["moe_bf16_losses_first_last"] = [steps[0]["lm loss"], steps[-1]["lm loss"]]
    out["moe_bf16_loss_fell"] = steps[-1]["lm loss"] < steps[0]["lm loss"] - 1.0
    out["moe_aux_loss_first_last"] = [steps[0].get("moe aux loss"), steps[-1].get("moe aux loss")]
    return out


if __name__ == "__main__":
    main()
