"""Calibration data: a fixed, seeded list of samples and how the data-parallel ranks share them.

Samples come from megatron's GPTDataset (its document shuffle and sample cutting), built over one
epoch of an indexed dataset, of a text/jsonl file tokenized once into the cache, or of the embedded
corpus. Asking for more samples than one epoch holds is an error (or, with `cap`, an explicit cut
to what is there), never a silent repetition.

Micro-batch m holds samples [m * mbs, (m + 1) * mbs) (the last one may be shorter) and goes to
data-parallel rank m % dp, so every layout sees the same samples in the same micro-batches.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from megatron_minitron.config import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationData:
    """Where calibration samples come from."""

    data_path: Optional[tuple[str, ...]] = None
    """Indexed dataset prefixes (one, or a Megatron-LM blend `W1 P1 W2 P2`); None for the others."""
    data_file: Optional[str] = None
    """A .jsonl or .txt file, tokenized into the cache on first use."""
    num_samples: int = 1024
    """Samples to run through the model."""
    seq_length: int = 4096
    """Tokens per sample."""
    seed: int = 1234
    """Seed of the document and sample shuffle."""
    cap: bool = False
    """With fewer samples available than asked for: use what is there (True) or fail (False)."""
    cache_dir: str = ".cache/minitron-data"
    """Tokenizer and index caches (shared by all ranks)."""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.seq_length < 1:
            raise ConfigError(f"--seq-length must be >= 1, got {self.seq_length}")
        if self.data_path and self.data_file:
            raise ConfigError("give either --data-path (indexed dataset) or --data-file (text/jsonl), not both")
        if self.data_file is not None:
            path = Path(self.data_file)
            if not path.is_file():
                raise ConfigError(f"--data-file {path} does not exist")
            if path.stat().st_size == 0:
                raise ConfigError(f"--data-file {path} is empty")
            if path.suffix not in (".jsonl", ".txt"):
                raise ConfigError(f"--data-file {path}: expected a .jsonl or .txt file")

    def describe(self) -> dict:
        source = ({"indexed": list(self.data_path)} if self.data_path else
                  {"file": str(Path(self.data_file).resolve())} if self.data_file else {"embedded": "stdlib-docs"})
        return {**source, "seed": self.seed, "seq_length": self.seq_length}


def _file_prefix(cfg: CalibrationData, tokenizer) -> str:
    """Tokenize --data-file once into the cache (rank 0 first); returns the dataset prefix."""
    from megatron_minitron.data.files import text_sha1
    from megatron_minitron.data.loader import rank0_first
    from megatron_minitron.data.preprocess import preprocess

    path = Path(cfg.data_file).resolve()
    stat = path.stat()
    key = text_sha1(str(path), str(stat.st_size), str(stat.st_mtime_ns), tokenizer.fingerprint)[:16]
    prefix = os.path.join(cfg.cache_dir, "calibration", f"{path.stem}-{key}")

    def build():
        if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
            preprocess([str(path)], tokenizer, prefix, overwrite=True)
        return prefix

    return rank0_first(build)


def build_calibration_dataset(cfg: CalibrationData, tokenizer, *, model_vocab_size: int):
    """The GPTDataset (or blend) the samples are read from, and how many samples it gives."""
    from megatron_minitron.data.blend import parse_blend
    from megatron_minitron.data.loader import DataConfig, build_datasets, check_vocab_fits

    check_vocab_fits(tokenizer, model_vocab_size)
    if cfg.data_file is not None:
        blend = ((1.0, _file_prefix(cfg, tokenizer)),)
    else:
        blend = parse_blend(list(cfg.data_path)) if cfg.data_path else None
    data = DataConfig(blend=blend, split="100,0,0", seq_length=cfg.seq_length, seed=cfg.seed,
                      cache_dir=cfg.cache_dir, tokenizer=tokenizer.ref)
    dataset, _, _ = build_datasets(data, tokenizer, (cfg.num_samples, 0, 0), model_vocab_size=model_vocab_size)
    available = available_samples(dataset, cfg.num_samples)
    if available < cfg.num_samples:
        if not cfg.cap:
            raise ConfigError(f"the calibration data holds {available} distinct samples of {cfg.seq_length} tokens, "
                              f"fewer than --num-samples {cfg.num_samples}; lower --num-samples or --seq-length, give "
                              f"more data, or pass --cap-samples to use {available}")
        print(f"calibration: using {available} samples (all the data holds), not {cfg.num_samples}", flush=True)
    return dataset, min(available, cfg.num_samples)


def available_samples(dataset, requested: int) -> int:
    """How many of the first `requested` samples come from the first epoch of their dataset."""
    if hasattr(dataset, "dataset_index"):  # megatron BlendedDataset
        counts = np.bincount(dataset.dataset_index[:requested], minlength=len(dataset.datasets))
        ok = [min(c, available_samples(d, int(c)) if c else 0) for c, d in zip(counts, dataset.datasets)]
        if all(o == c for o, c in zip(ok, counts)):
            return requested
        return int(sum(ok))
    tokens = dataset._get_num_tokens_per_epoch()  # megatron's own count of one epoch
    per_epoch = (tokens - dataset.config.add_extra_token_to_sequence) // dataset.config.sequence_length
    return min(requested, per_epoch)


def micro_batches(dataset, num_samples: int, *, micro_batch_size: int, dp_rank: int,
                  dp_size: int) -> Iterator[dict]:
    """This data-parallel rank's micro-batches (see the module docstring)."""
    from megatron_minitron.data.loader import collate

    count = -(-num_samples // micro_batch_size)
    for m in range(dp_rank, count, dp_size):
        indices = range(m * micro_batch_size, min((m + 1) * micro_batch_size, num_samples))
        yield collate([dataset[i] for i in indices])


def micro_batch_sizes(num_samples: int, *, micro_batch_size: int, dp_rank: int, dp_size: int) -> list[int]:
    """Sizes of this rank's micro-batches, without reading data."""
    count = -(-num_samples // micro_batch_size)
    return [min(micro_batch_size, num_samples - m * micro_batch_size) for m in range(dp_rank, count, dp_size)]

