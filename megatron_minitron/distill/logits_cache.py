"""A teacher's top-k logits on disk: written once by `minitron cache-logits`, read by every student that
distills from it (`minitron distill/search --teacher-logits`) instead of running the teacher.

Layout of a cache directory:
    manifest.json            what the cache was made from (`CacheManifest`); `complete` once every shard is written
    train_000000.bin ...     one shard per global batch of samples of the training split (sample i in
    valid_000000.bin ...     shard i // global_batch_size), then the validation split the same way
    metrics.json             throughput of the last run that wrote into it
Each shard holds, for its n samples of S tokens, five little-endian arrays one after the other:
    tokens int32 [n, S] | ids int32 [n, S, K] | log-probabilities float32 [n, S, K] | log rest float32 [n, S]
    | label log-probability float32 [n, S]
(`cached_kl.teacher_top_k`'s three tensors; the input tokens, so that a reader proves it pairs each
target with the sample it was computed on; and the teacher's log-probability of each token's label at
temperature 1, minus its LM loss, so that a cached run reports the teacher's LM loss as an online one does). A shard is written to `NAME.partial` and renamed when whole:
after a kill, a shard that is missing or has another size than its samples need is (re)done, and the
manifest says `complete` only when none is left.

The samples are exactly those a training run with the same data flags consumes, in its order: megatron's
GPTDataset built for train_iters x global_batch_size (and eval_iters x global_batch_size validation)
samples, sample index = consumed-sample index; a shard does not depend on the data-parallel size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from megatron_minitron.config import ConfigError

FORMAT = "minitron-logits-cache/2"
"""Version of the layout: /1 had no label log-probabilities (refused, to be written again)."""
MANIFEST = "manifest.json"
METRICS = "metrics.json"
"""Throughput of the last `cache-logits` run into the directory (samples and bytes it wrote, seconds)."""
SPLITS = ("train", "valid")
TARGET_KEYS = ("teacher_ids", "teacher_logp", "teacher_rest")
"""Keys of the KL targets a cached micro-batch carries beside data/loader.BATCH_KEYS (`cached_kl`'s arguments)."""
LABEL_KEY = "teacher_label_logp"
"""Key of the teacher's log-probability of each label (temperature 1), also in a cached micro-batch."""


@dataclass(frozen=True, kw_only=True)
class CacheManifest:
    """What a logits cache was computed from, and how it is laid out."""

    teacher: str
    """Path of the teacher checkpoint (for people; the fingerprint is what is checked)."""
    teacher_fingerprint: str
    """Content fingerprint of the teacher's torch_dist directory (model/integrity.py)."""
    teacher_arch: dict
    """The teacher's architecture (ArchConfig JSON)."""
    tokenizer_fingerprint: str
    """Fingerprint of the tokenizer the samples were cut with."""
    vocab_size: int
    """The teacher's vocabulary size (tokenizer ids)."""
    padded_vocab: int
    """The teacher's padded vocabulary: cached ids index it, and a student must have the same."""
    data: dict
    """The data settings that decide which samples a run sees: blend, valid_blend, split, seed, seq_length."""
    train_iters: int
    """Training iterations covered (the training split holds train_iters x global_batch_size samples)."""
    global_batch_size: int
    """Samples per training step; also the samples of one shard."""
    eval_iters: int
    """Validation iterations covered (eval_iters x global_batch_size validation samples; 0 without validation)."""
    top_k: int
    """Tokens kept per position (K); K = padded_vocab keeps the whole distribution."""
    temperature: float
    """Softmax temperature of the cached log-probabilities; a run must distill at the same one."""
    complete: bool = False
    """Every shard is written (set last)."""
    format: str = FORMAT
    """Version of this layout."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CacheManifest":
        known = {f.name for f in dataclasses.fields(cls)}
        if str(data.get("format", "")).startswith("minitron-logits-cache/") and data["format"] != FORMAT:
            raise ConfigError(f"the cache is in format {data['format']!r}, this version reads {FORMAT!r} (it also "
                              f"stores the teacher's log-probability of each label); write it again with "
                              f"`minitron cache-logits ... --overwrite`")
        if data.get("format") != FORMAT or set(data) - known:
            raise ConfigError(f"not a {FORMAT} manifest (format {data.get('format')!r}, keys "
                              f"{sorted(set(data) - known)} unknown); write the cache with this version")
        return cls(**data)

    @property
    def seq_length(self) -> int:
        return int(self.data["seq_length"])

    def samples(self, split: str) -> int:
        iters = self.train_iters if split == "train" else self.eval_iters
        return iters * self.global_batch_size

    def num_shards(self, split: str) -> int:
        return -(-self.samples(split) // self.global_batch_size)

    def shard_samples(self, split: str, index: int) -> int:
        return min(self.global_batch_size, self.samples(split) - index * self.global_batch_size)

    def sample_bytes(self) -> int:
        """Bytes of one sample: tokens, rest and label log-prob (4 bytes a token each), ids and log-probs (4 bytes
        x K each)."""
        return self.seq_length * (12 + 8 * self.top_k)

    def total_bytes(self) -> int:
        return sum(self.samples(split) for split in SPLITS) * self.sample_bytes()


def data_settings(data_cfg) -> dict:
    """The part of a DataConfig that decides the samples (not where caches live, not the tokenizer's path)."""
    data = data_cfg.to_json()
    return {key: data[key] for key in ("blend", "valid_blend", "split", "seed", "seq_length")}


def shard_path(root: Path, split: str, index: int) -> Path:
    return Path(root) / f"{split}_{index:06d}.bin"


def missing_shards(root: Path, manifest: CacheManifest, split: str) -> list[int]:
    """Shards absent or of another size than their samples need (cut short by a kill, or damaged)."""
    return [i for i in range(manifest.num_shards(split))
            if not _whole(shard_path(root, split, i), manifest.shard_samples(split, i) * manifest.sample_bytes())]


def _whole(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def read_manifest(root: Path) -> Optional[CacheManifest]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        return CacheManifest.from_json(json.loads(path.read_text()))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{path} is damaged ({error}); write the cache again with --overwrite") from None


def write_manifest(root: Path, manifest: CacheManifest) -> None:
    tmp = Path(root) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    tmp.replace(Path(root) / MANIFEST)


def compare(cache: CacheManifest, expected: dict, *, where: str) -> None:
    """Refuse a cache made from something else: `expected` maps manifest fields (a dotted name for one key
    of `data`) to this run's values; the first difference is named with both values."""
    for name, value in expected.items():
        section, _, key = name.partition(".")
        found = cache.data.get(key) if section == "data" else getattr(cache, name)
        if json.loads(json.dumps(found)) != json.loads(json.dumps(value)):
            raise ConfigError(f"--teacher-logits {where} was written for {name} {found!r}, this run has {value!r}; "
                              f"write a cache for this run with `minitron cache-logits` and the same flags")


def check_space(out: Path, need: int) -> None:
    """Refuse before the first forward pass when the filesystem of `out` cannot hold `need` more bytes."""
    from megatron_minitron.model.checkpoint import nearest_existing

    free = shutil.disk_usage(nearest_existing(out)).free
    if free < need:
        raise ConfigError(f"--out {out}: the cache needs {need / 1e6:,.1f} MB more, its filesystem has "
                          f"{free / 1e6:,.1f} MB free; free space, lower --top-k or choose another --out")


# ------------------------------------------------------------------------------------------- shards
def write_shard(path: Path, tokens: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, rest: torch.Tensor,
                label_logp: torch.Tensor) -> None:
    """One shard, renamed into place only when fully written and flushed."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        for tensor, dtype in ((tokens, np.int32), (ids, np.int32), (logp, np.float32), (rest, np.float32),
                              (label_logp, np.float32)):
            f.write(np.ascontiguousarray(tensor.detach().cpu().numpy().astype(dtype, copy=False)).tobytes())
        f.flush()
        os.fsync(f.fileno())
    partial.replace(path)


class LogitsCache:
    """A complete cache opened for reading; `sample(split, i)` maps the shard's bytes (no copy until used)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise ConfigError(f"--teacher-logits {self.root} holds no {MANIFEST}; write it with "
                              f"`minitron cache-logits --out {self.root}`")
        for split in SPLITS:
            missing = missing_shards(self.root, manifest, split)
            if missing:
                raise ConfigError(f"--teacher-logits {self.root} is incomplete: {len(missing)} {split} shard(s) "
                                  f"missing or cut short (first {shard_path(self.root, split, missing[0]).name}); "
                                  f"run the same `minitron cache-logits` command again to complete it")
        if not manifest.complete:
            raise ConfigError(f"--teacher-logits {self.root}: {MANIFEST} does not mark the cache complete; run the "
                              f"same `minitron cache-logits` command again to complete it")
        self.manifest = manifest
        self._maps: dict[tuple[str, int], tuple[np.ndarray, ...]] = {}

    def _shard(self, split: str, index: int) -> tuple[np.ndarray, ...]:
        key = (split, index)
        if key not in self._maps:
            m, n = self.manifest, self.manifest.shard_samples(split, index)
            s, k = m.seq_length, m.top_k
            path, offset, arrays = shard_path(self.root, split, index), 0, []
            for dtype, shape in ((np.int32, (n, s)), (np.int32, (n, s, k)), (np.float32, (n, s, k)),
                                 (np.float32, (n, s)), (np.float32, (n, s))):
                arrays.append(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape))
                offset += int(np.prod(shape)) * 4
            self._maps[key] = tuple(arrays)
        return self._maps[key]

    def sample(self, split: str, index: int) -> dict[str, torch.Tensor]:
        """{"tokens", *TARGET_KEYS, LABEL_KEY} of one sample (ids as int32, the rest as stored)."""
        if not 0 <= index < self.manifest.samples(split):
            raise ConfigError(f"--teacher-logits {self.root} holds {self.manifest.samples(split)} {split} samples, "
                              f"sample {index} was asked for; write a cache covering the whole run")
        arrays = (torch.from_numpy(np.array(a[index % self.manifest.global_batch_size]))
                  for a in self._shard(split, index // self.manifest.global_batch_size))
        return dict(zip(("tokens", *TARGET_KEYS, LABEL_KEY), arrays))


class WithTeacherTargets:
    """A megatron dataset whose samples also carry the cached teacher targets of the same index; every
    sample's tokens are compared with the cached ones, so a cache from other data cannot be used silently."""

    def __init__(self, dataset, cache: LogitsCache, split: str) -> None:
        self.dataset, self.cache, self.split = dataset, cache, split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        cached = self.cache.sample(self.split, index)
        if not torch.equal(cached.pop("tokens").long(), torch.as_tensor(sample["tokens"]).long()):
            raise ConfigError(f"--teacher-logits {self.cache.root}: {self.split} sample {index} holds other tokens than "
                              f"this run's data; the cache was written from other data or another order")
        return {**sample, **cached}


# --------------------------------------------------------------------------------------- the writer
def write_split(model, runtime, dataset, *, split: str, manifest: CacheManifest, out: Path, micro_batch_size: int,
                todo: list[int], progress: Optional[Callable[[int], None]] = None) -> None:
    """The teacher's targets for the shards `todo` of one split: data-parallel replica r does shards r, r + DP, …
    (each pipeline of TP ranks as one), the last stage's first TP rank writes them."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_minitron.data.loader import collate
    from megatron_minitron.distill.cached_kl import teacher_top_k
    from megatron_minitron.distill.losses import reported_cross_entropy

    device, gbs = runtime.device, manifest.global_batch_size
    mine = [i for i in todo if i % runtime.data_parallel == runtime.dp_rank]
    model.eval()
    for index in mine:
        n = manifest.shard_samples(split, index)
        micro = (collate([dataset[index * gbs + j + o] for o in range(micro_batch_size)])
                 for j in range(0, n, micro_batch_size))
        parts: list[tuple[torch.Tensor, ...]] = []

        def forward_step(data_iterator, chunk):
            batch = next(data_iterator)
            tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
            logits = chunk(tokens, batch["position_ids"].to(device), None)

            def targets(output):
                ids, logp, rest = teacher_top_k(output, k=manifest.top_k, group=runtime.tp_group,
                                                temperature=manifest.temperature)
                # the online teacher LM loss's own computation (distill/loop.py): no vocabulary-sized copy
                label_logp = reported_cross_entropy(output, labels, group=runtime.tp_group).neg_()
                parts.append((tokens, ids, logp, rest, label_logp))
                zero = output.float().sum() * 0
                return zero, torch.ones((), dtype=torch.int), {"zero": torch.stack([zero, zero])}

            return logits, targets

        with torch.no_grad():
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=micro, model=[model],
                                        num_microbatches=n // micro_batch_size, seq_length=manifest.seq_length,
                                        micro_batch_size=micro_batch_size, forward_only=True)
        if runtime.is_last_stage and runtime.tp_rank == 0:
            write_shard(shard_path(out, split, index), *(torch.cat(t) for t in zip(*parts)))
        if progress is not None:
            progress(n * runtime.data_parallel)


def plan_cache(out: Path, manifest: CacheManifest, *, overwrite: bool) -> dict[str, list[int]]:
    """The shards still to write into `out` ({split: indices}), after refusing an `out` that holds something
    else: another cache (naming the first differing field; --overwrite replaces it) or other files (even with
    --overwrite, which deletes `out`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; choose a new path")
    if any(out.iterdir() if out.is_dir() else ()) and not (out / MANIFEST).is_file():
        # --overwrite deletes --out: only ever a cache (whose manifest is written before any shard)
        raise ConfigError(f"--out {out} exists and is not a logits cache (it has no {MANIFEST}); choose a new path"
                          + ("; --overwrite replaces only a logits cache" if overwrite else ""))
    existing = read_manifest(out) if out.is_dir() and not overwrite else None  # --overwrite: even a damaged one
    if existing is not None:
        fields = [f.name for f in dataclasses.fields(CacheManifest) if f.name not in ("complete", "teacher", "data")]
        found, wanted = existing.to_json(), manifest.to_json()
        for name in [*(f"data.{key}" for key in manifest.data), *fields]:
            section, _, key = name.partition(".")
            old = found["data"].get(key) if section == "data" else found[name]
            new = wanted["data"].get(key) if section == "data" else wanted[name]
            if old != new:
                raise ConfigError(f"--out {out} holds a cache written for {name} {old!r}, this command asks for "
                                  f"{new!r}; pass --overwrite to replace it or choose another --out")
    if existing is None:
        return {split: list(range(manifest.num_shards(split))) for split in SPLITS}
    return {split: missing_shards(out, manifest, split) for split in SPLITS}


def cache_logits(*, teacher_info, runtime, data_cfg, tokenizer, train_iters: int, global_batch_size: int,
                 micro_batch_size: int, eval_iters: int, top_k: int, temperature: float, out: Path,
                 overwrite: bool = False, dtype: Optional[torch.dtype] = None, log=print) -> CacheManifest:
    """Write (or complete) the cache of `teacher_info` for the samples of a run with these data settings.
    Every rank calls it; the announced size is printed and the free space checked before the teacher is
    built. Returns the complete manifest."""
    from megatron_minitron.data.loader import build_datasets
    from megatron_minitron.importance.run import Progress
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.checkpoint import load_checkpoint
    from megatron_minitron.model.integrity import fingerprint

    arch = teacher_info.arch
    train_ds, valid_ds, _ = build_datasets(data_cfg, tokenizer, (train_iters * global_batch_size,
                                                                 eval_iters * global_batch_size, 0),
                                           model_vocab_size=arch.vocab_size)
    manifest = CacheManifest(
        teacher=str(teacher_info.root.resolve()), teacher_fingerprint=fingerprint(teacher_info.path),
        teacher_arch=arch.to_json(), tokenizer_fingerprint=tokenizer.fingerprint, vocab_size=arch.vocab_size,
        padded_vocab=arch.padded_vocab, data=data_settings(data_cfg), train_iters=train_iters,
        global_batch_size=global_batch_size, eval_iters=eval_iters if valid_ds is not None else 0, top_k=top_k,
        temperature=float(temperature))
    todo = plan_cache(out, manifest, overwrite=overwrite)
    runtime.barrier()  # every rank has looked at `out` before anything in it changes
    need = sum(manifest.shard_samples(split, i) for split in SPLITS for i in todo[split]) * manifest.sample_bytes()
    tokens = sum(manifest.samples(split) for split in SPLITS) * manifest.seq_length
    log(f"logits cache: {tokens:,} tokens x top-{top_k} = {manifest.total_bytes() / 1e6:,.1f} MB "
        f"({manifest.sample_bytes() // manifest.seq_length} bytes/token); {need / 1e6:,.1f} MB still to write")
    check_space(out, need)
    if runtime.rank == 0:
        if overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, manifest)  # complete=False until the last shard is in place
    runtime.barrier()
    model = build_model(arch, runtime, dtype=dtype)
    load_checkpoint(teacher_info, model=model)
    total = sum(manifest.shard_samples(split, i) for split in SPLITS for i in todo[split])
    progress = Progress("cache-logits", total, runtime.is_logging_rank)
    start = time.perf_counter()
    for split, dataset in (("train", train_ds), ("valid", valid_ds)):
        if todo[split]:
            write_split(model, runtime, dataset, split=split, manifest=manifest, out=out,
                        micro_batch_size=micro_batch_size, todo=todo[split], progress=progress.update)
    runtime.barrier()
    manifest = dataclasses.replace(manifest, complete=True)
    if runtime.rank == 0:
        for split in SPLITS:  # every shard of every replica, as the reader will check them
            if missing_shards(out, manifest, split):
                raise RuntimeError(f"{out}: shards of {split} missing after every rank finished")
        write_manifest(out, manifest)
        seconds = time.perf_counter() - start
        metrics = {"samples_written": total, "bytes_written": need, "seconds": seconds,
                   "tokens_per_s": total * manifest.seq_length / max(seconds, 1e-9), "world_size": runtime.world_size}
        (out / METRICS).write_text(json.dumps(metrics, indent=1) + "\n")
        log(f"cache-logits: {total} samples in {seconds:.1f} s ({metrics['tokens_per_s']:,.0f} tokens/s)")
    runtime.barrier()
    return manifest


def check_run(cache: "LogitsCache", *, student_arch, data_cfg, train_cfg, distill_cfg,
              teacher_fingerprint: Optional[str] = None) -> None:
    """Refuse a cache that does not hold this distillation run's targets, naming the field: other data,
    order or sequence length, another vocabulary or temperature, another teacher (when --teacher is also
    given), or too few samples; and the options a cache cannot serve."""
    m, where = cache.manifest, str(cache.root)
    if distill_cfg.intermediate_layers:
        raise ConfigError("--intermediate-layers needs the teacher's hidden states, a logits cache holds only its "
                          "top-k logits; distill with --teacher instead of --teacher-logits")
    if distill_cfg.top_k is not None:
        raise ConfigError(f"--kd-top-k: with --teacher-logits the cache's top-{m.top_k} tokens are the support; "
                          f"write a cache with another `cache-logits --top-k` instead")
    expected = {f"data.{key}": value for key, value in data_settings(data_cfg).items()}
    expected.update(vocab_size=student_arch.vocab_size, padded_vocab=student_arch.padded_vocab,
                    temperature=float(distill_cfg.temperature))
    if teacher_fingerprint is not None:
        expected["teacher_fingerprint"] = teacher_fingerprint
    compare(m, expected, where=where)
    gbs = train_cfg.global_batch_size
    if train_cfg.train_iters * gbs > m.samples("train"):
        raise ConfigError(f"--teacher-logits {where} holds {m.samples('train')} training samples, --train-iters "
                          f"{train_cfg.train_iters} x --global-batch-size {gbs} needs {train_cfg.train_iters * gbs}; "
                          f"write a cache with a larger --train-iters")
    if m.samples("valid") and train_cfg.eval_iters * gbs > m.samples("valid"):
        raise ConfigError(f"--teacher-logits {where} holds {m.samples('valid')} validation samples, --eval-iters "
                          f"{train_cfg.eval_iters} x --global-batch-size {gbs} needs {train_cfg.eval_iters * gbs}; "
                          f"lower --eval-iters or write a cache with a larger one")


def check_tokenizer(cache: "LogitsCache", tokenizer) -> None:
    if tokenizer.fingerprint != cache.manifest.tokenizer_fingerprint:
        raise ConfigError(f"--teacher-logits {cache.root} was written for tokenizer_fingerprint "
                          f"{cache.manifest.tokenizer_fingerprint!r}, this run's tokenizer is {tokenizer.fingerprint!r}; "
                          f"write a cache with this run's tokenizer")
