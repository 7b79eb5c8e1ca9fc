"""Training data: where it comes from (``DataConfig``), GPT datasets, and micro-batches.

``build_datasets`` goes through megatron-core's ``BlendedMegatronDatasetBuilder`` and
``GPTDataset``, so sample construction, document shuffling, blending and index caching are
exactly megatron's. ``batch_iterator`` then hands each data-parallel rank its slice of every
global batch, the way Megatron-LM's ``MegatronPretrainingSampler`` does.

Without a ``blend`` the embedded standard-library corpus is used: its train and held-out
valid splits are tokenized once into ``cache_dir/embedded`` and reused.

Distributed use: every rank calls ``build_datasets`` (and builds its own dataset objects).
Work that writes caches runs on global rank 0 first, then the other ranks, which find the
cache. ``cache_dir`` must therefore be one directory visible to all ranks (a shared file
system when training on several nodes): megatron's GPTDataset never builds indices on a
rank other than 0 and fails to load them if rank 0 wrote them elsewhere.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import math
import os
import re
import struct
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

from megatron_minitron.data.files import text_sha1
from megatron_minitron.data.blend import Blend
from megatron_minitron.data.tokenizer import (
    MIN_SP_VOCAB_SIZE,
    Tokenizer,
    TokenizerRef,
    default_tokenizer,
)
from megatron_minitron.runtime.dist import private_world

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
"""Keys of every micro-batch yielded by ``batch_iterator``."""

_T = TypeVar("_T")


def _normalize_blend(name: str, blend: Any) -> Blend | None:
    """Return ``blend`` as a tuple of (float weight, str prefix), validating each entry."""
    if blend is None:
        return None
    pairs = []
    for entry in blend:
        if len(entry) != 2:
            raise ValueError(f"{name} entry {entry!r} is not a (weight, path_prefix) pair")
        weight, prefix = entry
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"{name} weight {weight!r} for {prefix!r} is not a number")
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{name} weight {weight!r} for {prefix!r} must be positive")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"{name} path prefix {prefix!r} must be a non-empty string")
        pairs.append((float(weight), prefix))
    if not pairs:
        raise ValueError(f"{name} is empty; give at least one (weight, path_prefix) pair or None")
    return tuple(pairs)


def parse_split(split: str) -> tuple[float, float, float]:
    """Parse a "train,valid,test" weight string such as "98,2,0" into three fractions.

    Missing trailing parts are 0 ("1" means all train). The train part must be positive.
    """
    parts = [part.strip() for part in str(split).split(",")]
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", p) for p in parts):
        raise ValueError(f"split {split!r} must be up to three non-negative numbers like '98,2,0'")
    weights = [float(part) for part in parts] + [0.0] * (3 - len(parts))
    if weights[0] <= 0:
        raise ValueError(
            f"split {split!r} gives the train split no data; its first part must be > 0"
        )
    total = sum(weights)
    return weights[0] / total, weights[1] / total, weights[2] / total


def _require_int(name: str, value: Any, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int (not bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where training data comes from and how samples are cut from it."""

    blend: Blend | None = None
    """Training blend as (weight, path_prefix) pairs of indexed datasets (``<prefix>.bin/.idx``);
    None uses the embedded standard-library corpus. Weights are relative (need not sum to 1)."""

    valid_blend: Blend | None = None
    """Separate validation blend; when set, ``blend`` is used whole for training (``split`` is
    ignored) and this blend for validation. Requires ``blend``."""

    split: str = "98,2,0"
    """Train/valid/test proportions used to cut every dataset of ``blend`` into document
    ranges, when ``valid_blend`` is not given. Unused for the embedded corpus, which has its
    own held-out validation documents."""

    seq_length: int = 1024
    """Tokens per sample (inputs and labels each have this length)."""

    seed: int = 1234
    """Seed of megatron's document and sample shuffling."""

    cache_dir: str = os.path.join(".cache", "minitron-data")
    """Directory for the default tokenizer, the tokenized embedded corpus and megatron's
    GPTDataset/BlendedDataset index caches. Must be shared by all ranks."""

    tokenizer: TokenizerRef | None = None
    """Tokenizer to use; None trains/reuses the default SentencePiece model in ``cache_dir``."""

    default_vocab_size: int = 8192
    """Vocabulary size of the default tokenizer (only used when ``tokenizer`` is None)."""

    def __post_init__(self) -> None:
        """Normalise the blends to tuples and validate every field (ValueError names it)."""
        object.__setattr__(self, "blend", _normalize_blend("blend", self.blend))
        object.__setattr__(self, "valid_blend", _normalize_blend("valid_blend", self.valid_blend))
        if self.valid_blend is not None and self.blend is None:
            raise ValueError("valid_blend needs a training blend; set blend as well")
        parse_split(self.split)
        _require_int("seq_length", self.seq_length, 1)
        _require_int("seed", self.seed, 0)
        _require_int("default_vocab_size", self.default_vocab_size, MIN_SP_VOCAB_SIZE)
        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            raise ValueError(f"cache_dir must be a non-empty path string, got {self.cache_dir!r}")
        if isinstance(self.tokenizer, dict):
            object.__setattr__(self, "tokenizer", TokenizerRef.from_json(self.tokenizer))
        if self.tokenizer is not None and not isinstance(self.tokenizer, TokenizerRef):
            raise ValueError(
                f"tokenizer must be a TokenizerRef, its to_json() dict, or None; "
                f"got {self.tokenizer!r}"
            )

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict; ``from_json`` inverts it."""
        data = dataclasses.asdict(self)
        for key in ("blend", "valid_blend"):
            if data[key] is not None:
                data[key] = [[weight, prefix] for weight, prefix in data[key]]
        data["tokenizer"] = None if self.tokenizer is None else self.tokenizer.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataConfig:
        """Build a DataConfig from ``to_json`` output, rejecting unknown keys."""
        from megatron_minitron.config import unknown_fields

        unknown = unknown_fields(cls, data)
        if unknown:
            known = {field.name for field in dataclasses.fields(cls)}
            raise ValueError(
                f"unknown DataConfig keys {unknown}; expected a subset of {sorted(known)}"
            )
        return cls(**data)


def rank0_first(build: Callable[[], _T]) -> _T:
    """Run ``build`` on global rank 0, then (after a barrier) on the other ranks.

    Used for work that fills a cache: rank 0 does it, the others then find it. Without
    torch.distributed this simply calls ``build``.
    """
    if not torch.distributed.is_initialized():
        return build()
    is_rank0 = torch.distributed.get_rank() == 0
    result = build() if is_rank0 else None
    torch.distributed.barrier()
    return result if is_rank0 else build()


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    """Open ``cfg.tokenizer``, or the default tokenizer (trained on rank 0 on first use)."""
    if cfg.tokenizer is not None:
        return cfg.tokenizer.load()
    ref = rank0_first(lambda: default_tokenizer(cfg.cache_dir, cfg.default_vocab_size))
    return ref.load()


def _embedded_prefix(cache_dir: str, split: str, tokenizer: Tokenizer) -> str:
    """Path prefix of the tokenized embedded corpus split for this corpus and tokenizer."""
    from megatron_minitron.data.corpus import corpus_fingerprint

    key = text_sha1(corpus_fingerprint(), tokenizer.fingerprint)[:16]
    return os.path.join(cache_dir, "embedded", f"stdlib-{split}-{key}")


def _dataset_exists(prefix: str) -> bool:
    """Whether both files of the indexed dataset at ``prefix`` exist."""
    return os.path.isfile(get_bin_path(prefix)) and os.path.isfile(get_idx_path(prefix))


def _tokenize_embedded_split(prefix: str, split: str, tokenizer: Tokenizer) -> None:
    """Write the embedded corpus ``split`` as an indexed dataset at ``prefix`` (if missing)."""
    from megatron_minitron.data.corpus import write_embedded_jsonl
    from megatron_minitron.data.preprocess import preprocess

    if _dataset_exists(prefix):
        return
    directory = os.path.dirname(prefix)
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        jsonl = os.path.join(scratch, f"{split}.jsonl")
        write_embedded_jsonl(jsonl, split)
        preprocess([jsonl], tokenizer, prefix, overwrite=True)


def prepare_embedded_corpus(cache_dir: str, tokenizer: Tokenizer) -> tuple[str, str]:
    """Tokenize the embedded corpus once; return the (train, valid) dataset path prefixes.

    The prefixes are keyed by the corpus sources and the tokenizer file, so a different
    tokenizer gets its own copy. Rank 0 writes them first under torch.distributed.
    """
    prefixes = tuple(_embedded_prefix(cache_dir, split, tokenizer) for split in ("train", "valid"))

    def build() -> None:
        for split, prefix in zip(("train", "valid"), prefixes, strict=True):
            _tokenize_embedded_split(prefix, split, tokenizer)

    rank0_first(build)
    return prefixes


def check_blend_paths(blend: Blend) -> None:
    """Raise FileNotFoundError naming the first prefix whose ``.bin`` or ``.idx`` is missing, and
    ValueError naming a damaged one (check_indexed_dataset)."""
    for _, prefix in blend:
        for path in (get_bin_path(prefix), get_idx_path(prefix)):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"blend prefix {prefix!r}: {path!r} does not exist; give the path prefix of "
                    "an indexed dataset written by preprocess() (without .bin/.idx)"
                )
        check_indexed_dataset(prefix)


_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron's DType codes


def check_indexed_dataset(prefix: str) -> int:
    """Check a Megatron indexed dataset from its header and last entry only (a few reads, whatever
    its size): the .idx is one (magic, version 1, known dtype, long enough for its arrays) and the
    .bin holds exactly the tokens the index points to. Returns the number of tokens; raises
    ValueError naming the file otherwise (megatron's own reader fails with an AttributeError)."""
    idx, binary = get_idx_path(prefix), get_bin_path(prefix)
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(34)
        if len(head) < 34 or head[:9] != _IDX_MAGIC or struct.unpack("<Q", head[9:17])[0] != 1 \
                or head[17] not in _IDX_ITEMSIZE:
            raise ValueError(f"{idx} is not a Megatron index file (version 1); write it with `minitron preprocess`")
        itemsize = _IDX_ITEMSIZE[head[17]]
        sequences, documents = struct.unpack("<QQ", head[18:34])
        needed = 34 + sequences * (4 + 8) + documents * 8
        if size < needed:
            raise ValueError(f"{idx} is truncated: {size} bytes, its {sequences} sequences and {documents} "
                             f"documents need {needed}")
        tokens_end = 0
        if sequences:
            f.seek(34 + (sequences - 1) * 4)
            last_length = struct.unpack("<i", f.read(4))[0]
            f.seek(34 + sequences * 4 + (sequences - 1) * 8)
            last_pointer = struct.unpack("<q", f.read(8))[0]
            tokens_end = last_pointer + last_length * itemsize
    bin_size = os.path.getsize(binary)
    if tokens_end == 0 or bin_size == 0:
        raise ValueError(f"{binary} holds no tokens; give a dataset with documents in it")
    if bin_size != tokens_end:
        raise ValueError(f"{binary} has {bin_size} bytes, its index needs {tokens_end}: the dataset is truncated "
                         f"or its .bin and .idx do not belong together")
    return tokens_end // itemsize


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int | None) -> None:
    """Raise ValueError when the tokenizer has more ids than the model's embedding table."""
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer vocab size {tokenizer.vocab_size} exceeds model vocab size "
            f"{model_vocab_size}; use a model with at least {tokenizer.vocab_size} embeddings "
            "or a smaller tokenizer"
        )


def _megatron_blend(blend: Blend) -> tuple[list[str], list[float] | None]:
    """Convert to megatron's (prefixes, weights); a single dataset gets weights None.

    With weights None megatron uses the one dataset directly instead of wrapping it in a
    pointless single-member BlendedDataset.
    """
    prefixes = [prefix for _, prefix in blend]
    weights = [weight for weight, _ in blend] if len(blend) > 1 else None
    return prefixes, weights


def _check_num_samples(num_samples: Sequence[int]) -> tuple[int, int, int]:
    """Validate (train, valid, test) sample counts."""
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples!r}")
    for name, value in zip(("train", "valid", "test"), num_samples, strict=True):
        _require_int(f"num_samples {name}", value, 0)
    return tuple(num_samples)


def _blend_args(cfg: DataConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """The blend/blend_per_split/split arguments of GPTDatasetConfig for ``cfg``."""
    if cfg.blend is None:
        train, valid = prepare_embedded_corpus(cfg.cache_dir, tokenizer)
        return {"blend_per_split": [([train], None), ([valid], None), None], "split": None}
    if cfg.valid_blend is None:
        return {"blend": _megatron_blend(cfg.blend), "split": cfg.split}
    return {
        "blend_per_split": [_megatron_blend(cfg.blend), _megatron_blend(cfg.valid_blend), None],
        "split": None,
    }


def _needs_blended_dataset(blend_args: dict[str, Any]) -> bool:
    """Whether megatron will build a BlendedDataset (some split mixes several datasets)."""
    blends = [blend_args.get("blend"), *(blend_args.get("blend_per_split") or [])]
    return any(blend is not None and len(blend[0]) > 1 for blend in blends)


def _is_built_on_rank() -> bool:
    """Every rank builds (and reads) its own datasets; megatron orders rank 0 first."""
    return True


def build_datasets(
    cfg: DataConfig,
    tokenizer: Tokenizer | None,
    num_samples: tuple[int, int, int],
    *,
    model_vocab_size: int | None = None,
) -> tuple[Any, Any, Any]:
    """Build the (train, valid, test) megatron datasets for ``cfg``; absent splits are None.

    ``tokenizer`` None loads ``cfg.tokenizer`` or the default one. ``num_samples`` is the
    minimum number of samples per split; megatron repeats (reshuffled) epochs of the data to
    reach it. Each sample is a dict with ``BATCH_KEYS`` (plus ``dataset_id`` for blends).
    Inputs are validated before any work: missing blend files, and a tokenizer larger than
    ``model_vocab_size``, raise errors naming them.
    """
    sizes = _check_num_samples(num_samples)
    if cfg.blend is not None:
        check_blend_paths(cfg.blend)
        check_blend_paths(cfg.valid_blend or ())
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg)
    check_vocab_fits(tokenizer, model_vocab_size)
    blend_args = _blend_args(cfg, tokenizer)
    config = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        tokenizer=tokenizer,
        path_to_cache=os.path.join(cfg.cache_dir, "megatron-index"),
        create_attention_mask=False,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        **blend_args,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(sizes), _is_built_on_rank, config)
    with private_world() if _needs_blended_dataset(blend_args) else contextlib.nullcontext():
        train, valid, test = builder.build()
    return train, valid, test


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples into a micro-batch with ``BATCH_KEYS`` and fixed dtypes; any other key whose
    value is a tensor (a cached teacher target, distill/logits_cache.py) is stacked as it is."""
    dtypes = {
        "tokens": torch.int64,
        "labels": torch.int64,
        "loss_mask": torch.float32,
        "position_ids": torch.int64,
    }
    batch = {
        key: torch.stack([torch.as_tensor(sample[key]) for sample in samples]).to(dtype)
        for key, dtype in dtypes.items()
    }
    for key, value in samples[0].items():
        if key not in batch and isinstance(value, torch.Tensor):
            batch[key] = torch.stack([sample[key] for sample in samples])
    return batch


def _check_sharding(micro_batch_size: int, dp_rank: int, dp_size: int, start_sample: int) -> None:
    """Validate batch_iterator's sharding arguments."""
    _require_int("micro_batch_size", micro_batch_size, 1)
    _require_int("dp_size", dp_size, 1)
    _require_int("start_sample", start_sample, 0)
    _require_int("dp_rank", dp_rank, 0)
    if dp_rank >= dp_size:
        raise ValueError(f"dp_rank {dp_rank} must be smaller than dp_size {dp_size}")


def batch_iterator(
    dataset: Any,
    *,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    start_sample: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield this data-parallel rank's micro-batches forever.

    Sample assignment follows Megatron-LM's MegatronPretrainingSampler: the k-th global
    batch is the ``micro_batch_size * dp_size`` consecutive samples starting at
    ``start_sample + k * micro_batch_size * dp_size``, and rank ``r`` takes the slice
    ``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of it. Passing the number of
    samples consumed so far as ``start_sample`` resumes the stream exactly.

    The iterator never ends: sample indices wrap modulo ``len(dataset)``, i.e. after the
    last sample the same (already shuffled) sequence starts again, with a warning. Build the
    dataset with enough ``num_samples`` for the whole run to avoid repeats.

    Each micro-batch maps ``tokens``/``labels``/``position_ids`` to int64 and ``loss_mask``
    to float32 tensors of shape [micro_batch_size, seq_length]. Arguments are checked when
    this function is called, not on the first ``next()``.
    """
    _check_sharding(micro_batch_size, dp_rank, dp_size, start_sample)
    if dataset is None or len(dataset) == 0:
        raise ValueError("batch_iterator needs a non-empty dataset; check num_samples and split")
    return _micro_batches(dataset, micro_batch_size, dp_rank, dp_size, start_sample)


def _micro_batches(
    dataset: Any, micro_batch_size: int, dp_rank: int, dp_size: int, start_sample: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The generator behind ``batch_iterator`` (arguments already validated)."""
    size = len(dataset)
    global_batch_size = micro_batch_size * dp_size
    batch_start = start_sample
    warned = False
    while True:
        first = batch_start + dp_rank * micro_batch_size
        if not warned and first + micro_batch_size > size:
            warnings.warn(
                f"batch_iterator passed the end of the dataset ({size} samples) and wraps "
                "around; build it with more num_samples to avoid repeating data",
                stacklevel=2,
            )
            warned = True
        indices = [(first + offset) % size for offset in range(micro_batch_size)]
        yield collate([dataset[index] for index in indices])
        batch_start += global_batch_size


def prefetched(batches: Iterator[dict[str, torch.Tensor]], *, depth: int = 2,
               pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """``batches`` read ``depth`` micro-batches ahead by a background thread, in the same order, so that
    reading them (a logits cache: files of teacher targets) overlaps the step instead of preceding it.

    An error raised while reading one is raised here when that micro-batch is due. ``pin_memory``
    (CUDA runs) pins each batch so that ``.to(device, non_blocking=True)`` copies asynchronously. The
    thread stops, and is waited for, when this generator is closed or collected (a validation pass dropping
    its iterator), and at interpreter exit for a generator still open then: a daemon thread left inside a
    torch operation while the interpreter shuts down aborts the process ("terminate called without an
    active exception")."""
    import queue
    import threading

    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1 micro-batches, got {depth}")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for batch in batches:
                if stop.is_set():
                    return
                if pin_memory:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                if not offer((batch, None)):
                    return
        except BaseException as error:  # handed to the consumer, raised where the batch was due
            offer((None, error))

    thread = threading.Thread(target=fill, name="prefetched-batches", daemon=True)
    entry = (stop, thread)
    _PREFETCHING.add(entry)
    thread.start()
    try:
        while True:
            batch, error = ready.get()
            if error is not None:
                raise error
            yield batch
    finally:
        stop.set()
        if not sys.is_finalizing():  # past atexit a daemon thread cannot run again: joining it would hang
            thread.join()
        _PREFETCHING.discard(entry)


_PREFETCHING: set = set()
"""(stop event, thread) of each `prefetched` reader still running."""


@atexit.register
def _stop_prefetching() -> None:
    """Stop every prefetch thread and wait for it before the interpreter shuts down (atexit runs while
    daemon threads still run): each leaves within its 0.1 s put timeout or after the batch it is reading."""
    for stop, _ in list(_PREFETCHING):
        stop.set()
    for _, thread in list(_PREFETCHING):
        thread.join()


def run_batches(data_cfg, tokenizer, cfg, runtime, *, model_vocab_size: int, train_iters=None) -> dict:
    """`train_batches(start_sample)` and `valid_batches()` (None without validation data) of a training
    run: megatron datasets sized for train_iters (default cfg.train_iters) and cfg.eval_iters global
    batches, each rank taking its data-parallel share."""
    steps = train_iters or cfg.train_iters
    train_ds, valid_ds, _ = build_datasets(data_cfg, tokenizer, (steps * cfg.global_batch_size,
                                                                 cfg.eval_iters * cfg.global_batch_size, 0),
                                           model_vocab_size=model_vocab_size)
    dp = dict(micro_batch_size=cfg.micro_batch_size, dp_rank=runtime.dp_rank, dp_size=runtime.data_parallel)
    return {"train_batches": lambda start: batch_iterator(train_ds, start_sample=start, **dp),
            "valid_batches": (lambda: batch_iterator(valid_ds, **dp)) if valid_ds is not None else None}


def tokenizer_json(data_cfg, tokenizer) -> dict:
    """The tokenizer reference stored in checkpoints (keeps an explicit HF eod token)."""
    return (data_cfg.tokenizer or tokenizer.ref).to_json()
