"""A scores directory: global, layout-independent importance tensors plus a JSON manifest.

    SCORES_DIR/scores.safetensors   heads [L, H], query_groups [L, G], ffn [L, F], hidden [h],
                                    layers_bi [L], optional layers_lm_loss [L], blocks_lm_loss [K, L],
                                    ffn_pre [L, F] (or ffn_pre_gate / ffn_pre_up for GLU models),
                                    and raw.* statistics (see importance/stats.py) from which any
                                    other aggregation is recomputed without a forward pass
    SCORES_DIR/manifest.json        where the scores come from and how they were computed

It is read with safetensors and json only: no megatron, no process group. `blocks_lm_loss[j, s]` is the
LM loss with the `block_sizes[j]` layers starting at layer s removed (NaN where the block would run
past the last layer). Raw hidden statistics have one row per LayerNorm: 2i is layer i's input norm,
2i + 1 its pre-MLP norm (a MoE layer's too), the last row the final norm.

Mixture-of-Experts models (arch.num_experts set; importance/moe.py says how each is measured) add,
with NaN rows for the layers that have no such MLP (arch.moe_layers[i] False for the MoE keys):

    experts [L, E]              per routed expert: its output norm per token (0 for tokens not routed
                                to it), weighted by the routing probability or not (manifest
                                `expert_weighting`), aggregated as every width score
    experts_router_mass [L, E]  mean over calibration tokens of the routing probability each expert
                                receives (0 where it is not in the token's top-k)
    expert_ffn [L, E, Fe]       per expert, per neuron of its MLP (Fe = arch.expert_ffn_hidden_size):
                                the input of the expert's linear_fc2 on its routed tokens (0 elsewhere)
    shared_ffn [L, Fs]          the shared expert's neurons (when the model has one), over all tokens

with raw.experts, raw.expert_ffn and raw.shared_ffn beside them (experts_router_mass is a plain mean,
the same under every aggregation, so it has no raw statistics). `ffn` (and ffn_pre*) keep dense
layers' neurons with NaN rows for MoE layers, and are absent when every layer is MoE.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import torch

from megatron_minitron.importance.stats import aggregate, check_aggregation

FORMAT = "megatron-minitron-scores/1"
TENSORS = "scores.safetensors"
MANIFEST = "manifest.json"
WIDTH_KEYS = ("heads", "query_groups", "ffn", "ffn_pre", "ffn_pre_gate", "ffn_pre_up", "experts", "expert_ffn",
              "shared_ffn")


class ScoresError(ValueError):
    """A scores directory that is missing, malformed, or belongs to another model."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoresManifest:
    """How a set of scores was computed (manifest.json)."""

    architecture: dict
    """Explicit architecture of the scored model (ArchConfig.to_json())."""
    arch_fingerprint: str
    """ArchConfig.explicit().fingerprint() of that model: plans refuse scores of another model."""
    checkpoint: str
    """The checkpoint directory that was scored (as given)."""
    iteration: int
    """Its training iteration."""
    data: dict
    """Calibration data: its source and tokenizer."""
    num_samples: int
    """Calibration samples that went through the model."""
    seq_length: int
    """Tokens per sample."""
    micro_batch_size: int
    """Samples per micro-batch."""
    seed: int
    """Seed of the calibration sample order."""
    seq_aggregation: str = "mean"
    """Aggregation over the sequence of the top-level score tensors (mean, l2 or var)."""
    batch_aggregation: str = "l2"
    """Aggregation over the samples of the top-level score tensors."""
    hidden_final_norm: bool = False
    """Whether `hidden` includes the final LayerNorm's output (it always includes every layer's two)."""
    ffn_source: str = "post"
    """Activation of the top-level `ffn`: post (input of linear_fc2) or pre (X·W1ᵀ; gate for GLU)."""
    block_sizes: tuple[int, ...] = ()
    """Block sizes k of the rows of blocks_lm_loss."""
    layer_spec: str = "local"
    """Layer spec the model ran with: local or transformer_engine."""
    layout: dict = dataclasses.field(default_factory=dict)
    """Parallel layout it was computed at: tp, pp, dp, sequence_parallel, first/last stage layers."""
    megatron_core: str = ""
    """megatron-core version."""
    expert_weighting: str = "router"
    """MoE models: "router" when `experts` (and `expert_ffn`) weigh each token's expert output by its
    routing probability (the expert's actual contribution to the layer's output, sum_e p_e(x)
    expert_e(x): the default, since an expert the router trusts little matters little), "plain" when
    they measure the expert's output as computed. Meaningless for dense models."""
    checkpoint_fingerprint: str = ""
    """Content fingerprint of the scored checkpoint's tensors (model/integrity.py); prune and search
    refuse scores whose fingerprint is not their checkpoint's. Empty in scores of older versions."""
    format: str = FORMAT

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["block_sizes"] = list(self.block_sizes)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "ScoresManifest":
        from megatron_minitron.config import unknown_fields

        unknown = unknown_fields(cls, data)
        if unknown:
            raise ScoresError(f"{MANIFEST} has unknown keys {unknown}; was it written by a newer version?")
        if data.get("format") != FORMAT:
            raise ScoresError(f"{MANIFEST} has format {data.get('format')!r}; this version reads {FORMAT!r}")
        return cls(**{**data, "block_sizes": tuple(data.get("block_sizes", ()))})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scores:
    """Importance scores of one model: tensors by name (see the module docstring) and their manifest."""

    tensors: dict[str, torch.Tensor]
    manifest: ScoresManifest

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"scores have no {name!r}; present: {', '.join(sorted(self.public_keys()))}")
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def public_keys(self) -> list[str]:
        return [k for k in self.tensors if not k.startswith("raw.")]

    @property
    def arch(self):
        from megatron_minitron.config import ArchConfig

        return ArchConfig.from_json(self.manifest.architecture)

    def aggregated(self, *, seq: str, batch: str, hidden_final_norm: Optional[bool] = None) -> "Scores":
        """The same scores under another aggregation, recomputed from the raw statistics."""
        check_aggregation(seq, axis="sequence")
        check_aggregation(batch, axis="batch")
        final = self.manifest.hidden_final_norm if hidden_final_norm is None else hidden_final_norm
        n = self.manifest.num_samples
        tensors = dict(self.tensors)
        for key in WIDTH_KEYS:
            if f"raw.{key}" in tensors:
                tensors[key] = aggregate(tensors[f"raw.{key}"], n, seq=seq, batch=batch)
        if "raw.ffn_pre_gate" in tensors and self.manifest.ffn_source == "pre":
            tensors["ffn"] = tensors["ffn_pre_gate"]
        elif "raw.ffn_pre" in tensors and self.manifest.ffn_source == "pre":
            tensors["ffn"] = tensors["ffn_pre"]
        tensors["hidden"] = hidden_scores(tensors["raw.hidden"], n, seq=seq, batch=batch, final_norm=final)
        manifest = dataclasses.replace(self.manifest, seq_aggregation=seq, batch_aggregation=batch,
                                       hidden_final_norm=final)
        return Scores(tensors=tensors, manifest=manifest)

    def check_belongs_to(self, arch, *, what: str = "the checkpoint") -> None:
        """Refuse scores computed on a model with another architecture."""
        found = arch.explicit().fingerprint()
        if found != self.manifest.arch_fingerprint:
            raise ScoresError(f"these scores were computed on architecture {self.manifest.arch_fingerprint} "
                              f"(from {self.manifest.checkpoint}), but {what} has architecture {found}; "
                              f"compute scores for it with `minitron importance`")

    def check_computed_on(self, ckpt_dir, *, what: str, allow_foreign: bool = False) -> None:
        """Refuse scores computed on another checkpoint than the torch_dist directory ckpt_dir (same
        architecture, other weights: another seed or step), by content fingerprint. With allow_foreign
        a mismatch is a warning on stderr."""
        import sys

        from megatron_minitron.model.integrity import fingerprint

        found, recorded = fingerprint(Path(ckpt_dir)), self.manifest.checkpoint_fingerprint
        if found == recorded:
            return
        if recorded:
            problem = (f"these scores were computed on checkpoint {recorded} (from {self.manifest.checkpoint}), but "
                       f"{what} is checkpoint {found}: same architecture, other weights")
        else:
            problem = (f"these scores (from {self.manifest.checkpoint}) record no checkpoint fingerprint (written by "
                       f"an older version), so they cannot be matched to {what}")
        if not allow_foreign:
            raise ScoresError(f"{problem}; compute its scores with `minitron importance`, or pass "
                              f"--allow-foreign-scores to use these anyway")
        print(f"warning: {problem}; using them because of --allow-foreign-scores", file=sys.stderr, flush=True)

    def summary(self, top: int = 3) -> str:
        """A few lines: most/least important layers and the spread of each score."""
        lines = []
        bi = self.tensors["layers_bi"]
        order = torch.argsort(bi, descending=True).tolist()
        lines.append(f"block importance: most important layers {order[:top]}, least {order[::-1][:top]} "
                     f"(BI {bi.max():.4f} .. {bi.min():.4f})")
        if "layers_lm_loss" in self.tensors:
            loss = self.tensors["layers_lm_loss"]
            order = torch.argsort(loss, descending=True).tolist()
            lines.append(f"LM loss without layer: most important {order[:top]}, least {order[::-1][:top]} "
                         f"(loss {loss.max():.4f} .. {loss.min():.4f})")
        for key in ("heads", "query_groups", "ffn", "shared_ffn", "experts", "experts_router_mass", "expert_ffn",
                    "hidden"):
            if key not in self.tensors:
                continue
            t = self.tensors[key]
            t = t[t.isfinite()]  # MoE models: NaN rows for the layers without such an MLP
            lines.append(f"{key:12s} {tuple(self.tensors[key].shape)}: min {t.min():.4g}  median {t.median():.4g}  "
                         f"max {t.max():.4g}")
        return "\n".join(lines)


def hidden_scores(raw_hidden: torch.Tensor, num_samples: int, *, seq: str, batch: str,
                  final_norm: bool) -> torch.Tensor:
    """One global hidden-channel ranking: the sum over LayerNorms of each norm's channel scores."""
    rows = raw_hidden if final_norm else raw_hidden[:-1]
    return aggregate(rows, num_samples, seq=seq, batch=batch).sum(0)


def save_scores(scores: Scores, out: str | os.PathLike) -> Path:
    """Write SCORES_DIR (through a temporary directory renamed at the end)."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in scores.tensors.items()}, str(tmp / TENSORS),
              metadata={"format": FORMAT})
    (tmp / MANIFEST).write_text(json.dumps(scores.manifest.to_json(), indent=2) + "\n")
    tmp.rename(out)
    return out


def check_new_scores_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """An output path that holds no scores yet (or may be replaced when overwrite is set)."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ScoresError(f"--out {out} exists and is not a directory")
        if (out / TENSORS).exists() or (out / MANIFEST).exists():
            if not overwrite:
                raise ScoresError(f"--out {out} already holds scores; choose a new directory or pass --overwrite")
        elif any(out.iterdir()):
            raise ScoresError(f"--out {out} exists and is not empty; choose a new directory")
    return out


def load_scores(path: str | os.PathLike) -> Scores:
    """Read a scores directory; clear errors for anything missing or malformed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise ScoresError(f"scores directory {path} does not exist")
    for name in (TENSORS, MANIFEST):
        if not (path / name).is_file():
            raise ScoresError(f"{path} is not a scores directory: {name} is missing (write one with "
                              f"`minitron importance`)")
    try:
        manifest = ScoresManifest.from_json(json.loads((path / MANIFEST).read_text()))
    except json.JSONDecodeError as error:
        raise ScoresError(f"{path / MANIFEST} is not valid JSON: {error}") from None
    try:
        tensors = load_file(str(path / TENSORS))
    except (SafetensorError, OSError) as error:
        raise ScoresError(f"{path / TENSORS} cannot be read ({error}); it is truncated or corrupt") from None
    _check_shapes(tensors, manifest, path)
    return Scores(tensors=tensors, manifest=manifest)


def _check_shapes(tensors: dict[str, torch.Tensor], manifest: ScoresManifest, path: Path) -> None:
    from megatron_minitron.config import ArchConfig

    arch = ArchConfig.from_json(manifest.architecture)
    L, expected = arch.num_layers, {
        "heads": (arch.num_layers, arch.num_attention_heads),
        "query_groups": (arch.num_layers, arch.query_groups),
        "ffn": (arch.num_layers, arch.ffn_hidden_size),
        "hidden": (arch.hidden_size,),
        "layers_bi": (arch.num_layers,),
    }
    if arch.is_moe:
        E = arch.num_experts
        expected.update(experts=(L, E), experts_router_mass=(L, E), expert_ffn=(L, E, arch.expert_ffn_hidden_size))
        if arch.moe_shared_expert_ffn_hidden_size is not None:
            expected["shared_ffn"] = (L, arch.moe_shared_expert_ffn_hidden_size)
        if all(arch.moe_layers):
            del expected["ffn"]
    for key, shape in expected.items():
        if key not in tensors:
            raise ScoresError(f"{path / TENSORS} lacks {key!r}")
        if tuple(tensors[key].shape) != shape:
            raise ScoresError(f"{path / TENSORS}: {key!r} has shape {tuple(tensors[key].shape)}, but the scored "
                              f"architecture needs {shape}")
    if "layers_lm_loss" in tensors and tuple(tensors["layers_lm_loss"].shape) != (L,):
        raise ScoresError(f"{path / TENSORS}: layers_lm_loss has shape {tuple(tensors['layers_lm_loss'].shape)}")

