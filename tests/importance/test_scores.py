"""Scores directories: round trip, re-aggregation from raw statistics, and clear errors for files that
are missing, corrupt, or belong to another model."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_minitron.config import preset
from megatron_minitron.importance.scores import (Scores, ScoresError, ScoresManifest, check_new_scores_dir,
                                                 load_scores, save_scores)
from megatron_minitron.importance.stats import RAW_WIDTH, aggregate

ARCH = preset("tiny")


def make_scores(arch=ARCH) -> Scores:
    g = torch.Generator().manual_seed(0)
    L, H, G, F, h = arch.num_layers, arch.num_attention_heads, arch.query_groups, arch.ffn_hidden_size, arch.hidden_size
    raw = {f"raw.{k}": torch.rand(*shape, RAW_WIDTH, generator=g) * 10 + 20 for k, shape in
           {"heads": (L, H), "query_groups": (L, G), "ffn": (L, F), "hidden": (2 * L + 1, h)}.items()}
    tensors = {**raw, "heads": torch.rand(L, H), "query_groups": torch.rand(L, G), "ffn": torch.rand(L, F),
               "hidden": torch.rand(h), "layers_bi": torch.rand(L)}
    manifest = ScoresManifest(architecture=arch.explicit().to_json(), arch_fingerprint=arch.explicit().fingerprint(),
                              checkpoint="ckpt", iteration=3, data={"embedded": "x"}, num_samples=8, seq_length=16,
                              micro_batch_size=2, seed=1)
    return Scores(tensors=tensors, manifest=manifest)


def test_round_trip(tmp_path):
    scores = make_scores()
    save_scores(scores, tmp_path / "s")
    back = load_scores(tmp_path / "s")
    assert back.manifest == scores.manifest
    assert all(torch.equal(back[k], v) for k, v in scores.tensors.items())
    assert not (tmp_path / "s.partial").exists()


def test_any_aggregation_is_recomputed_from_raw():
    scores = make_scores()
    other = scores.aggregated(seq="l2", batch="var", hidden_final_norm=True)
    torch.testing.assert_close(other["heads"], aggregate(scores["raw.heads"], 8, seq="l2", batch="var"))
    torch.testing.assert_close(other["hidden"], aggregate(scores["raw.hidden"], 8, seq="l2", batch="var").sum(0))
    without_final = scores.aggregated(seq="l2", batch="var", hidden_final_norm=False)
    torch.testing.assert_close(without_final["hidden"],
                               aggregate(scores["raw.hidden"][:-1], 8, seq="l2", batch="var").sum(0))
    assert other.manifest.seq_aggregation == "l2" and other.manifest.batch_aggregation == "var"


def test_scores_of_another_model_are_refused():
    other = preset("tiny").replace(ffn_hidden_size=128)
    with pytest.raises(ScoresError, match="computed on architecture .* compute scores for it"):
        make_scores().check_belongs_to(other)
    make_scores().check_belongs_to(ARCH)


def test_broken_directories_are_named(tmp_path):
    with pytest.raises(ScoresError, match="does not exist"):
        load_scores(tmp_path / "none")
    save_scores(make_scores(), tmp_path / "s")
    data = (tmp_path / "s" / "scores.safetensors").read_bytes()
    (tmp_path / "s" / "scores.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ScoresError, match="scores.safetensors cannot be read .* truncated or corrupt"):
        load_scores(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(ScoresError, match="manifest.json is missing"):
        load_scores(tmp_path / "s")


def test_shapes_must_match_the_manifest(tmp_path):
    scores = make_scores()
    bad = Scores(tensors={**scores.tensors, "ffn": torch.rand(4, 100)}, manifest=scores.manifest)
    save_scores(bad, tmp_path / "s")
    with pytest.raises(ScoresError, match=r"'ffn' has shape \(4, 100\), but the scored architecture needs \(4, 192\)"):
        load_scores(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(ScoresError, match="format 'other/9'"):
        load_scores(tmp_path / "s")


def test_output_directory_rules(tmp_path):
    save_scores(make_scores(), tmp_path / "s")
    with pytest.raises(ScoresError, match="already holds scores"):
        check_new_scores_dir(tmp_path / "s")
    check_new_scores_dir(tmp_path / "s", overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(ScoresError, match="exists and is not empty"):
        check_new_scores_dir(tmp_path / "other", overwrite=True)
