"""The point of the search (DESIGN.md §1, the paper's candidate retraining): its winner, distilled in
full, is no worse than a hand-picked student of the same budget distilled the same way; and the
search's in-process winner run equals a separate `minitron prune` + `minitron distill` of its plan.

The space (tiny teacher, budget 1.0M ± 5%): L4-h56-f96, L2-h56-f192 and L2-h56-f96. The hand-picked
student is the depth-pruned one a user would reach for first: drop half the layers, shrink hidden to
fit (L2-h56-f192, 1,003,800 parameters), the kind of shape the paper found to lose against width
pruning after retraining.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_minitron.cli import main
from megatron_minitron.search.run import read_curves
from tests.conftest import REPO, child_env

WINNER_ITERS = 60
RUN = ["--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "2e-3",
       "--lr-warmup-iters", "1", "--eval-iters", "4", "--eval-interval", "10", "--log-interval", "10"]
SPACE = ["--layers", "4", "2", "--hidden", "56", "--ffn", "192", "96", "--budget", "1.0M"]


def _minitron(*argv, cwd=REPO):
    proc = subprocess.run([sys.executable, "-m", "megatron_minitron", *map(str, argv)], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _distilled(teacher, student, save, cache):
    _minitron("distill", "--teacher", teacher, "--student", student, "--save", save, "--cache-dir", cache, *RUN,
              "--train-iters", WINNER_ITERS)
    return read_curves(save / "metrics.jsonl")


@pytest.fixture(scope="module")
def runs(tiny_teacher, tiny_scores, data_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("search-winner")
    _minitron("search", "--load", tiny_teacher, "--scores", tiny_scores, "--out", root / "search", "--cache-dir",
              data_cache, *SPACE, *RUN, "--train-iters", "10", "--winner-iters", WINNER_ITERS)
    result = json.loads((root / "search" / "search.json").read_text())
    _minitron("prune", "--load", tiny_teacher, "--scores", tiny_scores, "--save", root / "hand",
              "--target-num-layers", "2", "--target-hidden-size", "56")
    hand = _distilled(tiny_teacher, root / "hand", root / "hand-run", data_cache)
    _minitron("prune", "--load", tiny_teacher, "--plan", root / "search" / "best_plan.json", "--save", root / "best")
    separate = _distilled(tiny_teacher, root / "best", root / "best-run", data_cache)
    return {"root": root, "search": result, "hand": hand, "separate": separate}


def test_fully_distilled_winner_is_no_worse_than_a_hand_picked_student(runs):
    search = runs["search"]
    assert len(search["candidates"]) == 3
    winner = search["winner_distilled"]
    assert winner["name"] == search["winner"]
    assert [p[0] for p in winner["curve"]] == list(range(10, WINNER_ITERS + 1, 10))
    assert winner["val_lm_loss"] <= runs["hand"]["val_lm_loss"], (winner["val_lm_loss"], runs["hand"])
    assert winner["val_lm_loss"] < min(c["val_lm_loss"] for c in search["candidates"])  # the longer run helps
    assert f"distilled for {WINNER_ITERS} steps" in (runs["root"] / "search" / "search.md").read_text()


def test_the_search_winner_run_equals_a_separate_prune_and_distill(runs):
    """Teacher and data reused in one process change nothing: same data order, same seed, same losses."""
    winner, separate = runs["search"]["winner_distilled"], runs["separate"]
    assert [p[0] for p in winner["curve"]] == [p[0] for p in separate["curve"]]
    for (_, a), (_, b) in zip(winner["curve"], separate["curve"]):
        assert a == pytest.approx(b, rel=1e-6, abs=0)
    assert winner["zero_shot_lm_loss"] == pytest.approx(separate["zero_shot_lm_loss"], rel=1e-6, abs=0)


def test_resume_with_another_winner_length_is_refused(runs, tiny_teacher, tiny_scores, data_cache, capsys):
    argv = ["search", "--load", tiny_teacher, "--scores", tiny_scores, "--out", runs["root"] / "search",
            "--cache-dir", data_cache, *SPACE, *RUN, "--train-iters", "10", "--resume", "--winner-iters", "30"]
    assert main(list(map(str, argv))) == 2
    err = capsys.readouterr().err
    assert f"holds the winner distilled for {WINNER_ITERS} steps" in err and "--winner-iters 30" in err
