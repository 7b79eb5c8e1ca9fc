"""Targets from argparse flags and from one JSON export config; typos and conflicts are refused."""

from __future__ import annotations

import argparse
import json

import pytest

from megatron_minitron.plan import PlanError, Target, add_target_arguments, load_target, target_from_args


def parse(*argv: str) -> Target:
    parser = argparse.ArgumentParser()
    add_target_arguments(parser)
    return target_from_args(parser.parse_args(list(argv)))


def write(tmp_path, data) -> str:
    path = tmp_path / "export.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_flags():
    assert parse("--target-num-layers", "6", "--target-hidden-size", "3072", "--target-ffn-hidden-size", "9216",
                 "--target-num-attention-heads", "24", "--target-num-query-groups", "4", "--layer-metric", "block",
                 "--head-merge") == Target(num_layers=6, hidden_size=3072, ffn_hidden_size=9216,
                                           num_attention_heads=24, num_query_groups=4, layer_metric="block",
                                           head_merge=True)
    target = parse("--drop-layers", "4", "3")
    assert target.drop_layers == (3, 4) and target.num_layers is None and target.metric == "bi"
    assert parse().is_empty() and not parse("--target-hidden-size", "8").is_empty()


def test_export_config(tmp_path):
    data = {"num_layers": 24, "hidden_size": 3072, "ffn_hidden_size": 9216, "num_attention_heads": 32,
            "num_query_groups": 8, "layer_metric": "lm_loss"}
    path = write(tmp_path, data)
    target = parse("--export-config", path)
    assert target == Target(**data) == load_target(path)
    assert target.to_json() == data
    assert parse("--export-config", write(tmp_path, {"drop_layers": [7, 1]})).drop_layers == (1, 7)
    # --head-merge is how to prune, not what to keep: it combines with an export config.
    assert parse("--export-config", path, "--head-merge").head_merge


@pytest.mark.parametrize("data, message", [
    ({"hidden": 3072, "num_layer": 3}, "has unknown keys ['hidden', 'num_layer']"),
    ([24, 3072], "must be a JSON object of target sizes, got list"),
    ({"num_layers": "24"}, "target num_layers must be an integer, got '24'"),
    ({"layer_metric": "ppl"}, "layer_metric='ppl' is not one of ['bi', 'lm_loss', 'block']"),
    ({"drop_layers": [1, 1]}, "drop_layers lists a layer twice: [1, 1]"),
    ({"drop_layers": [1], "layer_metric": "bi"}, "give either drop_layers or layer_metric, not both"),
])
def test_bad_export_config(tmp_path, data, message):
    with pytest.raises(PlanError) as info:
        parse("--export-config", write(tmp_path, data))
    assert message in str(info.value)


def test_unreadable_export_config(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        load_target(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{num_layers: 3")
    with pytest.raises(PlanError, match="is not valid JSON"):
        load_target(tmp_path / "bad.json")


@pytest.mark.parametrize("flags, named", [
    (["--target-num-layers", "3"], "--target-num-layers"),
    (["--drop-layers", "1", "--target-hidden-size", "8"], "--target-hidden-size, --drop-layers"),
    (["--layer-metric", "bi"], "--layer-metric"),
])
def test_flags_and_export_config_together_are_refused(tmp_path, flags, named):
    with pytest.raises(PlanError) as info:
        parse("--export-config", write(tmp_path, {"num_layers": 2}), *flags)
    assert f"and {named} both give a target" in str(info.value)


def test_drop_layers_with_metric_flag_is_refused():
    with pytest.raises(PlanError, match="give either drop_layers or layer_metric"):
        parse("--drop-layers", "1", "--layer-metric", "lm_loss")


def test_unknown_flag_value_is_refused_by_argparse():
    with pytest.raises(SystemExit):
        parse("--layer-metric", "ppl")
