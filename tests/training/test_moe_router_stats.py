"""Router statistics of MoE training (one process): the auxiliary loss and expert load that train_step
reports equal what plain torch computes from the routers' inputs and weights, and the aux loss reaches
the router's gradient."""

from __future__ import annotations

import pytest
import torch

from megatron_minitron.config import preset
from megatron_minitron.model.build import unwrap
from megatron_minitron.runtime import set_seed
from megatron_minitron.training.loop import TrainConfig, build_trainer, lm_task, train_step
from tests.multirank import synthetic

ARCH = preset("tiny-moe", moe_layer_freq=(1, 0, 1, 1))
SEQ, MBS, GBS = 16, 2, 6  # three micro-batches


def _trainer(runtime, coeff: float):
    set_seed(4)
    cfg = TrainConfig(train_iters=3, micro_batch_size=MBS, global_batch_size=GBS, seq_length=SEQ,
                      lr_warmup_iters=0, lr=1e-3, moe_aux_loss_coeff=coeff, clip_grad=0.0)
    return build_trainer(ARCH, runtime, cfg)


def _batches():
    return synthetic.batches(0, micro_batch_size=MBS, dp_rank=0, dp_size=1, seq_length=SEQ, vocab=ARCH.vocab_size)


def _routers(trainer):
    return {r.layer_number - 1: r for r in unwrap(trainer.model[0]).modules() if type(r).__name__ == "TopKRouter"}


def _switch_loss(hidden: torch.Tensor, weight: torch.Tensor, topk: int):
    """Switch Transformer load-balancing loss of one micro-batch, from scratch: E * sum_i f_i * P_i with
    f_i the share of the T*k routed slots expert i got and P_i its mean softmax probability."""
    logits = hidden.reshape(-1, hidden.shape[-1]).double() @ weight.double().t()
    scores = torch.softmax(logits, dim=-1)
    chosen = torch.topk(logits, topk, dim=-1).indices
    counts = torch.zeros(weight.shape[0], dtype=torch.float64).index_add_(0, chosen.reshape(-1),
                                                                          torch.ones(chosen.numel(), dtype=torch.float64))
    f = counts / (logits.shape[0] * topk)
    return weight.shape[0] * (f * scores.mean(dim=0)).sum(), counts


def test_reported_aux_loss_and_expert_load_match_plain_torch(single_rank_runtime):
    coeff = 0.1
    trainer = _trainer(single_rank_runtime, coeff)
    seen: dict[int, list] = {}
    for layer, router in _routers(trainer).items():
        router.register_forward_hook(lambda m, args, out, layer=layer: seen.setdefault(layer, []).append(
            (args[0].detach().clone(), m.weight.detach().clone())))
    out = train_step(trainer, lm_task(single_rank_runtime.device), _batches())
    assert sorted(seen) == [0, 2, 3] and all(len(v) == 3 for v in seen.values())
    losses, loads = {}, {}
    for layer, calls in seen.items():
        per_mb = [_switch_loss(h, w, ARCH.moe_router_topk) for h, w in calls]
        losses[layer] = torch.stack([loss for loss, _ in per_mb]).mean()
        counts = sum(c for _, c in per_mb)
        loads[layer] = counts / counts.sum()
    expected_aux = coeff * sum(losses.values())
    assert out["moe aux loss"] == pytest.approx(float(expected_aux), rel=1e-5)
    assert out["moe load-balancing loss"] == pytest.approx(float(expected_aux / coeff / 3), rel=1e-5)
    assert sorted(out["moe expert load"]) == ["0", "2", "3"]
    for layer, load in loads.items():
        assert out["moe expert load"][str(layer)] == pytest.approx(load.tolist(), abs=1e-6)
    assert out["moe load imbalance"] == pytest.approx(float(max(v.max() for v in loads.values()) * 4), rel=1e-5)


def test_aux_loss_reaches_the_router_gradient(single_rank_runtime):
    """Gradient of the last router's weight with the aux loss minus without it equals the gradient of
    coeff * sum over micro-batches of (tokens of the micro-batch / tokens of the step) * loss, taken in
    plain torch (megatron scales the aux loss by the micro-batch's tokens under per-token loss). The
    last MoE layer, because an earlier router also receives later layers' aux-loss gradients through
    the hidden states its experts produce."""
    grads = {}
    for coeff in (0.0, 0.5):
        trainer = _trainer(single_rank_runtime, coeff)
        seen: dict[int, list] = {}
        for layer, router in _routers(trainer).items():
            router.register_forward_hook(lambda m, args, out, layer=layer: seen.setdefault(layer, []).append(
                args[0].detach().clone()))
        weights = {layer: r.weight.detach().clone() for layer, r in _routers(trainer).items()}
        train_step(trainer, lm_task(single_rank_runtime.device), _batches())
        grads[coeff] = {layer: r.weight.main_grad.clone() if hasattr(r.weight, "main_grad") else r.weight.grad.clone()
                        for layer, r in _routers(trainer).items()}
    layer = max(weights)
    for weight in [weights[layer]]:
        w = weight.double().requires_grad_(True)
        total = sum(_switch_loss(h, w, ARCH.moe_router_topk)[0] for h in seen[layer]) / 3
        (g,) = torch.autograd.grad(0.5 * total, w)
        diff = (grads[0.5][layer] - grads[0.0][layer]).double()
        torch.testing.assert_close(diff, g, rtol=1e-4, atol=1e-7)
