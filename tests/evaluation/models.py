"""A small random Llama-style model with a byte-level BPE tokenizer trained on the embedded corpus, saved as a
Hugging Face directory, imported as a checkpoint and exported back with export-hf: the same model for our
megatron evaluation and for lm-eval's own `hf` backend.

A real subword tokenizer (not tests/hf's word-level one) so the built-in task's passages and choices become
distinct tokens: the per-document log-likelihoods then differ between choices and the accuracy means something.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 512
EOS = "<|endoftext|>"
CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-5, max_position_embeddings=256,
              rope_theta=10000.0, tie_word_embeddings=False)


def write_bpe_tokenizer(directory: Path, documents: int = 300) -> None:
    """tokenizer.json (byte-level BPE of VOCAB ids, EOS the only special token: no BOS) + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_minitron.data.corpus import embedded_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(embedded_documents("train")[:documents], trainer=trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "clean_up_tokenization_spaces": False}))


MOE_CONFIG = dict(CONFIG, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                  router_jitter_noise=0.0)
"""A Mixtral-family model of the same size: 4 experts, top-2 (evaluated at the expert-parallel layouts too)."""


def save_model(directory: Path, seed: int = 0, family: str = "LlamaConfig", **config) -> None:
    """A transformers model of `family` (CONFIG, overridden by config) with every parameter random (norms around
    one), and the tokenizer."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, family)(**{**CONFIG, **config}),
                                                          dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.08 * torch.randn_like(p))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    write_bpe_tokenizer(directory)


def build(root: Path, **config) -> dict[str, Path]:
    """{"hf": source directory, "ckpt": its import, "exported": the checkpoint exported by export-hf}."""
    from megatron_minitron.hf.exporter import export_hf
    from megatron_minitron.hf.importer import import_hf

    paths = {"hf": root / "hf", "ckpt": root / "ckpt", "exported": root / "exported"}
    save_model(paths["hf"], **config)
    import_hf(paths["hf"], paths["ckpt"], print_fn=lambda _: None)
    export_hf(paths["ckpt"], paths["exported"], print_fn=lambda _: None)
    return paths


PROMPT_TEXTS = 4
MAX_NEW_TOKENS = 12
GEN_KWARGS = {"until": [".", "\n"], "max_gen_toks": 12, "do_sample": False}
LIMIT = 20
TASKS = ("minitron_continuation", "minitron_heldout")


def prompts(tokenizer) -> dict:
    """Generation prompts: the starts of the first held-out documents, as text and as our tokenizer's ids."""
    from megatron_minitron.data.corpus import embedded_documents

    texts = [doc[:120] for doc in embedded_documents("valid")[:PROMPT_TEXTS]]
    return {"texts": texts, "tokens": [tokenizer.tokenize(t) for t in texts], "max_new_tokens": MAX_NEW_TOKENS,
            "gen_kwargs": GEN_KWARGS}


def per_document(samples: list[dict]) -> dict[int, list[float]]:
    """doc_id -> the log-likelihood of each of its requests, from lm-eval's per-document records."""
    out = {}
    for sample in samples:
        values = []
        for resp in sample["resps"]:
            first = resp[0]
            values.append(float(first[0] if isinstance(first, (list, tuple)) else first))
        out[sample["doc_id"]] = values
    return out


def worst_relative_gap(ours: list[dict], theirs: list[dict]) -> float:
    """Largest |ours - theirs| / |theirs| over every request of every document (the same documents)."""
    a, b = per_document(ours), per_document(theirs)
    assert sorted(a) == sorted(b) and all(len(a[d]) == len(b[d]) for d in b)
    return max(abs(x - y) / abs(y) for d in b for x, y in zip(a[d], b[d]))
