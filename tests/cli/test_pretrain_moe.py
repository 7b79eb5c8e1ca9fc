"""`minitron pretrain` of a Mixture-of-Experts model: end to end at DP2 x EP2 under torchrun (router
statistics in metrics.jsonl, a self-describing checkpoint), and its input errors before any process; the
trained checkpoint then scored by `importance` at EP2 and pruned by `prune` from those scores."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_minitron.cli import main
from megatron_minitron.config import preset
from tests.conftest import torchrun


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_cache):
    save = tmp_path_factory.mktemp("pretrain-moe") / "run"
    output = torchrun("-m", "megatron_minitron", "pretrain", "--arch", "tiny-moe", "--ep", "2", "--save", save,
                      "--cache-dir", data_cache, "--train-iters", "30", "--seq-length", "64", "--micro-batch-size",
                      "4", "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "3", "--eval-interval",
                      "30", "--eval-iters", "1", "--log-interval", "10", "--moe-aux-loss-coeff", "0.02",
                      nproc=2, timeout=900)
    return save, output


def test_moe_model_trains_and_logs_router_statistics(run_dir):
    save, output = run_dir
    assert "token dispatcher 'allgather' (gloo)" in output and "EP=2" in output
    train = [r for r in map(json.loads, (save / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert len(train) == 30
    first = sum(r["lm loss"] for r in train[:5]) / 5
    last = sum(r["lm loss"] for r in train[-5:]) / 5
    assert last < first - 0.5, f"training loss fell only from {first:.3f} to {last:.3f}"
    for r in train:
        # aux loss = coefficient x sum over the 4 MoE layers; the logged load-balancing loss is their mean
        assert r["moe aux loss"] == pytest.approx(0.02 * 4 * r["moe load-balancing loss"], rel=1e-9)
        assert r["moe load-balancing loss"] > 0
        assert sorted(r["moe expert load"]) == ["0", "1", "2", "3"]
        assert all(sum(load) == pytest.approx(1.0, abs=1e-5) and len(load) == 4 for load in r["moe expert load"].values())
        assert 1.0 <= r["moe load imbalance"] <= 4.0


def test_checkpoint_describes_the_experts_and_its_layout(run_dir, capsys):
    from megatron_minitron.model.checkpoint import resolve

    save, _ = run_dir
    info = resolve(save)
    assert info.arch.num_experts == 4 and info.arch.moe_router_topk == 2
    assert info.metadata["saved_with"]["expert_parallel"] == 2
    assert info.metadata["num_active_parameters"] == info.arch.num_active_parameters()
    assert main(["inspect", str(save)]) == 0
    assert f"active per token: {info.arch.num_active_parameters():,} (4 experts, top-2)" in capsys.readouterr().out


@pytest.mark.parametrize("arch, argv, message", [
    ("tiny", ["--ep", "2"], "expert-parallel size 2 needs a Mixture-of-Experts model"),
    ("tiny-moe", ["--ep", "3"], "expert-parallel size 3 does not divide num_experts=4"),
    ("tiny-moe", ["--ep", "2"], "expert-parallel size 2 does not divide the data-parallel size 1"),
    ("tiny-moe", ["--tp", "2"], "needs sequence parallelism (megatron-core requires it for MoE layers): add "
                                "--sequence-parallel"),
    ("tiny-moe", ["--moe-aux-loss-coeff", "-1"], "argument --moe-aux-loss-coeff: must be >= 0, got -1"),
])
def test_bad_moe_input_fails_fast_with_a_clear_error(tmp_path, capsys, arch, argv, message):
    try:
        assert main(["pretrain", "--arch", arch, "--save", str(tmp_path / "new"), *argv]) == 2
    except SystemExit as refused:  # a number out of range is refused while the flags are parsed
        assert refused.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_arch_file_with_more_experts_per_token_than_experts(tmp_path, capsys):
    arch = preset("tiny-moe").to_json() | {"moe_router_topk": 5}
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    assert main(["pretrain", "--arch", str(tmp_path / "arch.json"), "--save", str(tmp_path / "new")]) == 2
    assert "moe_router_topk=5 is larger than num_experts=4" in capsys.readouterr().err


def test_evaluate_at_ep1_gives_the_validation_loss_of_training_at_ep2(run_dir, data_cache, tmp_path):
    """The checkpoint written at DP2 x EP2 evaluated in one process (EP1) on the same validation batch."""
    save, _ = run_dir
    valid = [r for r in map(json.loads, (save / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "valid"]
    torchrun("-m", "megatron_minitron", "evaluate", "--load", save, "--cache-dir", data_cache, "--seq-length", "64",
             "--micro-batch-size", "4", "--global-batch-size", "8", "--eval-iters", "1", "--out",
             tmp_path / "eval.json", nproc=1, timeout=600)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["val lm loss"] == pytest.approx(valid[-1]["val lm loss"], rel=1e-6)


@pytest.fixture(scope="module")
def moe_scores(run_dir, data_cache, tmp_path_factory):
    """`minitron importance` on the checkpoint trained at EP2, at DP2 x EP2 under torchrun."""
    save, _ = run_dir
    out = tmp_path_factory.mktemp("moe-scores") / "scores"
    output = torchrun("-m", "megatron_minitron", "importance", "--load", save, "--out", out, "--ep",
                      "2", "--cache-dir", data_cache, "--num-samples", "8", "--seq-length", "64",
                      "--micro-batch-size", "2", "--expert-weighting", "plain", "--lm-loss", nproc=2, timeout=600)
    return out, output


def test_importance_scores_the_moe_checkpoint_at_ep2(moe_scores):
    """The scores directory holds the expert keys, and the trained router uses its experts unevenly."""
    from megatron_minitron.importance.scores import load_scores

    path, output = moe_scores
    scores = load_scores(path)
    assert scores.manifest.expert_weighting == "plain" and scores.manifest.layout["ep"] == 2
    assert scores["experts"].shape == (4, 4) and scores["expert_ffn"].shape == (4, 4, 64) and "ffn" not in scores
    torch.testing.assert_close(scores["experts_router_mass"].sum(-1), torch.ones(4))
    assert scores["layers_lm_loss"].isfinite().all() and "experts" in output


def test_the_scores_prune_the_moe_checkpoint(run_dir, moe_scores, tmp_path):
    """Each layer keeps its two highest-scored experts."""
    from megatron_minitron.importance.scores import load_scores
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.plan import load_plan

    (save, _), (path, _) = run_dir, moe_scores
    assert main(["prune", "--load", str(save), "--scores", str(path), "--save", str(tmp_path / "pruned"),
                 "--target-num-moe-experts", "2", "--target-moe-ffn-hidden-size", "32",
                 "--save-plan", str(tmp_path / "plan.json")]) == 0
    plan = load_plan(tmp_path / "plan.json")
    assert ckpt.resolve(tmp_path / "pruned").arch.num_experts == 2
    assert list(plan.experts) == [tuple(sorted(torch.argsort(row, descending=True)[:2].tolist()))
                                  for row in load_scores(path)["experts"]]


def test_search_prunes_and_distills_moe_candidates(run_dir, moe_scores, data_cache, tmp_path):
    """`minitron search` on the MoE checkpoint: candidates that differ in expert width (2 experts each), each
    pruned from the scores and distilled from the MoE teacher, ranked by validation loss; the winner's plan keeps
    each layer's two best-scored experts. (The 30-step teacher is too weak for 10 steps of distillation to
    move a student measurably; that distillation helps is tested on dense and MoE models elsewhere.)"""
    import subprocess
    import sys

    from tests.conftest import REPO, child_env

    from megatron_minitron.model import checkpoint as ckpt

    (save, _), (path, _) = run_dir, moe_scores
    arch = ckpt.resolve(save).arch
    params = {w: arch.replace(num_experts=2, moe_ffn_hidden_size=w).num_parameters() for w in (64, 32)}
    cmd = [sys.executable, "-m", "megatron_minitron", "search", "--load", str(save), "--scores", str(path),
           "--out", str(tmp_path / "search"), "--cache-dir", str(data_cache), "--experts", "2", "--expert-ffn", "64",
           "32", "--budget", str(sum(params.values()) // 2), "--tolerance", "0.15", "--train-iters", "10", "--seq-length", "64",
           "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "5e-3", "--lr-warmup-iters", "1",
           "--eval-interval", "10", "--eval-iters", "2", "--log-interval", "3"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "search" / "search.json").read_text())
    assert {c["name"]: c["params"] for c in result["candidates"]} == {
        f"L4-h64-f192-H4-G2-E2-e{w}": count for w, count in params.items()}
    losses = {c["name"]: c["val_lm_loss"] for c in result["candidates"]}
    assert result["ranking"] == sorted(losses, key=losses.get) and result["winner"] == result["ranking"][0]
    from megatron_minitron.importance.scores import load_scores
    from megatron_minitron.plan import load_plan

    plan = load_plan(tmp_path / "search" / "best_plan.json")
    assert plan.target.num_experts == 2
    assert list(plan.experts) == [tuple(sorted(torch.argsort(row, descending=True)[:2].tolist()))
                                  for row in load_scores(path)["experts"]]


def test_moe_importance_bad_input_is_refused_by_name(run_dir, tmp_path, capsys):
    from megatron_minitron.importance.run import ImportanceConfig

    save, _ = run_dir
    with pytest.raises(SystemExit):
        main(["importance", "--load", str(save), "--out", str(tmp_path / "s"), "--expert-weighting", "sum"])
    assert "argument --expert-weighting: invalid choice: 'sum'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--expert-weighting 'sum': choose one of router, plain"):
        ImportanceConfig(expert_weighting="sum").validate(4)
    cfg = ImportanceConfig(micro_batch_size=2, lm_loss=True, lm_loss_samples=6)
    with pytest.raises(ValueError, match=r"--num-samples 10 is not a multiple of --micro-batch-size x data-parallel "
                                         r"size = 2 x 4; at --ep 2 .* \(use 8\)"):
        cfg.check_expert_parallel(10, data_parallel=4, expert_parallel=2)
    with pytest.raises(ValueError, match="--lm-loss-samples 6 is not a multiple"):
        cfg.check_expert_parallel(16, data_parallel=4, expert_parallel=2)
    cfg.check_expert_parallel(10, data_parallel=4, expert_parallel=1)  # without EP any count runs
    assert not (tmp_path / "s").exists()


def test_trained_moe_exports_as_mixtral(run_dir, tmp_path, capsys):
    """A MoE model trained here (no QK norm, every layer MoE, renormalised top-2) exports as Mixtral: the
    config carries the experts and each expert's w1/w3/w2 is its slice of the stacked checkpoint tensors."""
    from safetensors.torch import load_file

    from megatron_minitron.model import checkpoint as ckpt

    save, _ = run_dir
    assert main(["export-hf", "--load", str(save), "--save", str(tmp_path / "llama"), "--family", "llama"]) == 2
    assert "a llama model has no experts; this checkpoint has num_experts=4" in capsys.readouterr().err
    assert not (tmp_path / "llama").exists()
    assert main(["export-hf", "--load", str(save), "--save", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"], config["num_experts_per_tok"],
            config["intermediate_size"]) == ("mixtral", 4, 2, 64)
    exported = {}
    for path in (tmp_path / "hf").glob("*.safetensors"):
        exported.update(load_file(str(path)))
    stored = ckpt.read_tensors(ckpt.resolve(save).path)
    fc1 = stored["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    assert torch.equal(exported["model.layers.2.block_sparse_moe.experts.1.w1.weight"], fc1[2, 1, :64])
    assert torch.equal(exported["model.layers.2.block_sparse_moe.experts.1.w3.weight"], fc1[2, 1, 64:])
    assert torch.equal(exported["model.layers.3.block_sparse_moe.experts.3.w2.weight"],
                       stored["decoder.layers.mlp.experts.experts.linear_fc2.weight"][3, 3])
    assert torch.equal(exported["model.layers.0.block_sparse_moe.gate.weight"],
                       stored["decoder.layers.mlp.router.weight"][0])
