"""Small randomly initialised transformers models of every supported family, saved as Hub-format
directories (config.json, safetensors, tokenizer.json), and their reference logits.

Shared by the in-process tests and by tests/multirank/hf_layouts.py. Every parameter, norms and biases
included, is drawn at random (HF initialises norms to one and biases to zero, which would hide a
mapping error in them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 1000
TOKENIZER_VOCAB = 300
TOKENS = torch.randint(0, TOKENIZER_VOCAB, (2, 24), generator=torch.Generator().manual_seed(11))

# name -> (transformers config class, kwargs). Two layers each (one per stage at PP2); every size is even
# so TP2 splits heads, groups and ffn.
CASES: dict[str, tuple[str, dict]] = {
    "llama2": ("LlamaConfig", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=VOCAB, rms_norm_eps=1e-5, max_position_embeddings=256,
                                   rope_theta=10000.0, tie_word_embeddings=False)),
    "llama3.1": ("LlamaConfig", dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-5,
                                     max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
                                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192})),
    "mistral-nemo": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=VOCAB,
                                           rms_norm_eps=1e-5, max_position_embeddings=1024, rope_theta=1000000.0,
                                           sliding_window=None, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-6, max_position_embeddings=512,
                                  rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False)),
    # Qwen3: QK norm, head_dim 32 != 64/4, tied embeddings (as the small Qwen3 models), no QKV bias.
    "qwen3": ("Qwen3Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, rms_norm_eps=1e-6,
                                  max_position_embeddings=512, rope_theta=1000000.0, tie_word_embeddings=True,
                                  use_sliding_window=False, attention_bias=False)),
    # Nemotron (Minitron-8B/4B's family): LayerNorm1P with biases, relu2 without a gate, half the head rotated.
    "nemotron": ("NemotronConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
                                        norm_eps=1e-5, max_position_embeddings=256, rope_theta=10000.0,
                                        partial_rotary_factor=0.5, tie_word_embeddings=False)),
    # Llama 3.2: tied embeddings, llama3 RoPE scaling with factor 32.
    "llama3.2": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, rms_norm_eps=1e-5,
                                     max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192})),
    # Qwen3-MoE: QK norm, 4 experts of width 32, top-2 renormalised (norm_topk_prob=True, as Qwen3-30B-A3B).
    "qwen3-moe": ("Qwen3MoeConfig", dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                         num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
                                         rms_norm_eps=1e-6, max_position_embeddings=512, rope_theta=1000000.0,
                                         tie_word_embeddings=False, use_sliding_window=False)),
    # Mixtral: 4 experts of width 64, top-2, untied.
    "mixtral": ("MixtralConfig", dict(hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=VOCAB, rms_norm_eps=1e-5, max_position_embeddings=1024,
                                      rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=64, vocab_size=VOCAB,
                                activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                                attn_pdrop=0.0)),
}

MOE_CASES = ("qwen3-moe", "mixtral")
"""The Mixture-of-Experts cases (loaded at the expert-parallel and sequence-parallel layouts too)."""


def hf_model(name: str, seed: int = 0, **overrides):
    """The transformers model of a case (config keys replaced by overrides), every parameter random, in eval mode."""
    import transformers

    cls_name, kwargs = CASES[name]
    config = getattr(transformers, cls_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight") or ".ln_" in pname and pname.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


def write_tokenizer(directory: Path, eos: str = "</s>") -> None:
    """A word-level tokenizer.json of TOKENIZER_VOCAB ids (specials first) and its tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", eos]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(TOKENIZER_VOCAB - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": eos, "unk_token": "<unk>"}))


def save_case(name: str, directory: Path, *, seed: int = 0, max_shard_size: str | None = None,
              **overrides) -> torch.Tensor:
    """Save a case's model (and tokenizer) to directory; returns its logits on TOKENS."""
    model = hf_model(name, seed, **overrides)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    write_tokenizer(directory, eos="<|endoftext|>" if name == "gpt2" else "</s>")
    with torch.no_grad():
        return model(TOKENS).logits.float()


def hf_logits(directory: Path, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    """Logits of a saved HF directory: transformers reads its config.json (AutoConfig, no custom code),
    builds the model and loads every tensor of its safetensors files by name, strictly.

    Not `from_pretrained`: in a process that has built a megatron model, transformers 5.24's
    from_pretrained leaves the RoPE `inv_freq` buffers uninitialised (seen in these tests; the cause is
    not found). `from_pretrained_logits` runs it in a fresh interpreter instead."""
    import transformers
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(str(path)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert set(missing) <= tied and not unexpected, (missing, unexpected)
    model.tie_weights()
    with torch.no_grad():
        return model(tokens).logits.float()


def from_pretrained_logits(directories: list[Path], out: Path) -> list[torch.Tensor]:
    """Logits of each directory loaded by `AutoModelForCausalLM.from_pretrained`, in a fresh interpreter."""
    import subprocess
    import sys

    from tests.conftest import REPO, child_env

    script = ("import sys, torch, transformers\n"
              "from tests.hf.models import TOKENS\n"
              "for i, d in enumerate(sys.argv[2:]):\n"
              "    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()\n"
              "    with torch.no_grad():\n"
              "        torch.save(m(TOKENS).logits.float(), f'{sys.argv[1]}/{i}.pt')\n")
    proc = subprocess.run([sys.executable, "-c", script, str(out), *map(str, directories)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"{i}.pt") for i in range(len(directories))]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())
