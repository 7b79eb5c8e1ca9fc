"""Distillation with Mixture-of-Experts models (one process): the student's router auxiliary loss in the
distillation metrics equals one computed from the student's routers in plain torch, reaches the router's
gradient, and nothing of the (MoE) teacher's routers leaks into either; a student whose routing is forced
to collapse is reported; the collapse rule itself on hand-made loads."""

from __future__ import annotations

import pytest
import torch

from megatron_minitron.config import preset
from megatron_minitron.distill.loop import DistillConfig, build, distill_task
from megatron_minitron.model.build import unwrap
from megatron_minitron.training.loop import TrainConfig, init_from, train_step
from megatron_minitron.training.moe_stats import STARVED_SHARE, collapse_message, starved_experts
from tests.multirank import synthetic

TEACHER = preset("tiny-moe")
STUDENT = preset("tiny-moe", moe_ffn_hidden_size=32, moe_layer_freq=(1, 0, 1, 1))
SEQ, MBS, GBS = 16, 2, 6  # three micro-batches


@pytest.fixture(scope="module")
def pair(single_rank_runtime, tmp_path_factory):
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.checkpoint import resolve, save_checkpoint
    from megatron_minitron.runtime import set_seed

    root = tmp_path_factory.mktemp("moe-pair")
    for name, arch in (("teacher", TEACHER), ("student", STUDENT)):
        set_seed(3)
        save_checkpoint(root / name, model=build_model(arch, single_rank_runtime), arch=arch,
                        runtime=single_rank_runtime, iteration=None)
    return resolve(root / "teacher"), resolve(root / "student")


def _distill_trainer(pair, runtime, coeff: float):
    teacher, student = pair
    cfg = TrainConfig(train_iters=3, micro_batch_size=MBS, global_batch_size=GBS, seq_length=SEQ, lr_warmup_iters=0,
                      moe_aux_loss_coeff=coeff, clip_grad=0.0)
    trainer, pairs = build(teacher, student, runtime, cfg, DistillConfig())
    init_from(trainer, student.root)
    return trainer, distill_task(runtime, DistillConfig(), trainer.chunks[0], pairs)


def _routers(model):
    return {r.layer_number - 1: r for r in unwrap(model).modules() if type(r).__name__ == "TopKRouter"}


def _batches():
    return synthetic.batches(0, micro_batch_size=MBS, dp_rank=0, dp_size=1, seq_length=SEQ, vocab=1000)


def _switch_loss(hidden: torch.Tensor, weight: torch.Tensor, topk: int):
    """Switch Transformer load-balancing loss E * sum_i f_i * P_i of one micro-batch, from scratch."""
    logits = hidden.reshape(-1, hidden.shape[-1]).double() @ weight.double().t()
    scores = torch.softmax(logits, dim=-1)
    chosen = torch.topk(logits, topk, dim=-1).indices
    counts = torch.zeros(weight.shape[0], dtype=torch.float64).index_add_(
        0, chosen.reshape(-1), torch.ones(chosen.numel(), dtype=torch.float64))
    return weight.shape[0] * (counts / (logits.shape[0] * topk) * scores.mean(dim=0)).sum(), counts


def test_student_aux_loss_is_reported_and_trained_and_the_teachers_stays_out(pair, single_rank_runtime):
    """Teacher and student are both MoE with routers at the same layer numbers, so any teacher router
    output reaching megatron's aux-loss tracker or the gradient would change the numbers compared here."""
    grads, outs = {}, {}
    for coeff in (0.0, 0.5):
        trainer, task = _distill_trainer(pair, single_rank_runtime, coeff)
        seen: dict[int, list] = {}
        for layer, router in _routers(trainer.model[0]).items():
            router.register_forward_hook(lambda m, args, out, layer=layer: seen.setdefault(layer, []).append(
                (args[0].detach().clone(), m.weight.detach().clone())))
        teacher_calls = []
        for router in _routers(trainer.chunks[0].teacher).values():
            router.register_forward_hook(lambda m, args, out: teacher_calls.append(
                (m.training, torch.is_grad_enabled())))
        outs[coeff] = train_step(trainer, task, _batches())
        grads[coeff] = {layer: r.weight.main_grad.clone() for layer, r in _routers(trainer.model[0]).items()}
        trainer.chunks[0].close()
        assert len(teacher_calls) == 4 * 3 and not any(training or grad for training, grad in teacher_calls)
    out = outs[0.5]
    assert sorted(seen) == [0, 2, 3] and all(len(calls) == 3 for calls in seen.values())
    losses, loads = {}, {}
    for layer, calls in seen.items():
        per_mb = [_switch_loss(h, w, STUDENT.moe_router_topk) for h, w in calls]
        losses[layer] = torch.stack([loss for loss, _ in per_mb]).mean()
        counts = sum(c for _, c in per_mb)
        loads[layer] = (counts / counts.sum()).tolist()
    assert out["moe aux loss"] == pytest.approx(0.5 * float(sum(losses.values())), rel=1e-5)
    assert out["moe load-balancing loss"] == pytest.approx(float(sum(losses.values())) / 3, rel=1e-5)
    assert sorted(out["moe expert load"]) == ["0", "2", "3"]
    for layer, load in loads.items():
        assert out["moe expert load"][str(layer)] == pytest.approx(load, abs=1e-6)
    # the reported KD loss is the objective's KD term alone; the aux loss is logged beside it
    assert out["loss"] == pytest.approx(out["kd loss"], rel=1e-7)
    assert outs[0.0]["kd loss"] == pytest.approx(out["kd loss"], rel=1e-6)  # same weights, same step-1 forward
    # the aux loss reaches the last router's gradient: (grad with it - grad without) = d(0.5 * aux)/dW
    layer = 3
    w = seen[layer][0][1].double().requires_grad_(True)
    total = sum(_switch_loss(h, w, STUDENT.moe_router_topk)[0] for h, _ in seen[layer]) / 3
    (expected,) = torch.autograd.grad(0.5 * total, w)
    torch.testing.assert_close((grads[0.5][layer] - grads[0.0][layer]).double(), expected, rtol=1e-4, atol=1e-7)


def test_a_collapsed_student_router_is_reported(pair, single_rank_runtime, capsys):
    """Zero router weights give every token the same logits, so the top-2 is always the same two experts
    (which two of the tied four is torch.topk's choice): the other two get nothing, in every MoE layer."""
    trainer, task = _distill_trainer(pair, single_rank_runtime, 0.01)
    with torch.no_grad():
        for router in _routers(trainer.model[0]).values():
            router.weight.zero_()
    trainer.optimizer.reload_model_params()
    out = train_step(trainer, task, _batches())
    trainer.chunks[0].close()
    starved = out["moe starved experts"]
    assert sorted(starved) == ["0", "2", "3"] and all(len(experts) == 2 for experts in starved.values())
    for layer, experts in starved.items():
        load = out["moe expert load"][layer]
        assert [load[e] for e in experts] == [0.0, 0.0] and sorted(load) == [0.0, 0.0, 0.5, 0.5]
    printed = capsys.readouterr().out
    assert (f"warning: MoE routing collapse at iteration 1: layer 0: experts {starved['0']} of 4 got 0.0%, 0.0% of "
            f"the routed tokens (fair share 25.0%; busiest expert 50.0%); layer 2: ") in printed
    assert "--moe-aux-loss-coeff" in printed


def test_the_collapse_rule():
    fair = 1 / 8
    load = {"1": [fair] * 8, "2": [0.3, 0.3, 0.3, 0.1 - 1e-3, 1e-3, 0.0, 0.0, 0.0],
            "5": [fair * (1 + STARVED_SHARE)] * 7 + [1 - 7 * fair * (1 + STARVED_SHARE)]}
    load["5"][0], load["5"][1] = fair * STARVED_SHARE * 0.99, fair * STARVED_SHARE  # just below / at the bound
    assert starved_experts(load) == {"2": [4, 5, 6, 7], "5": [0]}
    assert starved_experts({"0": [0.25] * 4}) == {}
    message = collapse_message({"2": [4, 5, 6, 7]}, load, 7)
    assert message.startswith("warning: MoE routing collapse at iteration 7: layer 2: experts [4, 5, 6, 7] of 8 got "
                              "0.1%, 0.0%, 0.0%, 0.0% of the routed tokens (fair share 12.5%; busiest expert 30.0%)")


def test_each_collapsed_layer_is_reported_once_until_routing_recovers(single_rank_runtime, capsys):
    from megatron_minitron.training.moe_stats import RECOVERED_AFTER, RouterStats

    stats = RouterStats([], STUDENT, single_rank_runtime, 0.01)
    even, low0, low1 = [0.25] * 4, [0.5, 0.5, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]
    flicker = [{"0": even, "2": even}, {"0": low0, "2": even}] * 3  # a router around the threshold: silent
    steps = ([{"0": low0, "2": even}, {"0": low1, "2": even}, {"0": low1, "2": low0}] + flicker
             + [{"0": even, "2": even}] * RECOVERED_AFTER + [{"0": low0, "2": even}])
    printed = []
    for i, load in enumerate(steps, start=1):
        assert stats._check_collapse(load, i) == starved_experts(load)
        printed.append(capsys.readouterr().out)
    recovered_at = 3 + len(flicker) + RECOVERED_AFTER
    assert "at iteration 1: layer 0: experts [2, 3]" in printed[0] and printed[1] == ""
    assert "at iteration 3: layer 2: experts [2, 3]" in printed[2] and "layer 0" not in printed[2]
    assert all(out == "" for out in printed[3:recovered_at - 1])
    assert printed[recovered_at - 1].startswith(f"MoE routing recovered at iteration {recovered_at}")
    assert f"at iteration {recovered_at + 1}: layer 0: experts [2, 3]" in printed[recovered_at]
