"""minitron.json's text (checkpoint.meta_text): the same value as json writes, lists of numbers on one line."""

from __future__ import annotations

import json
import math

from megatron_minitron.model.checkpoint import meta_text


def test_reads_back_as_json_writes_it():
    architecture = {"hidden_size": 64, "norm_epsilon": 1e-6, "bias": None, "name": "qwen3 \u00e9", "empty": {},
                    "flags": [True, False]}
    meta = {"format": "megatron-minitron/1", "architecture": architecture,
            "plan": {"experts": [[0, 2], [1, 3]], "expert_ffn": [[[0, 1, 5], [2]], [[3], [4, 6]]], "none": [],
                     "mixed": [1, [2, 3], {"k": "v"}], "pair": (1, 2)},
            "loss": float("nan")}
    text = meta_text(meta)
    got, want = json.loads(text), json.loads(json.dumps(meta))
    assert math.isnan(got.pop("loss")) and math.isnan(want.pop("loss"))
    assert got == want
    assert text.endswith("}\n") and "\n  \"architecture\": {\n    \"hidden_size\": 64," in text


def test_a_list_of_numbers_is_one_line():
    experts = [list(range(0, 128, 2)) for _ in range(48)]
    expert_ffn = [[list(range(3, 768, 4)) for _ in range(8)] for _ in range(48)]
    text = meta_text({"plan": {"experts": experts, "expert_ffn": expert_ffn}})
    lines = text.splitlines()
    assert f"        {json.dumps(expert_ffn[0][0])}," in lines  # layer 0, expert 0, at depth 4
    # a line per innermost list, plus the brackets around each level and the two objects' lines
    assert len(lines) == 48 + 48 * 8 + 2 * 48 + 8
    one_per_number = json.dumps({"plan": {"experts": experts, "expert_ffn": expert_ffn}}, indent=2)
    assert len(one_per_number.splitlines()) > 75_000
