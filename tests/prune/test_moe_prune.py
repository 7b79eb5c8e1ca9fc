"""Pruning Mixture-of-Experts checkpoints (one process): experts the router never picks on some tokens
can go without changing those tokens' logits (exactly: the router renormalises the top-k); removing a
picked one changes them; every stored tensor equals an independent slicing; bad inputs are refused."""

from __future__ import annotations

import pytest
import torch

from megatron_minitron.config import preset
from megatron_minitron.model import checkpoint as ckpt
from megatron_minitron.plan import Plan, Target, random_plan
from megatron_minitron.prune.rewrite import prune_checkpoint
from tests.prune.moe_reference import sliced

# 2 MoE layers of 8 experts, top-2, softmax over the top-2 logits (renormalised, as Mixtral / Qwen3-MoE).
ROUTED = preset("tiny-moe", num_layers=2, num_experts=8, moe_ffn_hidden_size=32)
TOKENS = torch.tensor([[11, 402, 77]])  # 3 tokens: at most 6 of the 8 experts picked per layer
MIXED = preset("tiny-moe", moe_layer_freq=(0, 1, 1, 1), moe_shared_expert_ffn_hidden_size=32)


def _save(arch, runtime, path, seed: int):
    from megatron_minitron.model.build import build_model

    torch.manual_seed(seed)
    model = build_model(arch, runtime)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # unit norms and small weights would hide slicing mistakes
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    ckpt.save_checkpoint(path, model=model, arch=arch, runtime=runtime, iteration=1)
    return model


def _logits(info, runtime, hook=None):
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.forward import forward_logits

    model = build_model(info.arch, runtime)
    ckpt.load_checkpoint(info, model=model)
    handles = [] if hook is None else [layer.mlp.router.register_forward_hook(hook(i))
                                       for i, layer in enumerate(model.decoder.layers)]
    logits = forward_logits(model, TOKENS, torch.arange(TOKENS.shape[1])[None], runtime)
    for handle in handles:
        handle.remove()
    return logits


def _expert_plan(arch, keep: list[list[int]]) -> Plan:
    """Keep these experts per layer, everything else whole."""
    base = random_plan(arch, Target(num_experts=len(keep[0])), seed=0)
    width = arch.expert_ffn_hidden_size
    return Plan(**{**{f: getattr(base, f) for f in ("source", "target", "layers", "hidden", "ffn", "query_groups",
                                                      "heads", "shared_ffn", "params_before", "params_after",
                                                      "active_params_before", "active_params_after")},
                   "experts": keep, "expert_ffn": [[range(width)] * len(k) for k in keep]}).validate()


def test_unused_experts_go_without_changing_the_logits(single_rank_runtime, tmp_path):
    assert ROUTED.moe_topk_renormalized
    _save(ROUTED, single_rank_runtime, tmp_path / "src", seed=1)
    source = ckpt.resolve(tmp_path / "src")
    picked: dict[int, set[int]] = {}

    def hook(layer):  # the router returns (probs, routing_map [tokens, experts])
        return lambda module, args, output: picked.setdefault(layer, set()).update(
            output[1].any(0).nonzero().flatten().tolist())

    before = _logits(source, single_rank_runtime, hook)
    keep_n = max(len(v) for v in picked.values())
    assert keep_n < ROUTED.num_experts
    keep = [sorted(picked[i] | set(sorted(set(range(8)) - picked[i])[:keep_n - len(picked[i])])) for i in range(2)]
    prune_checkpoint(source.root, _expert_plan(ROUTED, keep), tmp_path / "unused", print_fn=lambda s: None)
    pruned = ckpt.resolve(tmp_path / "unused")
    assert pruned.arch.num_experts == keep_n and pruned.metadata["plan"]["experts"] == keep
    assert torch.equal(_logits(pruned, single_rank_runtime), before)

    used = sorted(picked[0])[0]  # now drop an expert layer 0 does pick
    keep[0] = sorted(set(range(8)) - {used})[:keep_n]
    prune_checkpoint(source.root, _expert_plan(ROUTED, keep), tmp_path / "used", print_fn=lambda s: None)
    changed = _logits(ckpt.resolve(tmp_path / "used"), single_rank_runtime)
    assert (changed - before).abs().max() > 1e-3


@pytest.mark.parametrize("arch, target", [
    (ROUTED, Target(num_experts=4, moe_ffn_hidden_size=16, hidden_size=48, num_layers=1)),
    (MIXED, Target(num_experts=2, moe_ffn_hidden_size=24, moe_shared_expert_ffn_hidden_size=16, ffn_hidden_size=96,
                   hidden_size=40, drop_layers=(2,))),
], ids=["stacked", "mixed"])
def test_every_tensor_equals_an_independent_slicing(single_rank_runtime, tmp_path, arch, target):
    _save(arch, single_rank_runtime, tmp_path / "src", seed=2)
    source = ckpt.resolve(tmp_path / "src")
    plan = random_plan(arch, target, seed=4)
    prune_checkpoint(source.root, plan, tmp_path / "out", workers=2, chunk_bytes=5000, print_fn=lambda s: None)
    got = ckpt.read_tensors(ckpt.resolve(tmp_path / "out").path)
    want = sliced(ckpt.read_tensors(source.path), plan)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    info = ckpt.resolve(tmp_path / "out")  # self-describing, and it loads
    assert info.arch == plan.target.explicit() and Plan.from_json(info.metadata["plan"]) == plan
    _logits(info, single_rank_runtime)


def test_dropping_every_dense_layer_of_a_mixed_stack_restacks_the_keys(single_rank_runtime, tmp_path):
    """megatron keys a stack mixing dense and MoE layers per layer and an all-MoE stack stacked: dropping the
    only dense layer must write stacked keys and layer-axis object names, or the model would not load."""
    from torch.distributed.checkpoint import FileSystemReader

    _save(MIXED, single_rank_runtime, tmp_path / "src", seed=3)
    plan = random_plan(MIXED, Target(drop_layers=(0,), num_experts=2, hidden_size=48), seed=2)
    assert plan.target.moe_layer_freq == 1
    prune_checkpoint(tmp_path / "src", plan, tmp_path / "out", workers=2, chunk_bytes=4000, print_fn=lambda s: None)
    info = ckpt.resolve(tmp_path / "out")
    got = ckpt.read_tensors(info.path)
    want = sliced(ckpt.read_tensors(ckpt.resolve(tmp_path / "src").path), plan)
    assert got.keys() == want.keys() and "decoder.layers.mlp.router.weight" in got
    assert all(torch.equal(got[k], want[k]) for k in want)
    names = set(FileSystemReader(str(info.path)).read_metadata().state_dict_metadata)
    assert "decoder.layers.mlp.experts.experts.linear_fc1._extra_state/shard_2.1_3.2" in names
    assert "decoder.layers.self_attention.linear_qkv._extra_state/shard_0_3" in names
    _logits(info, single_rank_runtime)  # megatron finds every key and object


def test_cli_prunes_experts_in_one_shot_and_refuses_bad_targets(single_rank_runtime, tmp_path, capsys):
    import dataclasses

    from megatron_minitron.cli import main
    from megatron_minitron.importance.scores import save_scores
    from megatron_minitron.model.integrity import fingerprint
    from megatron_minitron.plan import load_plan
    from tests.plan.conftest import scores_for
    from tests.plan.test_moe_plan import moe_scores

    _save(MIXED, single_rank_runtime, tmp_path / "src", seed=5)
    scores = moe_scores(MIXED.explicit(), seed=2)
    save_scores(dataclasses.replace(scores, manifest=dataclasses.replace(
        scores.manifest, checkpoint_fingerprint=fingerprint(ckpt.resolve(tmp_path / "src").path))), tmp_path / "scores")
    save_scores(scores_for(preset("tiny")), tmp_path / "dense_scores")
    base = ["prune", "--load", str(tmp_path / "src"), "--scores", str(tmp_path / "scores")]
    for extra, message in [
        (["--target-num-moe-experts", "1"], "fewer than the router's top-k (2 experts per token)"),
        (["--target-num-moe-experts", "3", "--ep", "2"], "not divisible by the expert-parallel size 2"),
        (["--target-moe-ffn-hidden-size", "33", "--tp", "2"], "tensor-parallel size 2 does not divide moe_ffn_hidden"),
        (["--target-hidden-size", "32", "--scores", str(tmp_path / "dense_scores")], "computed on a dense model"),
    ]:
        assert main(base + ["--save", str(tmp_path / "bad")] + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "bad").exists()
    assert main(base + ["--save", str(tmp_path / "out"), "--target-num-moe-experts", "2",
                        "--target-moe-ffn-hidden-size", "32", "--target-moe-shared-expert-intermediate-size", "16",
                        "--target-hidden-size", "48", "--tp", "2", "--ep", "2",
                        "--save-plan", str(tmp_path / "plan.json")]) == 0
    assert "active parameters" in capsys.readouterr().out
    info, plan = ckpt.resolve(tmp_path / "out"), load_plan(tmp_path / "plan.json")
    arch = info.arch
    assert (arch.num_experts, arch.moe_ffn_hidden_size, arch.moe_shared_expert_ffn_hidden_size) == (2, 32, 16)
    assert plan.experts[1] == tuple(sorted(torch.argsort(scores["experts"][1], descending=True)[:2].tolist()))
    got, want = ckpt.read_tensors(info.path), sliced(ckpt.read_tensors(ckpt.resolve(tmp_path / "src").path), plan)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_work_chunks_of_whole_experts_skip_pruned_ones():
    from megatron_minitron.prune.rewrite import _row_spans

    kept = torch.tensor([0, 1, 3, 6, 7])
    assert _row_spans(kept, 5, 100) == [(0, 5)]  # small rows: one read across the gaps
    assert _row_spans(kept, 5, 100, split_gaps=True) == [(0, 2), (2, 3), (3, 5)]  # no pruned expert read
    assert _row_spans(kept, 5, 1, split_gaps=True) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]


def test_identity_plan_rewrites_a_mixed_moe_checkpoint_bit_for_bit(single_rank_runtime, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_minitron.plan import identity_plan

    _save(MIXED, single_rank_runtime, tmp_path / "src", seed=6)
    prune_checkpoint(tmp_path / "src", identity_plan(MIXED), tmp_path / "out", chunk_bytes=3000,
                     print_fn=lambda s: None)
    paths = [ckpt.resolve(tmp_path / name).path for name in ("src", "out")]
    src, out = (ckpt.read_tensors(p) for p in paths)
    assert src.keys() == out.keys() and all(torch.equal(src[k], out[k]) for k in src)
    keys = [{k for k in FileSystemReader(str(p)).read_metadata().state_dict_metadata if not k.startswith("rng_state")}
            for p in paths]
    assert keys[0] == keys[1]  # every object too, expert extra states included
    assert "decoder.layers.3.mlp.experts.experts.linear_fc2._extra_state/shard_3_4" in keys[1]


def test_a_worker_reads_through_the_metadata_it_is_given(single_rank_runtime, tmp_path):
    """A worker uses the coordinator's DCP metadata (Job.metadata) instead of unpickling `.metadata` again:
    with that file damaged afterwards, the job writes the same bytes as one that read the intact file."""
    from megatron_minitron.model import storage
    from megatron_minitron.prune.rewrite import Job, plan_units, run_job

    _save(ROUTED, single_rank_runtime, tmp_path / "src", seed=7)
    plan = random_plan(ROUTED, Target(num_experts=4, moe_ffn_hidden_size=24), seed=1)
    path = ckpt.resolve(tmp_path / "src").path
    metadata = storage.read_dcp_metadata(path)
    units = tuple(plan_units(metadata, plan, None, 4096))
    written = []
    for name, given in (("read", None), ("given", metadata)):
        if given is not None:
            (path / ".metadata").write_bytes(b"damaged")
        (tmp_path / name).mkdir()
        records, sums = run_job(Job(source=str(path), partial=str(tmp_path / name), plan=plan, head_scores=None,
                                    units=units, worker=0, fsync=False, metadata=given))
        written.append(([(r.key, r.chunk_offsets, r.offset, r.length) for r in records], sums,
                        (tmp_path / name / "__0_0.distcp").read_bytes()))
    assert len(written[0][0]) == len(units) and written[0] == written[1]
