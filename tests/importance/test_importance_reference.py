"""Scores from the hooks (TP1, in process) equal scores computed a second way: a plain-torch forward
of the checkpoint's global weights (tests/importance/reference.py) that keeps every activation."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_minitron.config import preset
from megatron_minitron.importance import stats
from megatron_minitron.importance.calibration import micro_batches
from megatron_minitron.importance.run import ImportanceConfig, collect, forward_passes, layers_removed
from megatron_minitron.importance.scores import ScoresManifest, Scores
from tests.importance import reference

SEQ, SAMPLES, MBS = 24, 6, 4
ARCHS = {
    "swiglu_rmsnorm_rope_gqa": preset("tiny"),
    "gelu_layernorm_bias_learned": preset("tiny").replace(
        normalization="LayerNorm", activation="gelu", position_embedding_type="learned_absolute",
        add_bias_linear=True, num_query_groups=None, untie_embeddings_and_output_weights=False,
        apply_layernorm_1p=True),
    # Qwen3-style per-head QK norms: they are no hook point and leave every score's definition unchanged
    "qk_layernorm_head_dim": preset("tiny").replace(qk_layernorm=True, kv_channels=24),
}


def _samples(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(SAMPLES):
        tokens = torch.randint(0, arch.vocab_size, (SEQ + 1,), generator=g)
        out.append({"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(SEQ),
                    "position_ids": torch.arange(SEQ)})
    return out


@pytest.fixture(scope="module", params=list(ARCHS))
def scored(request, single_rank_runtime, tmp_path_factory):
    """(arch, hook scores, reference activations) for a randomly initialised model, saved and read back."""
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.model.build import build_model
    from megatron_minitron.runtime import set_seed

    arch, rt = ARCHS[request.param], single_rank_runtime
    set_seed(3)
    model = build_model(arch, rt)
    with torch.no_grad():  # non-trivial norm weights and biases, so a wrong formula cannot pass
        for name, param in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.3)
    root = tmp_path_factory.mktemp(request.param)
    ckpt.save_checkpoint(root, model=model, arch=arch, runtime=rt, iteration=None)
    data = _samples(arch)
    cfg = ImportanceConfig(micro_batch_size=MBS, ffn_source="pre", hidden_final_norm=True, lm_loss=True)
    tensors, loss = collect(model, rt, arch, lambda: micro_batches(data, SAMPLES, micro_batch_size=MBS, dp_rank=0,
                                                                     dp_size=1),
                            SAMPLES, SEQ, cfg, use_te=False, log=lambda _: None)
    weights = ckpt.read_tensors(ckpt.resolve(root).path)
    tokens = torch.stack([d["tokens"] for d in data])
    ref = reference.forward(weights, arch, tokens)
    return arch, tensors, loss, ref, model, data, weights


def _seq_first(t):  # reference activations are [b, s, c]; the statistics take [s, b, c]
    return t.transpose(0, 1)


def test_reference_forward_matches_megatron(scored, single_rank_runtime):
    from megatron_minitron.model.forward import forward_logits

    arch, _, loss, ref, model, data, _ = scored
    tokens = torch.stack([d["tokens"] for d in data])
    logits = forward_logits(model, tokens, torch.arange(SEQ).expand(SAMPLES, SEQ), single_rank_runtime)
    torch.testing.assert_close(logits[..., :arch.vocab_size].double(), ref["logits"][..., :arch.vocab_size],
                               rtol=1e-4, atol=1e-4)
    labels = torch.stack([d["labels"] for d in data])
    expected = torch.nn.functional.cross_entropy(ref["logits"].reshape(-1, ref["logits"].shape[-1]), labels.reshape(-1))
    assert abs(loss - float(expected)) < 1e-4


@pytest.mark.parametrize("seq, batch", list(itertools.product(stats.AGGREGATIONS, stats.AGGREGATIONS)))
def test_hook_scores_equal_the_reference_for_every_aggregation(scored, seq, batch):
    arch, tensors, *_, ref = scored[:4]
    H, G, kv = arch.num_attention_heads, arch.query_groups, arch.head_dim
    head_act = torch.stack([a.reshape(SAMPLES, SEQ, H, kv).norm(dim=-1) for a in ref["attn_out"]])
    group_act = torch.stack([a.reshape(SAMPLES, SEQ, G, -1).norm(dim=-1) for a in ref["attn_out"]])
    expected = {
        "heads": torch.stack([stats.reference_scores(a, seq=seq, batch=batch) for a in head_act]),
        "query_groups": torch.stack([stats.reference_scores(a, seq=seq, batch=batch) for a in group_act]),
        "ffn": torch.stack([stats.reference_scores(a, seq=seq, batch=batch) for a in ref["fc2_in"]]),
        "hidden": sum(stats.reference_scores(a, seq=seq, batch=batch) for a in ref["norms"]),
    }
    pre = [stats.reference_scores(a, seq=seq, batch=batch) for a in ref["fc1_out"]]
    if arch.gated:
        expected["ffn_pre_gate"] = torch.stack([p[: arch.ffn_hidden_size] for p in pre])
        expected["ffn_pre_up"] = torch.stack([p[arch.ffn_hidden_size:] for p in pre])
    else:
        expected["ffn_pre"] = torch.stack(pre)
    scores = Scores(tensors=tensors, manifest=ScoresManifest(
        architecture=arch.explicit().to_json(), arch_fingerprint="x", checkpoint="x", iteration=0, data={},
        num_samples=SAMPLES, seq_length=SEQ, micro_batch_size=MBS, seed=0, hidden_final_norm=True,
        ffn_source="post"))
    got = scores.aggregated(seq=seq, batch=batch)
    mean_square = scores.aggregated(seq=seq, batch="l2")
    for key, value in expected.items():
        scale = value.abs().max()
        if batch == "var":
            # a variance over samples is E[s^2] - E[s]^2: the fp32 forward's rounding of s shows up
            # relative to E[s^2], not to the (much smaller) variance itself
            scale = mean_square[key].double().square().max() / SAMPLES
        assert float((got[key].double() - value.double()).abs().max() / scale) < 2e-5, key


def test_block_importance_equals_the_reference(scored):
    _, tensors, _, ref = scored[:4]
    cos = [torch.nn.functional.cosine_similarity(a, b, dim=-1).mean() for a, b in zip(ref["layer_in"],
                                                                                       ref["layer_out"])]
    torch.testing.assert_close(tensors["layers_bi"].double(), 1 - torch.stack(cos), rtol=1e-5, atol=1e-6)


def test_removing_a_layer_equals_a_model_built_without_it(scored, single_rank_runtime):
    """LM loss with layer 1 removed by the pass-through hook == a 3-layer model holding layers 0, 2, 3."""
    from megatron_minitron.model.build import build_model

    arch, tensors, _, _, model, data, _ = scored
    smaller = build_model(arch.replace(num_layers=arch.num_layers - 1), single_rank_runtime)
    keep = [0, 2, 3]
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("decoder.layers."):
            parts = key.split(".")
            if int(parts[2]) == 1:
                continue
            parts[2] = str(keep.index(int(parts[2])))
            key = ".".join(parts)
        state[key] = value
    smaller.load_state_dict(state, strict=False)

    def loss_of(m, removed=()):
        batches = micro_batches(data, SAMPLES, micro_batch_size=MBS, dp_rank=0, dp_size=1)
        with layers_removed(m, set(removed)):
            total, count = forward_passes(m, single_rank_runtime, batches, [4, 2], SEQ)
        return total / count

    without = loss_of(model, removed=[1])
    assert abs(without - loss_of(smaller)) < 1e-5
    assert abs(without - float(tensors["layers_lm_loss"][1])) < 1e-5
    assert abs(without - loss_of(model)) > 1e-4  # and the hook really removed something
