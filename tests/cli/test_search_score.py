"""`minitron search --score TASK[:metric]` ranks the candidates by a downstream task score (the built-in offline
task, scored after each candidate's distillation) and `--min-score` stops the search with a clear error, before
the winner's distillation, when the best candidate is below the floor. Bad task metrics are refused before OUT is
touched."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from megatron_minitron.cli import main
from megatron_minitron.search.run import ScoreFloorError, check_floor, rank
from tests.conftest import REPO, child_env

TASK = "minitron_continuation"
SPACE = ["--hidden", "56", "48", "--ffn", "96", "--budget", "950k", "--tolerance", "0.1"]
RUN = ["--train-iters", "4", "--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", "8",
       "--lr", "2e-3", "--lr-warmup-iters", "1", "--eval-interval", "4", "--eval-iters", "2", "--log-interval", "2"]


def _search(teacher, scores, out, cache, tmp_path, *extra):
    env = child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"))
    cmd = [sys.executable, "-m", "megatron_minitron", "search", "--load", str(teacher), "--scores", str(scores),
           "--out", str(out), "--cache-dir", str(cache), *SPACE, *RUN, *map(str, extra)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_search_ranks_by_task_score_and_min_score_stops_before_the_winner(tiny_teacher, tiny_scores, data_cache,
                                                                          tmp_path):
    pytest.importorskip("lm_eval", reason="--score needs lm-eval (pip install -e .[test])")
    out = tmp_path / "search"
    # accuracy is at most 1, so a floor of 1.5 cannot be reached: the search must stop after ranking
    proc = _search(tiny_teacher, tiny_scores, out, data_cache, tmp_path, "--score", f"{TASK}:acc", "--score-limit", 24,
                   "--min-score", 1.5, "--winner-iters", 2)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "search.json").read_text())
    assert result["score"] == {"task": TASK, "metric": "acc", "higher_is_better": True}
    candidates = result["candidates"]
    assert {c["name"] for c in candidates} == {"L4-h56-f96-H4-G2", "L4-h48-f96-H4-G2"}
    for c in candidates:  # the score is the one the candidate's own run logged at its last step
        records = [json.loads(line) for line in (out / "candidates" / c["name"] / "run" / "metrics.jsonl")
                   .read_text().splitlines()]
        last = [r for r in records if r["kind"] == "tasks"][-1]
        assert last["iteration"] == 4 and c["score"] == last[f"{TASK}/acc"]
        assert 0.0 <= c["score"] <= 1.0 and math.isfinite(c["val_lm_loss"])
    best = max(candidates, key=lambda c: (c["score"], -c["val_lm_loss"]))
    assert result["winner"] == best["name"] == result["ranking"][0]
    assert result["loss_winner"] == min(candidates, key=lambda c: c["val_lm_loss"])["name"]
    table = (out / "search.md").read_text()
    assert f"{TASK} acc" in table and f"{best['score']:.4f}" in table
    line = proc.stderr.strip().splitlines()[-1]
    assert line == (f"minitron search: error: --min-score 1.5: the best candidate, {best['name']}, scores {TASK} acc "
                    f"{best['score']:.4f}, below the floor; no winner was distilled further (every candidate is in "
                    f"search.md). Lower --min-score, raise --budget or distill candidates longer (--train-iters)")
    assert not (out / "winner").exists()


def test_bad_score_requests_are_refused_before_out_is_written(tiny_teacher, tiny_scores, data_cache, tmp_path,
                                                             capsys):
    pytest.importorskip("lm_eval", reason="--score needs lm-eval (pip install -e .[test])")
    proc = _search(tiny_teacher, tiny_scores, tmp_path / "a", data_cache, tmp_path, "--score", f"{TASK}:accuracy")
    assert proc.returncode == 2
    assert (f"task '{TASK}' has no metric 'accuracy'; its metrics: acc, acc_norm, acc_mutual_info"
            in proc.stderr), proc.stderr[-2000:]
    proc = _search(tiny_teacher, tiny_scores, tmp_path / "b", data_cache, tmp_path, "--score", "minitron_heldout",
                   "--min-score", 3)
    assert proc.returncode == 2
    assert "minitron_heldout:word_perplexity is better when smaller, so a floor on it means nothing" in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    base = ["search", "--load", str(tiny_teacher), "--scores", str(tiny_scores), "--out", str(tmp_path / "c"),
            "--budget", "900k"]
    assert main([*base, "--min-score", "0.3"]) == 2
    assert "--min-score needs --score TASK[:METRIC]" in capsys.readouterr().err
    assert main([*base, "--score", f"{TASK}:"]) == 2
    assert "give one task and optionally its metric" in capsys.readouterr().err
    assert main([*base, "--expert-ffn", "32"]) == 2  # the MoE axes' flags reach the space
    assert "search space axis moe_ffn_hidden_size needs a Mixture-of-Experts source" in capsys.readouterr().err


def _result(name, val, score):
    return {"name": name, "val_lm_loss": val, "zero_shot_lm_loss": val + 1, "score": score}


def test_rank_follows_the_metric_direction():
    results = [_result("a", 5.0, 0.30), _result("b", 4.0, 0.25), _result("c", 4.5, 0.30), _result("d", 3.0, math.nan)]
    higher = rank(results, {"task": TASK, "metric": "acc", "higher_is_better": True})
    # the best accuracy wins, a tie goes to the lower loss, NaN ranks last; the loss ranking is kept beside it
    assert higher["ranking"] == ["c", "a", "b", "d"] and higher["winner"] == "c"
    assert higher["loss_ranking"] == ["d", "b", "c", "a"] and higher["loss_winner"] == "d"
    lower = rank(results, {"task": "minitron_heldout", "metric": "word_perplexity", "higher_is_better": False})
    assert lower["ranking"] == ["b", "c", "a", "d"]
    check_floor(results, higher, 0.30)  # exactly at the floor passes
    with pytest.raises(ScoreFloorError, match=r"--min-score 0.31: the best candidate, c, scores minitron_continuation "
                                              r"acc 0.3000, below the floor"):
        check_floor(results, higher, 0.31)
