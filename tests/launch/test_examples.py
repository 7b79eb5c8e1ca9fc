"""examples/: every export config is accepted by `minitron prune`'s own validation at the layout its
commands use, gives exactly the published architecture, and has the published parameter count; every
command in the examples' Markdown parses with the real `minitron` argument parser.

Published shapes: the released checkpoints' config.json on the Hugging Face Hub (nvidia/Minitron-8B-Base,
nvidia/Minitron-4B-Base, nvidia/Llama-3.1-Minitron-4B-Width-Base, nvidia/Llama-3.1-Minitron-4B-Depth-Base,
nvidia/Mistral-NeMo-Minitron-8B-Base). The count is checked twice: exactly, against a count of the
tensors a Hugging Face checkpoint of that config.json holds (an independent formula), and against the
headline size published for the model, within half a unit of its last published digit."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from megatron_minitron.cli import build_parser
from megatron_minitron.config import preset
from megatron_minitron.plan import random_plan
from megatron_minitron.plan.target import load_target
from tests.conftest import REPO

EXAMPLES = REPO / "examples"

# name: (source preset, released config.json fields, published size in billions, its tolerance, where published)
PUBLISHED = {
    "nemotron4-15b-to-minitron-8b": (
        "nemotron4-15b", dict(hidden_size=4096, intermediate_size=16384, num_attention_heads=48, num_key_value_heads=8,
                              head_dim=128, num_hidden_layers=32, vocab_size=256000, hidden_act="relu2"),
        8.3, 0.05, "arXiv 2407.14679 'MINITRON 8B'; the Hub's BF16 copies are 16.6 GB = 8.3B x 2 bytes"),
    "nemotron4-15b-to-minitron-4b": (
        "nemotron4-15b", dict(hidden_size=3072, intermediate_size=9216, num_attention_heads=24, num_key_value_heads=8,
                              head_dim=128, num_hidden_layers=32, vocab_size=256000, hidden_act="relu2"),
        4.19, 0.005, "Hugging Face Hub parameter count of Minitron-4B-Base (4.19B params)"),
    "llama3.1-8b-to-4b-width": (
        "llama3.1-8b", dict(hidden_size=3072, intermediate_size=9216, num_attention_heads=32, num_key_value_heads=8,
                            head_dim=128, num_hidden_layers=32, vocab_size=128256, hidden_act="silu"),
        4.51, 0.005, "model card of Llama-3.1-Minitron-4B-Width-Base (Parameter Count 4.51B)"),
    "llama3.1-8b-to-4b-depth": (
        "llama3.1-8b", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                            head_dim=128, num_hidden_layers=16, vocab_size=128256, hidden_act="silu"),
        4.5, 0.05, "arXiv 2408.11796: Llama 3.1 8B pruned to 4.5B (depth: 16 of 32 layers)"),
    "mistral-nemo-12b-to-8b": (
        "mistral-nemo-12b", dict(hidden_size=4096, intermediate_size=11520, num_attention_heads=32,
                                 num_key_value_heads=8, head_dim=128, num_hidden_layers=40, vocab_size=131072,
                                 hidden_act="silu"),
        8.41, 0.005, "Hugging Face Hub parameter count of Mistral-NeMo-Minitron-8B-Base (8.41B params)"),
    # From Hugging Face checkpoints (import-hf first, export-hf last):
    "qwen3-8b-to-6b-depth": (
        "qwen3-8b", dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, num_hidden_layers=24, vocab_size=151936, hidden_act="silu", qk_norm=True),
        6.0, 0.5, "NVIDIA's Model Optimizer post (Oct 2025): Qwen3 8B depth-pruned from 36 to 24 layers, a 6B model"),
    "minitron-8b-to-4b": (
        "minitron-8b", dict(hidden_size=3072, intermediate_size=9216, num_attention_heads=24, num_key_value_heads=8,
                            head_dim=128, num_hidden_layers=32, vocab_size=256000, hidden_act="relu2"),
        4.19, 0.005, "Hugging Face Hub parameter count of Minitron-4B-Base (4.19B params)"),
}
TP, PP = 8, 1  # the layout the examples' commands use

# Mixture-of-Experts examples: no pruned model of these shapes is published, so the count is checked exactly
# against an independent count of the Hugging Face tensors of the pruned config.json (and the sources' published
# totals, 30.5B and 46.7B, in tests/test_config_moe.py).
# name: (source preset, pruned config.json fields, TP, EP of the commands)
MOE_EXAMPLES = {
    "qwen3-30b-a3b-to-64-experts": (
        "qwen3-30b-a3b", dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                              num_hidden_layers=48, vocab_size=151936, num_experts=64, num_experts_per_tok=8,
                              moe_intermediate_size=768, qk_norm=True), 1, 8),
    "mixtral-8x7b-to-4x7b": (
        "mixtral-8x7b", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             num_hidden_layers=32, vocab_size=32000, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=14336), 1, 4),
    "mixtral-8x7b-narrow-experts": (
        "mixtral-8x7b", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             num_hidden_layers=32, vocab_size=32000, num_experts=8, num_experts_per_tok=2,
                             moe_intermediate_size=7168), 1, 4),
}


def hf_parameter_count(c: dict) -> int:
    """Parameters of a Hugging Face Llama/Mistral/Qwen3 (silu: RMSNorm, gated MLP; Qwen3 adds q_norm and k_norm
    of head_dim each) or Nemotron (relu2: LayerNorm1P with bias, plain MLP) checkpoint with these config.json
    fields, untied embeddings, no linear biases."""
    h, ffn, hd, L = c["hidden_size"], c["intermediate_size"], c["head_dim"], c["num_hidden_layers"]
    attn = h * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])  # q, o; k, v
    mlp = (3 if c["hidden_act"] == "silu" else 2) * h * ffn
    norm = h * (1 if c["hidden_act"] == "silu" else 2)
    qk_norms = 2 * hd if c.get("qk_norm") else 0
    return L * (attn + mlp + 2 * norm + qk_norms) + norm + 2 * c["vocab_size"] * h


def hf_moe_parameter_counts(c: dict) -> tuple[int, int]:
    """(total, active) parameters of a Hugging Face Qwen3-MoE / Mixtral checkpoint with these config.json fields:
    per layer q/k/v/o, two RMSNorms (+ q_norm/k_norm for Qwen3), a router [experts, hidden] and per expert
    gate/up/down; untied embeddings. Active: num_experts_per_tok experts per layer instead of all."""
    h, hd, L, E, k, fe = (c[key] for key in ("hidden_size", "head_dim", "num_hidden_layers", "num_experts",
                                             "num_experts_per_tok", "moe_intermediate_size"))
    shared = L * (h * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"]) + 2 * h + E * h
                  + (2 * hd if c.get("qk_norm") else 0)) + h + 2 * c["vocab_size"] * h
    return shared + L * E * 3 * h * fe, shared + L * k * 3 * h * fe


@pytest.mark.parametrize("name", sorted(MOE_EXAMPLES))
def test_moe_target_has_the_independent_count(name):
    source_name, released, tp, ep = MOE_EXAMPLES[name]
    target = load_target(EXAMPLES / f"{name}.json")
    pruned = random_plan(preset(source_name), target, seed=0, tensor_parallel=tp, expert_parallel=ep).target
    got = (pruned.hidden_size, pruned.num_attention_heads, pruned.query_groups, pruned.head_dim, pruned.num_layers,
           pruned.vocab_size, pruned.num_experts, pruned.moe_router_topk, pruned.expert_ffn_hidden_size)
    assert got == tuple(released[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                              "num_hidden_layers", "vocab_size", "num_experts", "num_experts_per_tok",
                                              "moe_intermediate_size"))
    total, active = pruned.num_parameters(), pruned.num_active_parameters()
    assert (total, active) == hf_moe_parameter_counts(released)
    readme = (EXAMPLES / "README.md").read_text()
    assert f"{total:,}" in readme and f"{active:,}" in readme, f"examples/README.md should state {name}'s counts"


def test_every_example_has_its_config_commands_and_a_published_size():
    names = {p.stem for p in EXAMPLES.glob("*.json")}
    assert names == set(PUBLISHED) | set(MOE_EXAMPLES)
    assert names == {p.stem for p in EXAMPLES.glob("*.md")} - {"README"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_target_shape_has_the_published_size(name):
    source_name, released, billions, tolerance, where = PUBLISHED[name]
    source = preset(source_name)
    target = load_target(EXAMPLES / f"{name}.json")  # the loader `minitron prune --export-config` uses
    pruned = random_plan(source, target, seed=0, tensor_parallel=TP, pipeline_parallel=PP).target
    got = (pruned.hidden_size, pruned.ffn_hidden_size, pruned.num_attention_heads, pruned.query_groups,
           pruned.head_dim, pruned.num_layers, pruned.vocab_size)
    assert got == (released["hidden_size"], released["intermediate_size"], released["num_attention_heads"],
                   released["num_key_value_heads"], released["head_dim"], released["num_hidden_layers"],
                   released["vocab_size"])
    count = pruned.num_parameters()
    assert count == hf_parameter_count(released)
    assert abs(count / 1e9 - billions) <= tolerance, f"{name}: {count / 1e9:.3f}B vs {billions}B ({where})"
    readme = (EXAMPLES / "README.md").read_text()
    assert f"{count:,}" in readme, f"examples/README.md should state {name}'s exact count {count:,}"


def _commands(markdown: str) -> list[list[str]]:
    """Each command of the first bash block, continuation lines joined, as argv words."""
    block = markdown.split("```bash\n", 1)[1].split("\n```", 1)[0]
    logical = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line) for line in logical.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("name", sorted(PUBLISHED) + sorted(MOE_EXAMPLES))
def test_example_commands_parse_with_the_real_cli(name):
    tp = MOE_EXAMPLES[name][2] if name in MOE_EXAMPLES else TP
    commands = _commands((EXAMPLES / f"{name}.md").read_text())
    parser, jobs = build_parser(), []
    hf_jobs = [argv[1] for argv in commands if argv[0] == "minitron"]
    assert hf_jobs in ([], ["import-hf", "export-hf"])  # a Hugging Face source: imported first, exported last
    if hf_jobs:
        imported = parser.parse_args(commands[0][1:])
        assert commands[0][1] == "import-hf" and imported.tp == tp
        exported = parser.parse_args(commands[4][1:])
        assert commands[4][1] == "export-hf"
        commands = commands[1:4] + commands[5:]
        assert imported.save == parser.parse_args(["importance", *commands[0][1:]]).load  # launch/importance.sh
        assert exported.load == parser.parse_args(["distill", *commands[2][1:]]).save  # launch/distill.sh
    for argv in commands:
        launcher = next(i for i, w in enumerate(argv) if re.fullmatch(r"launch/(\w+\.sh|slurm/\w+\.sbatch)", w)
                        and w != "launch/sbatch.sh")
        job = Path(argv[launcher]).name.split(".")[0]
        args = [w.rstrip(")") for w in argv[launcher + 1:]]
        parsed = parser.parse_args([job, *args])
        assert parsed.tp == tp
        if name in MOE_EXAMPLES:
            assert parsed.ep == MOE_EXAMPLES[name][3]
        if job == "prune":
            assert parsed.export_config == f"examples/{name}.json"
        jobs.append(job)
    assert jobs == ["importance", "prune", "distill"] * 2  # torchrun, then the same three under sbatch
    torchrun_args = [c[1:] for c in commands[:3]]
    sbatch_args = [[w.rstrip(")") for w in c[c.index(next(w for w in c if w.startswith("launch/slurm/"))) + 1:]]
                   for c in commands[3:]]
    assert torchrun_args == sbatch_args, "the torchrun and sbatch variants must run the same jobs"
