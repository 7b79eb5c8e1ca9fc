"""Fixtures of the Hugging Face tests: every family's small model saved, its reference logits, and its import."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hf import models


@pytest.fixture(scope="session")
def hf_cases(tmp_path_factory) -> dict[str, dict]:
    """name -> {"hf": HF directory, "ckpt": imported checkpoint, "logits": transformers logits on models.TOKENS}."""
    from megatron_minitron.hf.importer import import_hf

    root = tmp_path_factory.mktemp("hf-cases")
    cases = {}
    for name in models.CASES:
        # One case is saved as several shards with an index, the others as one file.
        logits = models.save_case(name, root / name / "hf", max_shard_size="200KB" if name == "llama3.1" else None)
        import_hf(root / name / "hf", root / name / "ckpt", print_fn=lambda _: None)
        cases[name] = {"hf": root / name / "hf", "ckpt": root / name / "ckpt", "logits": logits}
    return cases


@pytest.fixture(scope="session")
def megatron_logits(single_rank_runtime):
    """logits(checkpoint) at TP1 in this process, cut to the model's vocabulary."""
    import torch

    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.forward import forward_logits

    def run(path: Path, tokens=models.TOKENS):
        info = ckpt.resolve(path)
        model = build_model(info.arch, single_rank_runtime, use_te=False)
        ckpt.load_checkpoint(info, model=model)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        return forward_logits(model, tokens, positions, single_rank_runtime)[..., :info.arch.vocab_size], model

    return run
