"""`import_hf`: a local Hugging Face model directory -> a self-describing torch_dist checkpoint.

    import_hf("models/Llama-3.1-8B", "runs/teacher")        # then: minitron importance --load runs/teacher ...

No model is built and no process group is needed: the checkpoint's DCP storage is written directly
with the pruner's writer (model/storage.py), one megatron tensor (one layer of it) at a time. For each
entry of the family's table (families.py) the importer reads that layer's HF tensors with `readinto`,
fuses them by the table's rule (rules.py) and appends the result as one DCP chunk at the layer's
offset of the stacked global tensor. Peak memory is a few of the largest tensors (the embedding, or
one layer's q/k/v), whatever the model size; the vocabulary padding megatron needs is written as a
separate zero chunk, so the embedding is never copied into a padded buffer.

Everything that can fail is checked before the first byte is written: the config (family, every
option), every tensor the table needs (present, in the file the index names, of the expected shape,
the file long enough) and no tensor left unmapped, the tokenizer (its vocabulary must fit the model's)
and the output path. The checkpoint is assembled in `.NAME.partial` beside the output and renamed into
place at the end, so a failure leaves nothing that looks finished.

Layout written (Megatron-LM's, loadable at any TP/PP by `model/checkpoint.py` and by Megatron-LM):
`ROOT/latest_checkpointed_iteration.txt` = release, `ROOT/release/` (DCP `.metadata`, `__0_0.distcp`,
`metadata.json`, `common.pt` with Megatron-LM args, `minitron.json`), `ROOT/tokenizer/` (the model's
tokenizer files) and `ROOT/hf/` (its config.json and generation_config.json, which the exporter
reuses for every setting that is not architecture).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_minitron.config import ArchConfig, ConfigError
from megatron_minitron.hf import files
from megatron_minitron.hf.families import Family, TensorMap, family_for_config, hf_name
from megatron_minitron.hf.files import HFError, TensorEntry
from megatron_minitron.hf.rules import Copy, Vocab, extra_state_keys, megatron_shape
from megatron_minitron.model import checkpoint as ckpt
from megatron_minitron.model.integrity import write_checksums
from megatron_minitron.runtime.host_memory import peak_rss_mb

HF_DIR = "hf"
"""Directory of an imported checkpoint holding the source config.json and generation_config.json."""

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                     "common_backend_version": 1}
"""megatron's `metadata.json`: the marker of a finished torch_dist directory."""

CHUNK_BYTES = 64 << 20
"""Largest block of a plain tensor read and written at once (larger ones go in row blocks)."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _extra_state_bytes() -> bytes:
    """What megatron stores for a local-spec linear layer's `_extra_state` (get_extra_state() is None,
    saved as the list of the objects of its shards)."""
    buffer = io.BytesIO()
    torch.save([None], buffer)
    return buffer.getvalue()


@dataclass(frozen=True)
class Unit:
    """One checkpoint tensor (one layer of it) and the HF tensors it is made of."""

    entry: TensorMap
    layer: Optional[int]
    sources: tuple[TensorEntry, ...]
    shape: tuple[int, ...]
    """Shape of this layer's megatron tensor (without the layer axis; with the expert axis for experts)."""
    expert: Optional[int] = None
    """The routed expert of an expert tensor (its HF tensors are this expert's)."""


@dataclass(frozen=True)
class ImportPlan:
    """Everything import_hf checked, ready to write."""

    hf: files.HFDirectory
    family: Family
    arch: ArchConfig
    units: tuple[Unit, ...]
    tokenizer: Optional[dict]
    """Reference stored in minitron.json ({"kind", "path", "eod_token"} relative to the checkpoint root)."""
    tokenizer_files: tuple[Path, ...]
    dtype: Optional[torch.dtype]


# ------------------------------------------------------------------------------------------ checks
def plan_import(hf_dir: str | os.PathLike, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                dtype: Optional[str] = None) -> ImportPlan:
    """Read and check an HF directory (config, tensors, tokenizer) without writing anything."""
    if dtype is not None and dtype not in DTYPES:
        raise HFError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    hf = files.scan(hf_dir)
    family = family_for_config(hf.config)
    if tensor_parallel < 1 or pipeline_parallel < 1:
        raise HFError(f"--tp and --pp must be >= 1, got {tensor_parallel} and {pipeline_parallel}")
    arch = family.arch_from_config(hf.config, pad_to=128 * tensor_parallel)
    try:
        arch.check_parallel(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel)
    except ConfigError as error:
        raise HFError(f"{hf.path / files.CONFIG}: {error}") from None
    units = _units(hf, family, arch)
    tokenizer, tokenizer_files = _tokenizer(hf, arch)
    return ImportPlan(hf=hf, family=family, arch=arch, units=tuple(units), tokenizer=tokenizer,
                      tokenizer_files=tuple(tokenizer_files), dtype=DTYPES[dtype] if dtype else None)


def _units(hf: files.HFDirectory, family: Family, arch: ArchConfig) -> list[Unit]:
    """Every (table entry, layer) with its HF tensors, after checking names and shapes; no tensor of the
    directory may be left unmapped (it would mean an option the table does not know)."""
    strip, first = "", family.tensors[0].hf[0]
    if family.optional_prefix and first not in hf.tensors and \
            hf_name(first, None, family.optional_prefix) in hf.tensors:
        strip = family.optional_prefix
    used: set[str] = set()
    units = []
    for entry in family.tensors:
        if not entry.applies(arch):
            continue
        shape = megatron_shape(entry.megatron, arch)
        expected = entry.rule.hf_shapes(shape[1:] if entry.experts else shape, arch)
        experts = range(arch.num_experts) if entry.experts else [None]
        for layer, expert in ((i, e) for i in (range(arch.num_layers) if entry.layered else [None]) for e in experts):
            sources = []
            for name_template, want in zip(entry.hf, expected):
                name = hf_name(name_template, layer, strip, expert)
                found = hf.tensors.get(name)
                if found is None:
                    raise HFError(f"{hf.path} has no tensor {name!r}, which a {family.model_type} model with this "
                                  f"config.json needs (missing shard, or a config that does not match the weights)")
                if found.shape != tuple(want):
                    raise HFError(f"{found.path}: tensor {name!r} has shape {list(found.shape)}, config.json implies "
                                  f"{list(want)}")
                if not found.dtype.is_floating_point:
                    raise HFError(f"{found.path}: tensor {name!r} has dtype {found.dtype}; weights must be "
                                  f"floating point")
                used.add(name)
                sources.append(found)
            units.append(Unit(entry=entry, layer=layer, sources=tuple(sources), shape=shape, expert=expert))
    def ignorable(name: str) -> bool:
        # Buffers some checkpoints carry, and a tied output matrix stored a second time.
        return bool(family.ignored) and name.endswith(family.ignored) or (
            name == "lm_head.weight" and not arch.untie_embeddings_and_output_weights)

    leftover = sorted(name for name in set(hf.tensors) - used if not ignorable(name))
    if leftover:
        raise HFError(f"{hf.path} holds tensors the {family.model_type} table does not map, e.g. {leftover[:4]} "
                      f"({len(leftover)} in all): an option this importer does not support")
    return units


def _eos_token(hf: files.HFDirectory, id_to_token: Callable[[int], Optional[str]]) -> Optional[str]:
    tok_config = hf.path / "tokenizer_config.json"
    if tok_config.is_file():
        eos = files.read_json(tok_config, "the tokenizer configuration").get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            return eos
    eos_id = hf.config.get("eos_token_id")
    if isinstance(eos_id, list):
        eos_id = eos_id[0] if eos_id else None
    return id_to_token(eos_id) if isinstance(eos_id, int) else None


def _tokenizer(hf: files.HFDirectory, arch: ArchConfig) -> tuple[Optional[dict], list[Path]]:
    """The tokenizer reference and the files to copy; HFError when its vocabulary exceeds the model's."""
    present = [hf.path / name for name in files.TOKENIZER_FILES if (hf.path / name).is_file()]
    if (hf.path / "tokenizer.json").is_file():
        path = hf.path / "tokenizer.json"
        size, id_to_token = _hf_tokenizer_vocab(path)
        ref = {"kind": "huggingface", "path": f"{ckpt.TOKENIZER_DIR}/tokenizer.json",
               "eod_token": _eos_token(hf, id_to_token)}
    elif (hf.path / "tokenizer.model").is_file():
        import sentencepiece

        path = hf.path / "tokenizer.model"
        try:
            processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as error:  # sentencepiece raises RuntimeError/OSError with its own text
            raise HFError(f"{path} is not a readable SentencePiece model: {error}") from None
        size = processor.get_piece_size()
        ref = {"kind": "sentencepiece", "path": f"{ckpt.TOKENIZER_DIR}/tokenizer.model", "eod_token": None}
    else:
        return None, []
    if size > arch.vocab_size:
        raise HFError(f"tokenizer {path} has {size} tokens, more than config.json vocab_size={arch.vocab_size}: "
                      f"ids >= {arch.vocab_size} would have no embedding")
    return ref, present


def _hf_tokenizer_vocab(path: Path) -> tuple[int, Callable[[int], Optional[str]]]:
    """Number of ids of a tokenizer.json (added tokens included) and an id -> token lookup."""
    try:
        import tokenizers
    except ImportError:
        tokenizers = None
    if tokenizers is not None:
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception subclass from Rust
            raise HFError(f"{path} is not a readable tokenizer.json: {error}") from None
        return tok.get_vocab_size(with_added_tokens=True), tok.id_to_token
    data = files.read_json(path, "the tokenizer")
    vocab = (data.get("model") or {}).get("vocab") or {}
    pairs = {i: piece[0] for i, piece in enumerate(vocab)} if isinstance(vocab, list) else \
        {i: token for token, i in vocab.items()}
    pairs.update({t["id"]: t["content"] for t in data.get("added_tokens") or []})
    return (max(pairs) + 1 if pairs else 0), pairs.get


def check_output(out: Path, overwrite: bool, source: Path, *, previous=ckpt.is_checkpoint_dir,
                 what: str = "checkpoint") -> None:
    """The output may not exist (unless overwrite and it is a previous output of the same kind:
    `previous(out)`) and may not be inside or around the source."""
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise HFError(f"output {out} overlaps the source {source}; choose a path outside it")
    if out.exists() and not out.is_dir():
        raise HFError(f"output {out} exists and is not a directory")
    try:
        ckpt.check_new_output(out, overwrite=overwrite, previous=previous, what=what)
    except ConfigError as error:
        raise HFError(str(error)) from None


# ------------------------------------------------------------------------------------------ writes
def import_hf(hf_dir: str | os.PathLike, save: str | os.PathLike, *, tensor_parallel: int = 1,
              pipeline_parallel: int = 1, dtype: Optional[str] = None, overwrite: bool = False,
              print_fn: Callable[[str], None] = print, stats: Optional[dict] = None, fsync: bool = True,
              chunk_bytes: int = CHUNK_BYTES) -> Path:
    """Write the checkpoint of an HF model directory under `save`; returns its torch_dist directory.

    tensor_parallel/pipeline_parallel: the layout the checkpoint is meant for (it loads at any layout;
    these pad the vocabulary to a multiple of 128 x TP, as Megatron-LM does, and check divisibility).
    dtype: "float32", "bfloat16" or "float16" to convert; None keeps each tensor's stored dtype.
    stats: filled with seconds, bytes_read, bytes_written and peak_rss_mb.
    fsync: flush the written tensors to disk before the final rename (off only to measure).
    chunk_bytes: tensors larger than this without a fusion rule are copied in row blocks of this size.
    """
    start = time.monotonic()
    out = Path(save)
    plan = plan_import(hf_dir, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel, dtype=dtype)
    check_output(out, overwrite, plan.hf.path)
    with ckpt.writing(out, overwrite=overwrite, error=HFError) as partial:
        release = partial / "release"
        release.mkdir()
        read, written, shards = _write_tensors(plan, release, fsync, chunk_bytes)
        _write_metadata(plan, partial, release, tensor_parallel, pipeline_parallel, shards)
    seconds = time.monotonic() - start
    if stats is not None:
        stats.update(seconds=seconds, bytes_read=read, bytes_written=written, peak_rss_mb=peak_rss_mb())
    print_fn(f"import-hf: wrote {out} ({plan.family.model_type}, {plan.arch.num_parameters():,} parameters, "
             f"{read / 1e6:.1f} MB read, {seconds:.1f}s)")
    return ckpt.iteration_dir(out, None)


def _write_tensors(plan: ImportPlan, release: Path, fsync: bool = True,
                   chunk_bytes: int = CHUNK_BYTES) -> tuple[int, int, dict]:
    """Bytes read, bytes written, and the checksums.json entries of the shard (hashed as written)."""
    from megatron_minitron.model import storage

    arch = plan.arch
    reader = files.TensorReader()
    writer = storage.ChunkWriter(release, "__0_0.distcp", fsync=fsync)
    try:
        for unit in plan.units:
            key, rule = unit.entry.megatron, unit.entry.rule

            def write(block: torch.Tensor, row: int) -> None:
                if plan.dtype is not None:
                    block = block.to(plan.dtype)
                offsets = (row,) + (0,) * (block.dim() - 1)
                if unit.expert is not None:
                    offsets = (unit.expert,) + offsets
                    block = block.unsqueeze(0)
                if unit.layer is None:
                    writer.tensor(key, block, offsets, unit.shape)
                else:
                    writer.tensor(key, block.unsqueeze(0), (unit.layer,) + offsets, (arch.num_layers,) + unit.shape)

            source = unit.sources[0]
            if type(rule) in (Copy, Vocab) and source.shape and source.nbytes > chunk_bytes:
                # A large plain tensor (the embedding, the output layer) goes in row blocks: memory stays
                # at one block whatever the vocabulary.
                step = max(1, chunk_bytes // (source.nbytes // source.shape[0]))
                for r0 in range(0, source.shape[0], step):
                    write(reader.read(source, (r0, min(r0 + step, source.shape[0]))), r0)
            else:
                for row, block in rule.row_blocks([reader.read(s) for s in unit.sources], arch):
                    write(block, row)
            rows = source.shape[0] if source.shape else 0
            if isinstance(rule, Vocab) and unit.shape[0] > rows:
                write(torch.zeros((unit.shape[0] - rows,) + tuple(unit.shape[1:]), dtype=source.dtype), rows)
        extra = _extra_state_bytes()
        for key in extra_state_keys(arch):
            writer.object(key, extra)
    finally:
        reader.close()
        writer.close()
    storage.write_metadata(release, writer.records, fsync=fsync)
    return reader.bytes_read, writer.bytes_written, {writer.name: writer.checksum}


def _write_metadata(plan: ImportPlan, partial: Path, release: Path, tp: int, pp: int, shards: dict) -> None:
    arch = plan.arch.explicit()
    extra = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
    if plan.tokenizer is not None:
        extra["tokenizer_type"] = ("HuggingFaceTokenizer" if plan.tokenizer["kind"] == "huggingface"
                                   else "SentencePieceTokenizer")
        extra["tokenizer_model"] = plan.tokenizer["path"]
    torch.save({"checkpoint_version": 3.0, "iteration": 0, "args": ckpt.megatron_args_from_arch(arch, **extra)},
               release / "common.pt")
    if plan.tokenizer_files:
        (partial / ckpt.TOKENIZER_DIR).mkdir()
        for path in plan.tokenizer_files:
            shutil.copyfile(path, partial / ckpt.TOKENIZER_DIR / path.name)
    (partial / HF_DIR).mkdir()
    for name in (files.CONFIG, files.GENERATION_CONFIG):
        if (plan.hf.path / name).is_file():
            shutil.copyfile(plan.hf.path / name, partial / HF_DIR / name)
    meta = {"format": ckpt.FORMAT, "architecture": arch.to_json(), "iteration": 0,
            "num_parameters": arch.num_parameters(), "num_active_parameters": arch.num_active_parameters(),
            "provenance": {"command": "import-hf", "hf_source": str(plan.hf.path.resolve()),
                           "model_type": plan.family.model_type, "hf_config": f"{HF_DIR}/{files.CONFIG}"}}
    if plan.tokenizer is not None:
        meta["tokenizer"] = plan.tokenizer
    (release / ckpt.META).write_text(ckpt.meta_text(meta))
    (release / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))  # the finished marker: last
    write_checksums(release, known=shards)
    (partial / ckpt.TRACKER).write_text("release")
