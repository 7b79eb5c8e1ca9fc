"""Pruned and distilled students exported to Hugging Face: transformers gives the logits megatron gives
(width and depth pruning, head_dim no longer hidden/heads, fewer query groups, Qwen3's QK norms and
Nemotron's zero-centred LayerNorms through head and hidden pruning, Qwen3-MoE and Mixtral with fewer and
narrower experts, a Qwen2 student that was
distilled for a few steps through `minitron distill`), and a shape GPT-2 cannot express is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_minitron.hf.exporter import export_hf
from megatron_minitron.hf.files import HFError
from megatron_minitron.model import checkpoint as ckpt
from tests.conftest import REPO, child_env
from tests.hf import models

pytest.importorskip("transformers", reason="the Hugging Face tests need transformers (pip install -e .[test])")

TARGETS = {
    # Mistral-NeMo style (head_dim 32 != 64/4): hidden, ffn, heads (one per group) and depth.
    "mistral-nemo": dict(num_layers=1, hidden_size=48, ffn_hidden_size=64, num_attention_heads=2),
    # Llama 3.1 (GQA, rope scaling): hidden and whole query groups.
    "llama3.1": dict(hidden_size=32, num_query_groups=1, ffn_hidden_size=96),
    # Qwen2 (QKV bias, tied embeddings): depth and width.
    "qwen2": dict(num_layers=1, hidden_size=48, ffn_hidden_size=48, num_query_groups=1),
    # Qwen3 (QK norm carried whole, tied): heads within groups, hidden, ffn.
    "qwen3": dict(hidden_size=48, num_attention_heads=2, ffn_hidden_size=64),
    # Nemotron (LayerNorm1P with biases, squared ReLU, partial rotary): hidden, heads and whole groups, ffn.
    "nemotron": dict(hidden_size=48, num_query_groups=1, ffn_hidden_size=96),
    # GPT-2 (LayerNorm, biases, learned positions): depth and MLP; its head width must stay n_embd / n_head.
    "gpt2": dict(num_layers=1, ffn_hidden_size=64),
    # Mixture-of-Experts: each layer its own 2 of 4 experts, each expert its own neurons, hidden (issue 17).
    "qwen3-moe": dict(num_experts=2, moe_ffn_hidden_size=16, hidden_size=48),
    "mixtral": dict(num_experts=2, moe_ffn_hidden_size=32, hidden_size=48),
}


def prune(source, out, seed: int = 3, **target):
    from megatron_minitron.plan import Target, random_plan
    from megatron_minitron.prune.rewrite import prune_checkpoint

    plan = random_plan(ckpt.resolve(source).arch.explicit(), Target(**target), seed=seed)
    prune_checkpoint(source, plan, out, print_fn=lambda _: None)
    return out


@pytest.mark.parametrize("name", list(TARGETS))
def test_pruned_student_logits_equal_in_transformers(hf_cases, megatron_logits, tmp_path, name):
    pruned = prune(hf_cases[name]["ckpt"], tmp_path / "pruned", **TARGETS[name])
    export_hf(pruned, tmp_path / "hf", print_fn=lambda _: None)
    arch = ckpt.resolve(pruned).arch
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == models.CASES[name][0].replace("Config", "").lower().replace("moe", "_moe")
    if name != "gpt2":
        assert (config["head_dim"], config["hidden_size"], config["num_key_value_heads"]) == (
            arch.kv_channels, arch.hidden_size, arch.query_groups)
    ours, _ = megatron_logits(pruned)
    if name in models.MOE_CASES:  # transformers 5 fuses the per-expert tensors of the files while it loads them
        theirs = models.from_pretrained_logits([tmp_path / "hf"], tmp_path)[0]
        assert config["num_experts" if name == "qwen3-moe" else "num_local_experts"] == arch.num_experts == 2
    else:
        theirs = models.hf_logits(tmp_path / "hf")
    assert models.rel_error(theirs, ours) <= 1e-4
    assert models.rel_error(theirs, hf_cases[name]["logits"]) > 1e-2  # it is really another model
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()  # kept by the import, found through provenance


def test_gpt2_with_pruned_hidden_size_is_refused(hf_cases, tmp_path):
    pruned = prune(hf_cases["gpt2"]["ckpt"], tmp_path / "pruned", hidden_size=48)
    with pytest.raises(HFError, match=r"a gpt2 model derives the head width from hidden size / heads; this "
                                      r"checkpoint has kv_channels=16 with hidden_size=48"):
        export_hf(pruned, tmp_path / "hf", print_fn=lambda _: None)
    assert not (tmp_path / "hf").exists()


def test_distilled_student_exports(hf_cases, megatron_logits, tmp_path):
    """teacher (imported Qwen2) -> pruned -> `minitron distill` (2 steps) -> export: the distilled weights,
    not the pruned ones, and transformers agrees with megatron on them."""
    teacher = hf_cases["qwen2"]["ckpt"]
    pruned = prune(teacher, tmp_path / "pruned", **TARGETS["qwen2"])
    cmd = [sys.executable, "-m", "megatron_minitron", "distill", "--teacher", str(teacher), "--student", str(pruned),
           "--save", str(tmp_path / "kd"), "--cache-dir", str(tmp_path / "cache"), "--skip-teacher-check",
           "--train-iters", "2", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "2",
           "--lr", "1e-2", "--lr-warmup-iters", "0", "--eval-interval", "2", "--eval-iters", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    export_hf(tmp_path / "kd", tmp_path / "hf", print_fn=lambda _: None)
    distilled, _ = megatron_logits(tmp_path / "kd")
    before, _ = megatron_logits(pruned)
    theirs = models.hf_logits(tmp_path / "hf")
    assert models.rel_error(theirs, distilled) <= 1e-4
    assert models.rel_error(distilled, before) > 1e-3  # training moved the weights
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("qwen2", 1, 48)
