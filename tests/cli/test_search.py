"""`minitron search` end to end on the `tiny` teacher: two candidates distilled briefly, a search killed
after its first candidate and resumed ranks exactly like an uninterrupted one, and bad input is
refused before any pruning or training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_minitron.cli import main
from tests.conftest import REPO, child_env

SPACE = ["--hidden", "56", "48", "--ffn", "96", "--budget", "950k", "--tolerance", "0.1"]
RUN = ["--train-iters", "6", "--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", "8",
       "--lr", "2e-3", "--lr-warmup-iters", "1", "--eval-interval", "3", "--eval-iters", "2", "--log-interval", "3"]


def _command(teacher, scores, out, cache, *extra):
    return [sys.executable, "-m", "megatron_minitron", "search", "--load", str(teacher), "--scores", str(scores),
            "--out", str(out), "--cache-dir", str(cache), *SPACE, *RUN, *extra]


@pytest.fixture(scope="module")
def searches(tiny_teacher, tiny_scores, data_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    full = subprocess.run(_command(tiny_teacher, tiny_scores, root / "full", data_cache), cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    # the same search, killed (SIGKILL) as soon as its first candidate is recorded, then resumed; the
    # whole process group is killed, as a scheduler kills a job (megatron's checkpoint writer starts a
    # multiprocessing Manager server in the search's process, which would outlive a kill of that alone)
    killed = subprocess.Popen(_command(tiny_teacher, tiny_scores, root / "killed", data_cache), cwd=REPO,
                              env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 600
    while not list((root / "killed").glob("candidates/*/result.json")) and time.time() < deadline:
        assert killed.poll() is None, "the search ended before it could be killed"
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert len(list((root / "killed").glob("candidates/*/result.json"))) == 1
    resumed = subprocess.run(_command(tiny_teacher, tiny_scores, root / "killed", data_cache, "--resume"), cwd=REPO,
                             env=child_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "finished earlier" in resumed.stdout
    return root


def _result(path):
    return json.loads((path / "search.json").read_text())


def test_search_ranks_every_candidate_and_saves_the_best_plan(searches):
    result = _result(searches / "full")
    names = {c["name"] for c in result["candidates"]}
    assert names == {"L4-h56-f96-H4-G2", "L4-h48-f96-H4-G2"}
    assert result["winner"] == result["ranking"][0]
    best = min(result["candidates"], key=lambda c: c["val_lm_loss"])
    assert best["name"] == result["winner"]
    for c in result["candidates"]:
        assert abs(c["params"] - 950_000) <= 95_000
        assert c["val_lm_loss"] < c["zero_shot_lm_loss"]  # the short distillation helps every candidate
        assert [p[0] for p in c["curve"]] == [3, 6]
    plan = json.loads((searches / "full" / "best_plan.json").read_text())
    assert plan["target"]["hidden_size"] == int(result["winner"].split("-h")[1].split("-")[0])
    table = (searches / "full" / "search.md").read_text()
    assert result["winner"] in table and "zero-shot" in table
    assert not list((searches / "full").glob("candidates/*/run/iter_*"))  # checkpoints removed after each result


def test_killed_and_resumed_search_equals_the_uninterrupted_one(searches):
    full, resumed = _result(searches / "full"), _result(searches / "killed")
    assert resumed["ranking"] == full["ranking"]
    for a, b in zip(sorted(full["candidates"], key=lambda c: c["name"]),
                    sorted(resumed["candidates"], key=lambda c: c["name"])):
        assert a["curve"] == b["curve"] and a["zero_shot_lm_loss"] == b["zero_shot_lm_loss"]


def _fails(argv, capsys) -> str:
    assert main(["search", *map(str, argv)]) == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_before_any_work(tiny_teacher, tiny_scores, tmp_path, capsys):
    base = ["--load", tiny_teacher, "--scores", tiny_scores, "--out", tmp_path / "s"]
    assert "larger than the source model" in _fails([*base, "--budget", "5M"], capsys)
    assert "hidden_size value 80 is outside 1..64" in _fails([*base, "--budget", "900k", "--hidden", "80"], capsys)
    err = _fails([*base, "--budget", "900k", "--hidden", "64", "--tolerance", "0.01"], capsys)
    assert "no candidate left: of 1 combinations, 1 by parameter count outside 900,000 ± 1%" in err
    assert "not a parameter count" in _fails_argparse([*base, "--budget", "lots"], capsys)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    assert "is not a search directory" in _fails([*base[:4], "--out", tmp_path / "other", "--budget", "900k"], capsys)
    assert not (tmp_path / "s").exists()


def _fails_argparse(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        main(["search", *map(str, argv)])
    return capsys.readouterr().err


def test_scores_of_another_model_are_refused(tiny_scores, single_rank_runtime, tmp_path, capsys):
    from megatron_minitron.config import preset
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.checkpoint import save_checkpoint

    other = tmp_path / "other"
    save_checkpoint(other, model=build_model(preset("tiny"), single_rank_runtime), arch=preset("tiny"),
                    runtime=single_rank_runtime, iteration=None)
    err = _fails(["--load", other, "--scores", tiny_scores, "--out", tmp_path / "s", "--budget", "200k"], capsys)
    assert "these scores were computed on architecture" in err
