"""Mixture-of-Experts importance (TP1, in process) against an independent reference: the plain-torch
forward of tests/importance/reference.py recomputes the routing (top-k, softmax) and every expert from
the checkpoint's global weights, and the scores follow from its stored activations by definition."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_minitron.config import preset
from megatron_minitron.importance import stats
from megatron_minitron.importance.calibration import micro_batches
from megatron_minitron.importance.run import ImportanceConfig, collect
from megatron_minitron.importance.scores import Scores, ScoresManifest
from tests.importance import reference

SEQ, SAMPLES, MBS = 24, 6, 4
# a dense first layer, three MoE layers with 4 experts (top-2, softmax over the top-k) and a shared expert
ARCH = preset("tiny-moe", moe_layer_freq=(0, 1, 1, 1), moe_shared_expert_ffn_hidden_size=32)
MOE = torch.tensor(ARCH.moe_layers)


def _samples(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(SAMPLES):
        tokens = torch.randint(0, arch.vocab_size, (SEQ + 1,), generator=g)
        out.append({"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(SEQ),
                    "position_ids": torch.arange(SEQ)})
    return out


def _collect(model, rt, data, **cfg):
    cfg = ImportanceConfig(micro_batch_size=MBS, hidden_final_norm=True, **cfg)
    return collect(model, rt, ARCH, lambda: micro_batches(data, SAMPLES, micro_batch_size=MBS, dp_rank=0, dp_size=1),
                   SAMPLES, SEQ, cfg, use_te=False, log=lambda _: None)


@pytest.fixture(scope="module")
def scored(single_rank_runtime, tmp_path_factory):
    """(hook scores with router weighting, with plain weighting, the LM loss, reference activations,
    model, data, weights) for a randomly initialised MoE model, saved and read back."""
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.model.build import build_model
    from megatron_minitron.runtime import set_seed

    rt = single_rank_runtime
    set_seed(5)
    model = build_model(ARCH, rt, moe_dispatcher="allgather")
    with torch.no_grad():  # non-trivial norm weights and a sharper router, so a wrong formula cannot pass
        for name, param in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
            elif "router" in name:
                param.mul_(20)
    root = tmp_path_factory.mktemp("moe")
    ckpt.save_checkpoint(root, model=model, arch=ARCH, runtime=rt, iteration=None)
    data = _samples(ARCH)
    routed, loss = _collect(model, rt, data, lm_loss=True)
    plain, _ = _collect(model, rt, data, expert_weighting="plain")
    weights = ckpt.read_tensors(ckpt.resolve(root).path)
    ref = reference.forward(weights, ARCH, torch.stack([d["tokens"] for d in data]))
    return routed, plain, loss, ref, model, data, weights


def test_reference_forward_matches_megatron(scored, single_rank_runtime):
    """The reference's routing and experts are megatron's: same logits, same LM loss."""
    from megatron_minitron.model.forward import forward_logits

    _, _, loss, ref, model, data, _ = scored
    tokens = torch.stack([d["tokens"] for d in data])
    logits = forward_logits(model, tokens, torch.arange(SEQ).expand(SAMPLES, SEQ), single_rank_runtime)
    V = ARCH.vocab_size
    torch.testing.assert_close(logits[..., :V].double(), ref["logits"][..., :V], rtol=1e-4, atol=1e-4)
    labels = torch.stack([d["labels"] for d in data])
    expected = torch.nn.functional.cross_entropy(ref["logits"].reshape(-1, ref["logits"].shape[-1]), labels.reshape(-1))
    assert abs(loss - float(expected)) < 1e-4
    # the router is sharp enough that the top-k choice differs between tokens (every expert is used)
    assert (ref["router_probs"][0] > 0).flatten(0, 1).any(0).all()


def _scores(tensors) -> Scores:
    return Scores(tensors=tensors, manifest=ScoresManifest(
        architecture=ARCH.explicit().to_json(), arch_fingerprint="x", checkpoint="x", iteration=0, data={},
        num_samples=SAMPLES, seq_length=SEQ, micro_batch_size=MBS, seed=0, hidden_final_norm=True))


def _expected(ref, seq, batch, *, plain: bool) -> dict[str, torch.Tensor]:
    """Reference scores [L, ...] with NaN rows where a layer lacks that MLP."""
    def score(a):  # a [samples, seq, channels]
        return stats.reference_scores(a, seq=seq, batch=batch).double()

    def rows(per_moe_layer, shape):
        out = torch.full((ARCH.num_layers, *shape), float("nan"), dtype=torch.float64)
        out[MOE] = torch.stack(per_moe_layer)
        return out

    E, Fe = ARCH.num_experts, ARCH.expert_ffn_hidden_size
    acts, norms = ref["expert_act"], ref["expert_out_norm"]
    if plain:  # without the routing probability (still 0 where a token is not routed to the expert)
        div = [p.permute(2, 0, 1).where(p.permute(2, 0, 1) > 0, torch.ones(())) for p in ref["router_probs"]]
        acts = [a / d[..., None] for a, d in zip(acts, div)]
        norms = [n / d for n, d in zip(norms, div)]
    ffn = torch.full((ARCH.num_layers, ARCH.ffn_hidden_size), float("nan"), dtype=torch.float64)
    ffn[~MOE] = torch.stack([score(a) for a, moe in zip(ref["fc2_in"], ARCH.moe_layers) if not moe])
    return {
        "experts": rows([torch.cat([score(n[e][..., None]) for e in range(E)]) for n in norms], (E,)),
        "expert_ffn": rows([torch.stack([score(a[e]) for e in range(E)]) for a in acts], (E, Fe)),
        "shared_ffn": rows([score(a) for a in ref["shared_act"]], (32,)),
        "ffn": ffn,
        "hidden": sum(score(a) for a in ref["norms"]),
    }


def _relative(got, expected, scale) -> float:
    assert torch.equal(got.isnan(), expected.isnan())
    return float((got.double() - expected).nan_to_num().abs().max() / scale)


@pytest.mark.parametrize("seq, batch", list(itertools.product(stats.AGGREGATIONS, stats.AGGREGATIONS)))
@pytest.mark.parametrize("weighting", ["router", "plain"])
def test_expert_scores_equal_the_reference(scored, seq, batch, weighting):
    tensors = scored[0] if weighting == "router" else scored[1]
    expected = _expected(scored[3], seq, batch, plain=weighting == "plain")
    got, mean_square = _scores(tensors).aggregated(seq=seq, batch=batch), _scores(tensors).aggregated(seq=seq, batch="l2")
    for key, value in expected.items():
        scale = value.nan_to_num().abs().max()
        if batch == "var":  # E[s^2] - E[s]^2: rounding shows relative to E[s^2] (as for dense scores)
            scale = mean_square[key].double().nan_to_num().square().max() / SAMPLES
        assert _relative(got[key], value, scale) < 1e-5, (key, _relative(got[key], value, scale))


def test_router_mass_equals_the_reference(scored):
    routed, plain, _, ref = scored[:4]
    expected = torch.full((ARCH.num_layers, ARCH.num_experts), float("nan"), dtype=torch.float64)
    expected[MOE] = torch.stack([p.mean((0, 1)) for p in ref["router_probs"]])
    assert _relative(routed["experts_router_mass"], expected, 1.0) < 1e-6
    torch.testing.assert_close(plain["experts_router_mass"], routed["experts_router_mass"], equal_nan=True)
    # the two weightings differ where they should (and only there)
    assert not torch.allclose(plain["experts"][MOE], routed["experts"][MOE])
    torch.testing.assert_close(plain["hidden"], routed["hidden"])


def test_layer_scores_of_moe_layers_equal_the_reference(scored, single_rank_runtime):
    routed, _, _, ref, _, data, weights = scored
    cos = [torch.nn.functional.cosine_similarity(a, b, dim=-1).mean() for a, b in zip(ref["layer_in"],
                                                                                       ref["layer_out"])]
    torch.testing.assert_close(routed["layers_bi"].double(), 1 - torch.stack(cos), rtol=1e-5, atol=1e-6)
    tokens, labels = torch.stack([d["tokens"] for d in data]), torch.stack([d["labels"] for d in data])
    for layer in range(ARCH.num_layers):  # the LM loss of the model built without each layer, MoE ones too
        logits = reference.forward(weights, ARCH, tokens, skip=(layer,))["logits"]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        assert abs(float(routed["layers_lm_loss"][layer]) - float(expected)) < 1e-4, layer


def test_hidden_scores_count_the_pre_mlp_norm_of_moe_layers(scored, single_rank_runtime):
    """Scaling layer 2's pre-MLP norm (a MoE layer) changes its row of the hidden statistics, and
    nothing before it: the hook is on that norm."""
    routed, _, _, _, model, data, _ = scored
    from megatron_minitron.model.build import unwrap

    norm = unwrap(model).decoder.layers[2].pre_mlp_layernorm.weight
    saved = norm.detach().clone()
    try:
        with torch.no_grad():
            norm.mul_(torch.linspace(0.5, 2.0, norm.numel()))
        changed, _ = _collect(model, single_rank_runtime, data)
    finally:
        with torch.no_grad():
            norm.copy_(saved)
    before, after = routed["raw.hidden"], changed["raw.hidden"]
    torch.testing.assert_close(after[:5], before[:5])
    assert (after[5] - before[5]).abs().max() > 1e-3 * before[5].abs().max()
    assert not torch.allclose(changed["hidden"], routed["hidden"])


def test_the_scores_directory_holds_the_moe_keys(scored, tmp_path):
    from megatron_minitron.importance.scores import load_scores, save_scores

    routed = scored[0]
    manifest = ScoresManifest(architecture=ARCH.explicit().to_json(), arch_fingerprint=ARCH.explicit().fingerprint(),
                              checkpoint="x", iteration=0, data={}, num_samples=SAMPLES, seq_length=SEQ,
                              micro_batch_size=MBS, seed=0, expert_weighting="plain")
    back = load_scores(save_scores(Scores(tensors=routed, manifest=manifest), tmp_path / "scores"))
    assert back.manifest.expert_weighting == "plain"
    assert back["experts"].shape == (4, 4) and back["expert_ffn"].shape == (4, 4, 64)
    assert back["shared_ffn"].shape == (4, 32) and back["experts_router_mass"].shape == (4, 4)
    assert back["ffn"][1:].isnan().all() and back["ffn"][0].isfinite().all()
    assert back["experts"][0].isnan().all() and back["experts"][1:].isfinite().all()
    assert "experts" in back.summary()


def test_importance_builds_the_all_gather_dispatcher_on_every_backend():
    """Its hooks read that dispatcher's token order, so on NCCL too it overrides the all-to-all default."""
    from megatron_minitron.model.build import transformer_config
    from megatron_minitron.runtime import ParallelConfig

    assert transformer_config(ARCH, ParallelConfig(), backend="nccl").moe_token_dispatcher_type == "alltoall"
    assert transformer_config(ARCH, ParallelConfig(), backend="nccl",
                              moe_dispatcher="allgather").moe_token_dispatcher_type == "allgather"


def test_hooks_on_one_thread_give_the_same_statistics_and_restore_the_threads(scored, single_rank_runtime):
    """Collector(hook_threads=1) runs the hooks' operations on one intra-op thread and the forward pass
    on its own count (restored after every hook): the statistics equal those of the default collector."""
    from megatron_minitron.importance.hooks import Collector
    from megatron_minitron.importance.run import forward_passes

    model, data, rt = scored[4], scored[5], single_rank_runtime
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        raw, seen = [], []
        for hook_threads in (None, 1):
            collector = Collector(model, rt, ARCH, seq_length=SEQ, hook_threads=hook_threads)
            with collector.attached():
                forward_passes(model, rt, micro_batches(data, SAMPLES, micro_batch_size=MBS, dp_rank=0, dp_size=1),
                               [MBS, SAMPLES - MBS], SEQ)
            seen.append(torch.get_num_threads())
            raw.append(collector.reduce())
    finally:
        torch.set_num_threads(threads)
    assert seen == [2, 2]
    assert raw[0].keys() == raw[1].keys()
    for key in raw[0]:
        torch.testing.assert_close(raw[1][key], raw[0][key], rtol=1e-6, atol=1e-9, equal_nan=True, msg=key)
    with pytest.raises(ValueError, match="hook_threads"):
        Collector(model, rt, ARCH, seq_length=SEQ, hook_threads=0)
