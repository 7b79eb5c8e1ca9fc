"""`export_hf`: any checkpoint this project writes (imported, trained, pruned, distilled) -> a Hugging Face
model directory that transformers loads with no custom code.

    export_hf("runs/student", "hf/student")

The family is the source model's when the checkpoint descends from an import (its `hf/config.json`,
found through the provenance chain of minitron.json: a distilled student names its student, a pruned
checkpoint names what it was pruned from), else `family=` or the family the architecture fits. The
config.json is the source config with every architecture key rewritten from the checkpoint's
ArchConfig (pruned sizes, fewer layers, an explicit head_dim), so token ids and other settings survive.

Streaming: the exporter plans every output tensor (name, dtype, shape) from the architecture first,
cuts the list into shards, and writes each shard's safetensors header before its data; each megatron
tensor (one layer of it) is then read with the pruner's reader (model/storage.py, only the rows
needed: the padded vocabulary rows are never read), split by the family's rule and appended. Peak
memory is one layer's largest tensor plus the embedding. Output goes to `.NAME.partial` and is renamed
into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from megatron_minitron.config import ArchConfig
from megatron_minitron.hf import files
from megatron_minitron.hf.families import Family, TensorMap, family_by_name, family_for_config, hf_name, infer_family
from megatron_minitron.hf.files import HFError, PlannedTensor
from megatron_minitron.hf.importer import CHUNK_BYTES, DTYPES, HF_DIR, check_output
from megatron_minitron.hf.rules import Copy, Vocab, megatron_shape
from megatron_minitron.model import checkpoint as ckpt
from megatron_minitron.model.storage import is_training_state
from megatron_minitron.runtime.host_memory import peak_rss_mb

DEFAULT_SHARD_BYTES = 5 * 1000 ** 3
"""transformers' default max_shard_size (5GB)."""

PROVENANCE_LINKS = ("student", "pruned_from", "init", "teacher")
"""minitron.json provenance keys followed, in order, from a checkpoint without `hf/` to the one it came
from, until an imported checkpoint (with the source model's Hugging Face config) is found."""


@dataclass(frozen=True)
class Item:
    """One megatron tensor (one layer of it) and the HF tensors it becomes."""

    entry: TensorMap
    layer: Optional[int]
    outputs: tuple[PlannedTensor, ...]
    expert: Optional[int] = None
    """The routed expert of an expert tensor."""


@dataclass(frozen=True)
class ExportPlan:
    info: ckpt.CheckpointInfo
    family: Family
    config: dict
    generation_config: dict
    items: tuple[Item, ...]
    shards: tuple[tuple[PlannedTensor, ...], ...]
    tokenizer_files: tuple[tuple[str, Path], ...]


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "B": 1}
    t = str(text).strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            number = t[: -len(unit)].strip()
            break
    else:
        number, factor = t, 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise HFError(f"--max-shard-size {text!r} is not a size like 5GB, 500MB or a byte count") from None
    if value <= 0:
        raise HFError(f"--max-shard-size must be positive, got {text!r}")
    return value


# ------------------------------------------------------------------------------------- source config
def find_hf_source(info: ckpt.CheckpointInfo, *, depth: int = 8) -> Optional[Path]:
    """The `hf/` directory of the import this checkpoint descends from, if it still exists."""
    seen: set[Path] = set()
    root, meta = info.root, info.metadata
    for _ in range(depth):
        if (root / HF_DIR / files.CONFIG).is_file():
            return root / HF_DIR
        provenance = meta.get("provenance") or {}
        parent = next((Path(provenance[k]) for k in PROVENANCE_LINKS if isinstance(provenance.get(k), str)), None)
        if parent is None or parent.resolve() in seen or not parent.exists():
            return None
        seen.add(parent.resolve())
        try:
            parent_info = ckpt.resolve(parent)
        except (ckpt.CheckpointError, ValueError, OSError):
            return None
        root, meta = parent_info.root, parent_info.metadata
    return None


def _token_ids(ref: dict) -> dict:
    """bos/eos ids of a checkpoint's own tokenizer (a model trained here has no source config)."""
    from megatron_minitron.data.tokenizer import TokenizerRef

    try:
        tokenizer = TokenizerRef.from_json(ref).load()
    except ImportError as error:
        raise HFError(f"reading the checkpoint's tokenizer for its token ids needs: {error}") from None
    ids = {"eos_token_id": tokenizer.eod}
    if tokenizer.bos is not None:
        ids["bos_token_id"] = tokenizer.bos
    return ids


def _generation_config(source: Optional[Path], config: dict) -> dict:
    if source is not None and (source / files.GENERATION_CONFIG).is_file():
        generation = files.read_json(source / files.GENERATION_CONFIG, "the generation config")
    else:
        generation = {"_from_model_config": True}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if config.get(key) is not None:
                generation[key] = config[key]
    generation.pop("transformers_version", None)
    return generation


def _tokenizer_files(info: ckpt.CheckpointInfo, source: Optional[Path]) -> list[tuple[str, Path]]:
    """(name in the output, file) of every tokenizer file: the checkpoint's own tokenizer, completed by
    the files the source import kept (a pruned checkpoint carries tokenizer.json only)."""
    found: dict[str, Path] = {}
    if info.tokenizer is not None:
        path = Path(info.tokenizer["path"])
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise HFError(f"the checkpoint's tokenizer {path} is missing")
        found["tokenizer.json" if info.tokenizer["kind"] == "huggingface" else "tokenizer.model"] = path
    if source is not None:
        kept = source.parent / ckpt.TOKENIZER_DIR
        for name in files.TOKENIZER_FILES:
            if name not in found and (kept / name).is_file():
                found[name] = kept / name
    return [(name, found[name]) for name in files.TOKENIZER_FILES if name in found]


# ---------------------------------------------------------------------------------------- planning
def plan_export(load: str | os.PathLike, *, family: Optional[str] = None, dtype: Optional[str] = None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ExportPlan:
    """Check the checkpoint and plan every output tensor and shard, without writing anything."""
    from megatron_minitron.model import storage

    if dtype is not None and dtype not in DTYPES:
        raise HFError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    info = ckpt.resolve(load)  # also checks that every shard file the metadata points into is there, long enough
    metadata = storage.read_dcp_metadata(info.path)
    arch = info.arch.explicit()
    source = find_hf_source(info)
    base = files.read_json(source / files.CONFIG, "the source model's configuration") if source else None
    if family is not None:
        fam = family_by_name(family)
    elif base is not None:
        fam = family_for_config(base)
    else:
        fam = infer_family(arch)
    fam.check_exportable(arch)
    stored = metadata.state_dict_metadata
    items = []
    for entry in fam.tensors:
        if not entry.applies(arch):
            continue
        items += _plan_entry(entry, arch, stored, info, dtype)
    # HF order: embeddings, then layer by layer (table order within a layer), then final norm and head.
    items.sort(key=lambda it: (0 if it.entry.megatron.startswith("embedding.") else 1 if it.entry.layered else 2,
                               it.layer or 0))
    extra = sorted(k for k in stored if not is_training_state(k) and "_extra_state" not in k
                   and k not in {it.entry.megatron for it in items})
    if extra:
        raise HFError(f"{info.path} holds tensors the {fam.model_type} table does not export, e.g. {extra[:4]}: "
                      f"the checkpoint does not fit this family")
    written_dtype = DTYPES[dtype] if dtype else items[0].outputs[0].dtype
    config = fam.config_from_arch(arch, base=base, dtype=str(written_dtype).replace("torch.", ""))
    if base is None and info.tokenizer is not None:
        config.update(_token_ids(info.tokenizer))
    planned = [t for it in items for t in it.outputs]
    shards = files.plan_shards(planned, max_shard_bytes)
    return ExportPlan(info=info, family=fam, config=config, generation_config=_generation_config(source, config),
                      items=tuple(items), shards=tuple(tuple(s) for s in shards),
                      tokenizer_files=tuple(_tokenizer_files(info, source)))


def _plan_entry(entry: TensorMap, arch: ArchConfig, stored: dict, info: ckpt.CheckpointInfo,
                dtype: Optional[str]) -> list[Item]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    shape = megatron_shape(entry.megatron, arch)
    want = ((arch.num_layers,) if entry.layered else ()) + shape
    meta = stored.get(entry.megatron)
    if not isinstance(meta, TensorStorageMetadata):
        raise HFError(f"{info.path} has no tensor {entry.megatron!r}, which its architecture implies")
    if tuple(meta.size) != want:
        raise HFError(f"{info.path}: tensor {entry.megatron!r} has shape {list(meta.size)}, its architecture implies "
                      f"{list(want)}")
    out_dtype = DTYPES[dtype] if dtype else meta.properties.dtype
    hf_shapes = entry.rule.hf_shapes(shape[1:] if entry.experts else shape, arch)
    experts = range(arch.num_experts) if entry.experts else [None]
    return [Item(entry=entry, layer=layer, expert=expert,
                 outputs=tuple(PlannedTensor(hf_name(n, layer, expert=expert), out_dtype, tuple(s))
                               for n, s in zip(entry.hf, hf_shapes)))
            for layer in (range(arch.num_layers) if entry.layered else [None]) for expert in experts]


# ------------------------------------------------------------------------------------------ writes
def is_hf_model_dir(path: Path) -> bool:
    """A Hugging Face model directory: config.json and safetensors weights (or their index)."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors*"))


def export_hf(load: str | os.PathLike, save: str | os.PathLike, *, family: Optional[str] = None,
              dtype: Optional[str] = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
              print_fn: Callable[[str], None] = print, stats: Optional[dict] = None, fsync: bool = True,
              chunk_bytes: int = CHUNK_BYTES) -> Path:
    """Write the HF model directory of checkpoint `load` to `save`; returns `save`.

    family: "llama", "mistral", "qwen2", "qwen3", "nemotron", "gpt2", "qwen3_moe" or "mixtral" (default: the
    source model's, else the one the architecture fits). dtype: convert every tensor ("float32", "bfloat16", "float16"); None keeps the
    stored dtypes. stats: filled with seconds, bytes_read, bytes_written and peak_rss_mb.
    fsync: flush every shard to disk before the final rename (off only to measure).
    chunk_bytes: tensors larger than this without a fusion rule are copied in row blocks of this size.
    """
    start = time.monotonic()
    out = Path(save)
    plan = plan_export(load, family=family, dtype=dtype, max_shard_bytes=max_shard_bytes)
    check_output(out, overwrite, plan.info.root, previous=is_hf_model_dir, what="Hugging Face model directory")
    with ckpt.writing(out, overwrite=overwrite, error=HFError) as partial:
        read, written = _write_shards(plan, partial, fsync, chunk_bytes)
        _write_files(plan, partial)
    seconds = time.monotonic() - start
    if stats is not None:
        stats.update(seconds=seconds, bytes_read=read, bytes_written=written, peak_rss_mb=peak_rss_mb())
    print_fn(f"export-hf: wrote {out} ({plan.family.model_type}, {len(plan.shards)} shard(s), "
             f"{written / 1e6:.1f} MB, {seconds:.1f}s)")
    return out


def _write_shards(plan: ExportPlan, partial: Path, fsync: bool = True,
                  chunk_bytes: int = CHUNK_BYTES) -> tuple[int, int]:
    from megatron_minitron.model import storage

    arch = plan.info.arch.explicit()
    names = files.shard_names(len(plan.shards))
    reader = storage.SourceReader(plan.info.path)
    shard_index, writer, written, weight_map = -1, None, 0, {}

    def next_writer():
        nonlocal shard_index, writer, written
        if writer is not None:
            writer.close(fsync=fsync)
            written += writer.bytes_written
        shard_index += 1
        writer = files.ShardWriter(partial / names[shard_index], list(plan.shards[shard_index]))
        return writer

    try:
        next_writer()
        for item in plan.items:
            key, rule = item.entry.megatron, item.entry.rule
            rows = arch.vocab_size if isinstance(rule, Vocab) else megatron_shape(key, arch)[0]
            planned = item.outputs[0]
            if item.expert is not None:  # one expert of a layer, read at (layer, expert): its GLU halves (two
                # stored chunks) each alone, so each comes from the reader's mapping, not copied together first
                at = (item.expert,) if item.layer is None else (item.layer, item.expert)
                expert_rows = megatron_shape(key, arch)[1]
                ranges = rule.hf_row_ranges(expert_rows)
                parts = [reader.read_rows(key, at, r0, r1) for r0, r1 in ranges] if ranges is not None else \
                    rule.to_hf(reader.read_rows(key, at, 0, expert_rows), arch)
                for planned, part in zip(item.outputs, parts):
                    if writer.full:
                        next_writer()
                    writer.write(planned.name, part.to(planned.dtype))
                    weight_map[planned.name] = names[shard_index]
                continue
            if type(rule) in (Copy, Vocab) and planned.nbytes > chunk_bytes:
                # A large plain tensor goes in row blocks (padded vocabulary rows are never read).
                step = max(1, chunk_bytes // (planned.nbytes // rows))
                if writer.full:
                    next_writer()
                for r0 in range(0, rows, step):
                    block = reader.read_rows(key, item.layer, r0, min(r0 + step, rows))
                    writer.write(planned.name, block.to(planned.dtype))
                weight_map[planned.name] = names[shard_index]
                continue
            ranges = rule.hf_row_ranges(rows)
            if ranges is not None:  # each HF tensor is a row range: read each alone (GLU halves are two chunks)
                parts = [reader.read_rows(key, item.layer, r0, r1) for r0, r1 in ranges]
            else:
                parts = rule.to_hf(reader.read_rows(key, item.layer, 0, rows), arch)
            for planned, part in zip(item.outputs, parts):
                if writer.full:
                    next_writer()
                writer.write(planned.name, part.to(planned.dtype))
                weight_map[planned.name] = names[shard_index]
        writer.close(fsync=fsync)
        written += writer.bytes_written
    finally:
        reader.close()
    total = sum(t.nbytes for shard in plan.shards for t in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (partial / files.INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return reader.bytes_read, written


def _write_files(plan: ExportPlan, partial: Path) -> None:
    (partial / files.CONFIG).write_text(json.dumps(plan.config, indent=2) + "\n")
    (partial / files.GENERATION_CONFIG).write_text(json.dumps(plan.generation_config, indent=2) + "\n")
    for name, path in plan.tokenizer_files:
        shutil.copyfile(path, partial / name)
    if not (partial / "tokenizer_config.json").is_file() and plan.tokenizer_files:
        (partial / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(plan), indent=2) + "\n")


def _tokenizer_config(plan: ExportPlan) -> dict:
    """A minimal tokenizer_config.json when the checkpoint kept none (a model trained here)."""
    tok = plan.info.tokenizer or {}
    config: dict = {"model_max_length": plan.config.get("max_position_embeddings", plan.config.get("n_positions")),
                    "tokenizer_class": "PreTrainedTokenizerFast" if tok.get("kind") == "huggingface"
                    else "LlamaTokenizer"}
    if tok.get("eod_token"):
        config["eos_token"] = tok["eod_token"]
    return config
