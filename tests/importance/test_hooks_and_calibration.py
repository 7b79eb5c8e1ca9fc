"""Pieces of the importance pass that need no processes: the recomputed norm of the
Transformer-Engine path, and the calibration data's sample accounting."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from megatron_minitron.importance.calibration import CalibrationData, micro_batch_sizes
from megatron_minitron.importance.hooks import norm_output
from megatron_minitron.model.norm import LocalNorm


@pytest.mark.parametrize("normalization, zero_centered", [("RMSNorm", False), ("LayerNorm", True),
                                                          ("LayerNorm", False)])
def test_recomputed_norm_equals_the_norm_module(normalization, zero_centered):
    """With the TE spec the LayerNorm is fused into linear_qkv/linear_fc1; its output is recomputed
    from the fused module's input and weights. It must equal what a norm module outputs."""
    config = types.SimpleNamespace(normalization=normalization, layernorm_zero_centered_gamma=zero_centered,
                                   params_dtype=torch.float32, sequence_parallel=False)
    norm = LocalNorm(config, 16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        if norm.bias is not None:
            norm.bias.normal_()
    x = torch.randn(5, 3, 16) * 3 + 1
    expected = norm(x)
    got = norm_output(x, norm.weight, norm.bias, normalization=normalization, eps=1e-5,
                      zero_centered_gamma=zero_centered)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_data_parallel_ranks_share_the_samples_exactly():
    """Every sample goes to exactly one DP rank, whatever the micro-batch size."""
    for n, mbs, dp in ((13, 2, 4), (1024, 4, 2), (5, 8, 3)):
        total = sum(sum(micro_batch_sizes(n, micro_batch_size=mbs, dp_rank=r, dp_size=dp)) for r in range(dp))
        assert total == n


def test_available_samples_are_counted_from_one_epoch(tmp_path, data_cache):
    """The distinct-sample count equals (tokens in the data - 1) // seq_length, checked by hand."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_minitron.data.loader import load_tokenizer, DataConfig
    from megatron_minitron.importance.calibration import build_calibration_dataset

    tokenizer = load_tokenizer(DataConfig(cache_dir=str(data_cache)))
    (tmp_path / "d.jsonl").write_text("\n".join('{"text": "%s"}' % ("word%d " % i * 30) for i in range(15)))
    cfg = CalibrationData(data_file=str(tmp_path / "d.jsonl"), num_samples=4, seq_length=32,
                          cache_dir=str(tmp_path / "cache"))
    dataset, n = build_calibration_dataset(cfg, tokenizer, model_vocab_size=tokenizer.vocab_size)
    prefix = next((tmp_path / "cache" / "calibration").glob("*.idx")).with_suffix("")
    indexed = IndexedDataset(str(prefix))  # keep it alive: its arrays are views of its memory map
    tokens = int(np.sum(indexed.sequence_lengths))
    per_epoch = (tokens - 1) // 32
    assert n == 4 and per_epoch >= 4
    too_many = CalibrationData(data_file=str(tmp_path / "d.jsonl"), num_samples=per_epoch + 1, seq_length=32,
                               cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=f"holds {per_epoch} distinct samples of 32 tokens"):
        build_calibration_dataset(too_many, tokenizer, model_vocab_size=tokenizer.vocab_size)
    capped = CalibrationData(data_file=str(tmp_path / "d.jsonl"), num_samples=per_epoch + 1, seq_length=32,
                             cache_dir=str(tmp_path / "cache"), cap=True)
    assert build_calibration_dataset(capped, tokenizer, model_vocab_size=tokenizer.vocab_size)[1] == per_epoch
