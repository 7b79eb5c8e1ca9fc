"""Distributed checkpoints: megatron's `torch_dist` format in Megatron-LM's directory layout.

A checkpoint is `ROOT/latest_checkpointed_iteration.txt` (an iteration number or `release`) and
`ROOT/iter_%07d/` (or `ROOT/release/`) holding a `torch_dist` checkpoint of global tensors, loadable at
any tensor/pipeline-parallel layout. Its common state holds what Megatron-LM writes (`args`,
`checkpoint_version`, `iteration`, the model under `model`), so either tool reads the other's
checkpoints. Ours also carry `minitron.json` beside the tensors: the architecture, the tokenizer
(copied to `ROOT/tokenizer/`), and what produced them; loading needs no architecture flags.

Writes go to a temporary directory that is renamed only once every rank has finished, so a crash
never leaves something that looks like a finished checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from megatron_minitron.config import ArchConfig, ConfigError
from megatron_minitron.model.integrity import check_complete, write_checksums

TRACKER = "latest_checkpointed_iteration.txt"
META = "minitron.json"
FORMAT = "megatron-minitron/1"
TOKENIZER_DIR = "tokenizer"
# dp_reshardable/fully_reshardable work on 0.16.1; the default fully_sharded_model_space does not.
OPTIMIZER_SHARDING = "fully_reshardable"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match what was asked for."""


class DiskFullError(CheckpointError):
    """An output could not be written because its filesystem is full; the message names the output."""


DISK_FULL_BYTES = 1 << 20
"""Free space under which a failed write is reported as a full disk: torch.save and DCP's writers turn
ENOSPC into errors that do not say so ("unexpected pos ..."), so the filesystem is asked instead."""


def meta_text(meta: dict) -> str:
    """The text of a `minitron.json`: objects indented, a list of numbers or strings on one line.
    `json.dumps(indent=2)` puts every element of a list on a line of its own, and a pruned MoE
    checkpoint's plan holds each layer's kept experts and each kept expert's neurons: for a plan of
    Qwen3-30B-A3B's shape (48 layers, 64 experts of 576 neurons kept) that was a 22.8 MB file of
    1.78 million lines, encoded in 0.65 s by json's Python encoder (an indent disables its C one);
    this writes it in 3,225 lines (8.6 MB) in 0.2 s. The value read back is the same either way."""

    def encode(value: Any, depth: int) -> str:
        pad, inner = "\n" + "  " * depth, "\n" + "  " * (depth + 1)
        if isinstance(value, dict) and value:
            return "{" + ",".join(f"{inner}{json.dumps(str(key))}: {encode(item, depth + 1)}"
                                  for key, item in value.items()) + pad + "}"
        if isinstance(value, (list, tuple)) and not set(map(type, value)).isdisjoint((dict, list, tuple)):
            return "[" + ",".join(inner + encode(item, depth + 1) for item in value) + pad + "]"
        return json.dumps(value)

    return encode(meta, 0) + "\n"


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` if it exists, else its nearest existing parent: where an output not yet written will live."""
    path = Path(path)
    return next(p for p in (path, *path.absolute().parents) if p.exists())


def disk_full(path: Path, error: BaseException) -> bool:
    """Whether `error`, raised while writing under `path`, came from a full filesystem: ENOSPC/EDQUOT in its
    chain or its text (a worker's traceback arrives as text), or less than DISK_FULL_BYTES left there.
    Ask before removing what was partly written, which frees the space again."""
    import errno

    seen: Optional[BaseException] = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
        return True
    return shutil.disk_usage(nearest_existing(path)).free < DISK_FULL_BYTES


def disk_full_error(out: Path, what: str, then: str = "free space and run again") -> DiskFullError:
    return DiskFullError(f"{what} {out}: the disk is full (no space left on its filesystem); the unfinished output "
                         f"was removed, nothing that looks complete was left: {then}")


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """What a checkpoint directory holds, read without building a model."""

    root: Path
    """The directory the user named."""
    path: Path
    """The torch_dist directory inside it (iter_%07d/ or release/), or root itself."""
    iteration: int
    """Training iteration the checkpoint was written at (0 for a release checkpoint)."""
    arch: ArchConfig
    """Architecture, from minitron.json or from Megatron-LM's args."""
    tokenizer: Optional[dict] = None
    """Tokenizer reference ({"kind", "path"} with an absolute path), if known."""
    origin: str = "minitron"
    """"minitron" (written by this project) or "megatron-lm" (architecture from args)."""
    metadata: dict = field(default_factory=dict)
    """Contents of minitron.json (empty for Megatron-LM checkpoints)."""
    singleton_local_shards: bool = False
    """Per-layer keys (`decoder.layers.{i}.…`) instead of one stacked tensor per parameter."""


def iteration_dir(root: Path, iteration: Optional[int]) -> Path:
    """iter_%07d/ for a training iteration, release/ for None."""
    return root / ("release" if iteration is None else f"iter_{iteration:07d}")


def latest_iteration(root: Path) -> Optional[str]:
    """Contents of the tracker file, or None when there is none."""
    tracker = root / TRACKER
    return tracker.read_text().strip() if tracker.is_file() else None


def resolve(path: str | os.PathLike) -> CheckpointInfo:
    """Find the torch_dist directory and the architecture of a checkpoint; clear errors otherwise."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint path {root} is not a directory")
    tracked = latest_iteration(root)
    if tracked is not None:
        if tracked == "release":
            ckpt, iteration = root / "release", 0
        elif tracked.isdigit():
            ckpt, iteration = iteration_dir(root, int(tracked)), int(tracked)
        else:
            raise CheckpointError(f"{root / TRACKER} holds {tracked!r}; expected an iteration number or 'release'")
        if not ckpt.is_dir():
            raise CheckpointError(f"{root / TRACKER} names iteration {tracked}, but {ckpt} does not exist")
    elif (root / "metadata.json").is_file():
        ckpt, iteration = root, 0
    else:
        what = "is empty" if not any(root.iterdir()) else "holds no checkpoint"
        raise CheckpointError(f"checkpoint directory {root} {what}: expected {TRACKER} with iter_*/ or release/, "
                              f"or a torch_dist directory with metadata.json")
    if not (ckpt / "metadata.json").is_file():
        raise CheckpointError(f"{ckpt} is not a finished torch_dist checkpoint (no metadata.json)")
    check_complete(ckpt)  # every file there, .metadata readable, shards long enough: one line naming the file
    meta_file = ckpt / META
    if meta_file.is_file():
        meta = _read_meta(meta_file)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_file} has format {meta.get('format')!r}; this version reads {FORMAT!r}")
        tokenizer = meta.get("tokenizer")
        if tokenizer is not None:
            tokenizer = {**tokenizer, "path": str((root / tokenizer["path"]).resolve())}
        arch = ArchConfig.from_json(meta["architecture"])
        return CheckpointInfo(root=root, path=ckpt, iteration=iteration, arch=arch, tokenizer=tokenizer,
                              origin="minitron", metadata=meta, singleton_local_shards=_singleton_layout(ckpt, arch))
    common = load_common(ckpt)
    if "args" not in common:
        raise CheckpointError(f"{ckpt} has neither {META} nor Megatron-LM 'args' in its common state: its "
                              f"architecture is unknown")
    args = common["args"]
    arch = arch_from_megatron_args(args, where=str(ckpt))
    return CheckpointInfo(root=root, path=ckpt, iteration=int(common.get("iteration", iteration)), arch=arch,
                          tokenizer=_tokenizer_from_args(args), origin="megatron-lm",
                          singleton_local_shards=_singleton_layout(ckpt, arch))


def _read_meta(meta_file: Path) -> dict:
    """minitron.json, with one clear error for damaged JSON or a missing architecture."""
    try:
        meta = json.loads(meta_file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{meta_file} is not valid JSON ({error}); the checkpoint's metadata is damaged") \
            from None
    if not isinstance(meta, dict) or not isinstance(meta.get("architecture"), dict):
        raise CheckpointError(f"{meta_file} holds no 'architecture' object; the checkpoint's metadata is damaged")
    return meta


def load_common(ckpt: Path) -> dict:
    """The common (non-tensor) state of a torch_dist checkpoint, without a process group."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(ckpt))


def tensor_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor stored in a torch_dist checkpoint (reads metadata only)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(ckpt)).read_metadata()
    return {key: tuple(meta.size) for key, meta in metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata)}


def _singleton_layout(ckpt: Path, arch: ArchConfig) -> bool:
    """Whether a checkpoint was saved with `singleton_local_shards` (per-layer keys, GLU fc1 split into
    weight_w/weight_v). megatron-core also writes per-layer keys, unsplit, for any stack that mixes
    dense and MoE layers (transformer_block.py: non_homogeneous_layers): that is its normal layout."""
    keys = tensor_shapes(ckpt)
    if not any(key.startswith("decoder.layers.") and key.split(".")[2].isdigit() for key in keys):
        return False
    if any(key.endswith(".weight_w") for key in keys):
        return True
    return all(arch.moe_layers) or not arch.is_moe


# ------------------------------------------------------------------------------ Megatron-LM args
_UNSUPPORTED_ARGS = {
    "multi_latent_attention": "multi-latent attention",
    "moe_shared_expert_gate": "a gated shared expert",
    "moe_router_topk_scaling_factor": "scaled top-k routing probabilities",
    "moe_router_num_groups": "group-limited routing",
    "moe_router_enable_expert_bias": "expert-bias (aux-loss-free) routing",
    "moe_expert_capacity_factor": "token dropping (expert capacity)",
    "mtp_num_layers": "multi-token prediction layers",
    "num_layers_per_virtual_pipeline_stage": "virtual pipeline stages",
    "virtual_pipeline_model_parallel_size": "virtual pipeline stages",
}


def arch_from_megatron_args(args: Namespace, *, where: str = "checkpoint") -> ArchConfig:
    """ArchConfig from a Megatron-LM args Namespace; absent fields take Megatron-LM's defaults."""
    a = vars(args)
    for name, what in _UNSUPPORTED_ARGS.items():
        if a.get(name):
            raise CheckpointError(f"{where}: args.{name}={a[name]!r} ({what}) is not supported")
    hidden, heads = a["hidden_size"], a["num_attention_heads"]
    swiglu = bool(a.get("swiglu", False))
    ffn = a.get("ffn_hidden_size")
    if ffn is None:  # Megatron-LM's own default
        ffn = int((4 * hidden * 2 / 3) / 64) * 64 if swiglu else 4 * hidden
    activation = ("swiglu" if swiglu else "squared_relu" if a.get("squared_relu") else
                  "gelu_tanh" if a.get("openai_gelu") else "gelu")
    padded = a.get("padded_vocab_size")
    if padded is None:
        raise CheckpointError(f"{where}: args has no padded_vocab_size; the embedding size is unknown")
    return ArchConfig(
        num_layers=a["num_layers"], hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
        num_query_groups=a.get("num_query_groups") if a.get("group_query_attention") else None,
        kv_channels=a.get("kv_channels") or None,
        vocab_size=a.get("minitron_vocab_size") or padded, padded_vocab_size=padded,
        make_vocab_size_divisible_by=a.get("make_vocab_size_divisible_by", 128),
        max_position_embeddings=a.get("max_position_embeddings") or a.get("seq_length"),
        normalization=a.get("normalization", "LayerNorm"), norm_epsilon=a.get("norm_epsilon", 1e-5),
        apply_layernorm_1p=bool(a.get("apply_layernorm_1p", False)), activation=activation,
        position_embedding_type=a.get("position_embedding_type", "learned_absolute"),
        rotary_base=int(a.get("rotary_base", 10000)), rotary_percent=float(a.get("rotary_percent", 1.0)),
        rope_scaling_factor=a.get("rope_scaling_factor", 8.0) if a.get("use_rope_scaling") else None,
        untie_embeddings_and_output_weights=bool(a.get("untie_embeddings_and_output_weights", False)),
        add_bias_linear=bool(a.get("add_bias_linear", True)), add_qkv_bias=bool(a.get("add_qkv_bias", False)),
        qk_layernorm=bool(a.get("qk_layernorm", False)), init_method_std=a.get("init_method_std", 0.02),
        **_moe_fields_from_args(a, where),
    )


def _moe_fields_from_args(a: dict, where: str) -> dict:
    """ArchConfig's MoE fields from Megatron-LM's args (none for a dense model). Experts are stored
    under the same keys whether Megatron-LM ran them as SequentialMLP or with grouped GEMM, so
    moe_grouped_gemm does not matter here."""
    if not a.get("num_experts"):
        return {}
    if a.get("moe_router_load_balancing_type", "aux_loss") == "sinkhorn":
        raise CheckpointError(f"{where}: args.moe_router_load_balancing_type='sinkhorn' (Sinkhorn routing) is not "
                              f"supported")
    freq = a.get("moe_layer_freq", 1)
    if isinstance(freq, str):
        raise CheckpointError(f"{where}: args.moe_layer_freq={freq!r} is an unparsed pattern; expected an integer "
                              f"or a list of 0/1 flags")
    ffn = a.get("moe_ffn_hidden_size")
    return dict(num_experts=a["num_experts"], moe_router_topk=a.get("moe_router_topk", 2),
                moe_ffn_hidden_size=ffn, moe_shared_expert_ffn_hidden_size=a.get("moe_shared_expert_intermediate_size"),
                moe_router_score_function=a.get("moe_router_score_function", "softmax"),
                moe_router_pre_softmax=bool(a.get("moe_router_pre_softmax", False)),
                moe_layer_freq=tuple(freq) if isinstance(freq, list) else freq)


def megatron_args_from_arch(arch: ArchConfig, **extra: Any) -> Namespace:
    """The Megatron-LM args describing an architecture (inverse of arch_from_megatron_args)."""
    return Namespace(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, group_query_attention=arch.num_query_groups is not None,
        num_query_groups=arch.num_query_groups, kv_channels=arch.head_dim,  # explicit: see DESIGN.md §2
        padded_vocab_size=arch.padded_vocab, minitron_vocab_size=arch.vocab_size,
        make_vocab_size_divisible_by=arch.make_vocab_size_divisible_by,
        max_position_embeddings=arch.max_position_embeddings, normalization=arch.normalization,
        norm_epsilon=arch.norm_epsilon, apply_layernorm_1p=arch.apply_layernorm_1p,
        swiglu=arch.activation == "swiglu", squared_relu=arch.activation == "squared_relu",
        openai_gelu=arch.activation == "gelu_tanh",
        position_embedding_type=arch.position_embedding_type, rotary_base=arch.rotary_base,
        rotary_percent=arch.rotary_percent, use_rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        untie_embeddings_and_output_weights=arch.untie_embeddings_and_output_weights,
        add_bias_linear=arch.add_bias_linear, add_qkv_bias=arch.add_qkv_bias, qk_layernorm=arch.qk_layernorm,
        init_method_std=arch.init_method_std, **{**_megatron_moe_args(arch), **extra})


def _megatron_moe_args(arch: ArchConfig) -> dict:
    """Megatron-LM's names for the MoE fields (none for a dense model); experts saved as SequentialMLP."""
    if not arch.is_moe:
        return {}
    return dict(num_experts=arch.num_experts, moe_router_topk=arch.moe_router_topk,
                moe_ffn_hidden_size=arch.expert_ffn_hidden_size,
                moe_shared_expert_intermediate_size=arch.moe_shared_expert_ffn_hidden_size,
                moe_router_score_function=arch.moe_router_score_function,
                moe_router_pre_softmax=arch.moe_router_pre_softmax,
                moe_layer_freq=(arch.moe_layer_freq if isinstance(arch.moe_layer_freq, int)
                                else list(arch.moe_layer_freq)), moe_grouped_gemm=False)


def _tokenizer_from_args(args: Namespace) -> Optional[dict]:
    model = getattr(args, "tokenizer_model", None)
    kind = getattr(args, "tokenizer_type", None)
    if not model:
        return None
    if kind in ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "Llama2Tokenizer"):
        return {"kind": "sentencepiece", "path": model}
    if kind == "HuggingFaceTokenizer":
        return {"kind": "huggingface", "path": model}
    return None


# ------------------------------------------------------------------------------------ validation
def check_architecture(expected: ArchConfig, found: ArchConfig, *, where: str) -> None:
    """Raise naming every field where a checkpoint's architecture differs from the expected one."""
    expected, found = expected.explicit(), found.explicit()
    if expected == found:
        return
    diffs = [f"{k}: expected {v!r}, checkpoint has {found.to_json()[k]!r}"
             for k, v in expected.to_json().items() if found.to_json()[k] != v]
    raise CheckpointError(f"{where} holds a different architecture: " + "; ".join(diffs))


def check_shapes(sharded_state_dict: dict, ckpt: Path, *, vocab_padding_may_differ: bool = False) -> None:
    """Compare the global shape of every tensor the model expects with the stored one, before loading.
    With vocab_padding_may_differ, the tensors megatron marks `allow_shape_mismatch` (word embeddings
    and output layer, whose rows are the padded vocabulary) may differ: megatron then loads the rows
    both have and zero-fills the rest."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = tensor_shapes(ckpt)
    for sh in nested_values(sharded_state_dict):
        if not isinstance(sh, ShardedTensor) or sh.key not in stored:
            continue
        if vocab_padding_may_differ and sh.allow_shape_mismatch and tuple(sh.global_shape[1:]) == stored[sh.key][1:]:
            continue
        if tuple(sh.global_shape) != stored[sh.key]:
            raise CheckpointError(f"{ckpt}: tensor {sh.key} has global shape {stored[sh.key]}, but the model "
                                  f"expects {tuple(sh.global_shape)}: the checkpoint's architecture does not match")


# ------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Every RNG this rank draws from."""
    from megatron.core import tensor_parallel

    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of rng_state()."""
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(runtime, data: Any):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (runtime.parallel.pipeline_parallel, runtime.parallel.tensor_parallel, runtime.data_parallel)
    return ShardedObject("rng_state", data, shape, (runtime.pp_rank, runtime.tp_rank, runtime.dp_rank), replica_id=0)


# ------------------------------------------------------------------------------------ save / load
def model_sharded_state_dict(model, *, singleton_local_shards: bool = False) -> dict:
    """The sharded state dict of the unwrapped model (DDP would prefix every key with `module.`)."""
    from megatron_minitron.model.build import unwrap

    metadata = {"singleton_local_shards": True} if singleton_local_shards else None
    return unwrap(model).sharded_state_dict(metadata=metadata)


def save_checkpoint(root: str | os.PathLike, *, model, arch: ArchConfig, runtime, iteration: Optional[int],
                    tokenizer: Optional[dict] = None, optimizer=None, scheduler=None, train_state: Optional[dict] = None,
                    provenance: Optional[dict] = None) -> Path:
    """Write one checkpoint collectively (every rank calls this); returns the iteration directory.

    The tensors go to `<iter>.partial/`, which rank 0 renames once all ranks are done; then the tracker
    file is replaced atomically. An existing directory for the same iteration is replaced.
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = iteration_dir(root, iteration)
    partial = final.with_name(final.name + ".partial")
    if runtime.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    runtime.barrier()

    model_sd = model_sharded_state_dict(model)
    state = {"model": model_sd, "checkpoint_version": 3.0, "iteration": iteration or 0,
             "args": megatron_args_from_arch(arch, tensor_model_parallel_size=runtime.parallel.tensor_parallel,
                                             pipeline_model_parallel_size=runtime.parallel.pipeline_parallel,
                                             expert_model_parallel_size=runtime.parallel.expert_parallel),
             "rng_state": _rng_sharded_object(runtime, rng_state())}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING})
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if train_state is not None:
        state["train_state"] = dict(train_state)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dist_checkpointing.save(state, str(partial), sharded_strategy=("torch_dist", 1))
    except (CheckpointException, OSError, RuntimeError) as error:  # CheckpointException is a BaseException
        full = disk_full(partial, error)
        if runtime.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        if full:
            raise disk_full_error(final, "could not write checkpoint",
                                  "the run's earlier checkpoints are intact; free space and continue it with --resume"
                                  ) from None
        raise
    runtime.barrier()

    if runtime.rank == 0:
        write_checksums(partial)  # of the files just written (from the page cache), before minitron.json
        meta = {"format": FORMAT, "architecture": arch.explicit().to_json(), "iteration": iteration or 0,
                "num_parameters": arch.num_parameters(), "num_active_parameters": arch.num_active_parameters(),
                "saved_with": saved_layout(runtime), "provenance": provenance or {}}
        if tokenizer is not None:
            meta["tokenizer"] = copy_tokenizer(root, tokenizer)
        (partial / META).write_text(meta_text(meta))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        tmp = root / (TRACKER + ".tmp")
        tmp.write_text("release" if iteration is None else str(iteration))
        os.replace(tmp, root / TRACKER)
    runtime.barrier()
    return final


def saved_layout(runtime) -> dict:
    """The layout a checkpoint is written at, as minitron.json records it ("saved_with")."""
    return {"tensor_parallel": runtime.parallel.tensor_parallel, "pipeline_parallel": runtime.parallel.pipeline_parallel,
            "data_parallel": runtime.data_parallel, "expert_parallel": runtime.parallel.expert_parallel}


def copy_tokenizer(root: Path, tokenizer: dict) -> dict:
    """Copy the tokenizer file into ROOT/tokenizer/ and return a reference relative to ROOT."""
    source = Path(tokenizer["path"])
    if source.is_dir():  # a Hugging Face tokenizer directory: its tokenizer.json is the tokenizer
        source = source / "tokenizer.json"
    if not source.is_file():
        raise CheckpointError(f"tokenizer file {source} does not exist")
    target = root / TOKENIZER_DIR / source.name
    if source.resolve() != target.resolve():
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(source, target)
    return {**tokenizer, "path": str(target.relative_to(root))}


def load_checkpoint(info: CheckpointInfo, *, model, runtime=None, optimizer=None, scheduler=None,
                    load_rng: bool = False, optional_prefixes: tuple[str, ...] = (),
                    vocab_padding_may_differ: bool = False) -> dict:
    """Load weights (and optionally optimizer, scheduler, RNG) into a model built from info.arch.

    Parameters whose name starts with one of `optional_prefixes` (modules added for training only,
    such as distillation's projections) are loaded when the checkpoint has them and otherwise keep
    their initial values. Returns the checkpoint's train_state (empty when it has none).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_minitron.model.build import unwrap

    model_sd = model_sharded_state_dict(model, singleton_local_shards=info.singleton_local_shards)
    if optional_prefixes:
        stored = tensor_shapes(info.path)
        model_sd = {name: sh for name, sh in model_sd.items()
                    if not (name.startswith(optional_prefixes) and getattr(sh, "key", name) not in stored)}
    check_shapes(model_sd, info.path, vocab_padding_may_differ=vocab_padding_may_differ)
    request: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        if "optimizer" not in _top_level_keys(info.path):
            raise CheckpointError(f"{info.path} holds no optimizer state; it cannot be resumed (load the weights only)")
        request["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING})
    if load_rng:
        request["rng_state"] = _rng_sharded_object(runtime, None)
    loaded = dist_checkpointing.load(request, str(info.path), strict=StrictHandling.RAISE_UNEXPECTED)
    unwrap(model).load_state_dict(loaded["model"], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if load_rng:
        set_rng_state(loaded["rng_state"])
    return dict(loaded.get("train_state", {}))


def _top_level_keys(ckpt: Path) -> set[str]:
    """First component of every key stored in a checkpoint (tensors and common state)."""
    keys = {key.split(".")[0] for key in tensor_shapes(ckpt)}
    return keys | set(load_common(ckpt))


def is_checkpoint_dir(path: Path) -> bool:
    """A checkpoint root (tracker file) or a torch_dist directory (megatron's metadata.json)."""
    return (path / TRACKER).is_file() or (path / "metadata.json").is_file()


def check_new_output(path: str | os.PathLike, *, overwrite: bool = False,
                     previous: Callable[[Path], bool] = is_checkpoint_dir, what: str = "checkpoint") -> Path:
    """Refuse a file, and an existing, non-empty output directory unless overwrite is given and
    `previous(path)` recognises it as an earlier output of the same kind (`what`): --overwrite never
    deletes a directory of other files."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output {path} is a file, not a directory; choose a new path")
    if path.is_dir() and any(path.iterdir()):
        if not previous(path):
            raise ConfigError(f"output directory {path} already exists, is not empty and is not a {what}"
                              f"{' (--overwrite replaces only a ' + what + ')' if overwrite else ''}; nothing was "
                              f"deleted: choose a new path")
        if not overwrite:
            raise ConfigError(f"output directory {path} already exists and is not empty; choose a new path, "
                              f"or pass --overwrite to replace it")
    return path


@contextlib.contextmanager
def writing(out: Path, *, overwrite: bool, error: type[Exception] = CheckpointError) -> Iterator[Path]:
    """An empty directory `.NAME.partial` beside `out` to write it in: moved into place
    (`move_into_place`) when the block finishes, removed when it raises, so a failure never leaves
    a half-written output that looks complete."""
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        move_into_place(partial, out, overwrite=overwrite, error=error)
    except BaseException as failure:
        full = isinstance(failure, (OSError, RuntimeError)) and disk_full(partial, failure)
        shutil.rmtree(partial, ignore_errors=True)
        if full:
            raise disk_full_error(out, "could not write") from None
        raise


def move_into_place(partial: Path, out: Path, *, overwrite: bool, error: type[Exception] = CheckpointError) -> None:
    """Rename a finished output directory `partial` (written beside `out`) to `out`, the last step of
    every offline writer (prune, import-hf, export-hf). An empty directory at `out` is removed first.
    Anything else there appeared while we were writing (the writers refuse it up front): it is
    replaced only with overwrite, by moving it aside to `.NAME.replaced` before the rename and
    deleting it after, and otherwise refused with `error`, `partial` left for the caller to remove."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        partial.rename(out)
        return
    if not overwrite:
        raise error(f"output {out} appeared while writing; not replacing it")
    trash = out.parent / f".{out.name}.replaced"
    shutil.rmtree(trash, ignore_errors=True)
    out.rename(trash)
    partial.rename(out)
    shutil.rmtree(trash, ignore_errors=True)


def read_tensors(ckpt: str | os.PathLike, keys: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """Global tensors of a torch_dist checkpoint, read one key at a time without any process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = Path(ckpt)
    shapes = tensor_shapes(ckpt)
    metadata = FileSystemReader(str(ckpt)).read_metadata()
    out = {}
    for key in keys if keys is not None else sorted(shapes):
        if key not in shapes:
            raise CheckpointError(f"{ckpt} has no tensor {key!r}")
        dtype = metadata.state_dict_metadata[key].properties.dtype
        target = {key: torch.empty(shapes[key], dtype=dtype)}
        dcp.load(target, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
        out[key] = target[key]
    return out
