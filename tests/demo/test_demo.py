"""`minitron demo` end to end at a reduced size (the `tiny` teacher, a few steps, TP=2 on 2 processes):
every number of results.json and report.md is checked against the run's own files (metrics.jsonl of
each arm, the plans, the pruned checkpoints), a second run reuses the cached teacher, and bad input is
refused before any process starts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_minitron.cli import main
from tests.conftest import REPO, child_env

ITERS = 12
SIZE = ["--arch", "tiny", "--tp", "2", "--teacher-iters", "50", "--teacher-lr", "3e-3", "--retrain-lr", "2e-3",
        "--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", "8", "--eval-interval", "6",
        "--eval-iters", "4", "--calib-samples", "16", "--lm-loss-samples", "8", "--warmup-iters", "4"]
ARMS = ("width_kd", "depth_kd", "scratch", "width_lm")


TASK_LIMIT = 24


def _env(root: Path) -> dict:
    """Offline Hugging Face libraries (the built-in task needs no download), their cache in the test's directory."""
    return child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(root / "hf-datasets"))


def _demo(out: Path, cache: Path, data_cache: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_minitron", "demo", "--out", str(out), "--teacher-cache", str(cache),
           "--cache-dir", str(data_cache), *SIZE, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(out.parent), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("demo")
    proc = _demo(root / "run", root / "teachers", data_cache, "--retrain-iters", str(ITERS), "--task-limit",
                 str(TASK_LIMIT))
    return root, proc.stdout


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _row(report: str, first_cell: str, after: str = "") -> list[str]:
    """The first table row starting with first_cell, below the line containing `after`."""
    for line in report[report.index(after):].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"report.md has no table row {first_cell!r}")


def test_the_report_holds_the_arms_own_metrics(demo):
    root, _ = demo
    run = root / "run"
    results = json.loads((run / "results.json").read_text())
    report = (run / "report.md").read_text()
    tokens = {}
    for arm in ARMS:
        entry = results["arms"][arm]
        assert [run["seed"] for run in entry["runs"]] == [1234]  # one seed by default
        valid = _records(Path(entry["runs"][0]["path"]), "valid")
        train = _records(Path(entry["runs"][0]["path"]), "train")
        assert [r["iteration"] for r in valid] == [0, 6, 12]
        assert entry["curve"] == [[r["iteration"] * 8 * 64, r["val lm loss"]] for r in valid]
        assert entry["final"] == valid[-1]["val lm loss"] and entry["initial"] == valid[0]["val lm loss"]
        tokens[arm] = train[-1]["consumed_samples"] * 64
        assert entry["train_tokens"] == tokens[arm]
        row = _row(report, entry["label"])
        assert row[3] == f"{entry['initial']:.3f}" and row[4] == f"{entry['final']:.3f}", row
    assert set(tokens.values()) == {ITERS * 8 * 64}, f"arms trained on different token counts: {tokens}"


def test_zero_shot_losses_agree_with_the_arms_first_evaluations(demo):
    """The separate zero-shot evaluation of each pruned checkpoint equals the first validation of the arm
    that starts from it (distillation's teacher check, the LM-only arm's own step-0 evaluation)."""
    results = json.loads((demo[0] / "run" / "results.json").read_text())
    zero, arms = results["zero_shot"], results["arms"]
    assert arms["width_kd"]["initial"] == pytest.approx(zero["width"], rel=1e-5)
    assert arms["width_lm"]["initial"] == pytest.approx(zero["width"], rel=1e-5)
    assert arms["depth_kd"]["initial"] == pytest.approx(zero["depth"], rel=1e-5)
    assert arms["scratch"]["initial"] > zero["random"] > zero["teacher"]  # random weights know nothing yet
    assert results["teacher"]["val_loss"] == zero["teacher"]


def test_architectures_and_parameter_counts_are_the_checkpoints(demo):
    from megatron_minitron.model.checkpoint import resolve

    run = demo[0] / "run"
    results = json.loads((run / "results.json").read_text())
    report = (run / "report.md").read_text()
    models = results["models"]
    teacher = resolve(results["teacher"]["path"]).arch
    assert models["teacher"]["params"] == teacher.num_parameters()
    for name, label in (("width", "width-pruned"), ("depth", "depth-pruned")):
        arch = resolve(run / "pruned" / name).arch
        assert models[name]["params"] == arch.num_parameters()
        assert (models[name]["num_layers"], models[name]["hidden_size"], models[name]["ffn_hidden_size"]) == (
            arch.num_layers, arch.hidden_size, arch.ffn_hidden_size)
        assert _row(report, label)[6] == f"{arch.num_parameters():,}"
    assert (models["width"]["hidden_size"], models["width"]["ffn_hidden_size"],
            models["width"]["num_attention_heads"]) == (48, 96, 2)
    # depth: the contiguous block whose removal cost the least LM loss
    imp = results["importance"]
    dropped = models["depth"]["dropped_layers"]
    start = min(range(len(imp["block_lm_loss"])), key=imp["block_lm_loss"].__getitem__)
    assert dropped == list(range(start, start + imp["block_size"]))
    assert models["depth"]["num_layers"] == teacher.num_layers - imp["block_size"]


def test_aggregation_grid_and_findings_follow_from_the_numbers(demo):
    run = demo[0] / "run"
    results = json.loads((run / "results.json").read_text())
    report = (run / "report.md").read_text()
    zero, arms, grid = results["zero_shot"], results["arms"], results["grid"]
    for i, seq in enumerate(grid["seq"]):
        assert grid["loss"][i] == [zero[f"grid-{seq}-{b}"] for b in grid["batch"]]
        assert [c.strip("*") for c in _row(report, seq)[1:]] == [f"{v:.3f}" for v in grid["loss"][i]]
    assert zero["grid-mean-l2"] == zero["width"]  # the width arm is the (mean, L2) ranking
    expected = {"kd_beats_lm": arms["width_kd"]["final"] < arms["width_lm"]["final"],
                "pruned_kd_beats_scratch": arms["width_kd"]["final"] < arms["scratch"]["final"],
                "width_beats_depth": arms["width_kd"]["final"] < arms["depth_kd"]["final"],
                "importance_beats_random": zero["width"] < zero["random"],
                "mean_l2_among_best": sorted(sum(grid["loss"], [])).index(zero["grid-mean-l2"]) < 3}
    for finding in results["findings"]:
        assert finding["agrees"] == expected[finding["id"]], finding
        assert _row(report, finding["claim"])[3] == ("agrees" if finding["agrees"] else "**disagrees**") + " (one seed)"
    assert f"agrees with {sum(expected.values())} of the 5 paper findings below, from one seed" in report


def test_task_accuracy_of_teacher_and_students_in_the_report(demo, data_cache):
    """The built-in task's accuracy of the teacher and every retrained student sits beside their losses, equal
    to results.json, with its chance level; a separate `minitron evaluate` of a student (TP=1, not the demo's
    TP=2) gives the same accuracy."""
    pytest.importorskip("lm_eval", reason="the demo scores the built-in task with lm-eval (pip install -e .[test])")
    root = demo[0]
    results = json.loads((root / "run" / "results.json").read_text())
    report = (root / "run" / "report.md").read_text()
    tasks = results["tasks"]
    assert (tasks["task"], tasks["chance"], tasks["documents"]) == ("minitron_continuation", 0.25, TASK_LIMIT)
    assert set(tasks["models"]) == {"teacher", *ARMS}
    assert "| minitron_continuation acc (chance 0.25) | acc_mutual_info |" in report
    assert "a uniform guess scores 0.25" in report
    for name, label in (("teacher", "teacher"), *((arm, results["arms"][arm]["label"]) for arm in ARMS)):
        m = tasks["models"][name]
        assert 0.0 <= m["acc"] <= 1.0
        row = _row(report, label, after="## Retraining")
        assert row[6:] == [f"{m['acc']:.3f} ± {m['acc_stderr']:.3f}",
                           f"{m['acc_mutual_info']:.3f} ± {m['acc_mutual_info_stderr']:.3f}"]
    student = Path(results["arms"]["width_kd"]["runs"][0]["path"])
    cmd = [sys.executable, "-m", "megatron_minitron", "evaluate", "--load", str(student), "--tasks",
           "minitron_continuation", "--limit", str(TASK_LIMIT), "--cache-dir", str(data_cache), "--out",
           str(root / "eval")]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads((root / "eval" / "results.json").read_text())["results"]["minitron_continuation"]
    assert again["acc,none"] == tasks["models"]["width_kd"]["acc"]
    assert again["acc_mutual_info,none"] == tasks["models"]["width_kd"]["acc_mutual_info"]


def test_plots_are_written(demo):
    run = demo[0] / "run"
    results = json.loads((run / "results.json").read_text())
    names = {Path(p).name for p in results["plots"]}
    assert names == {"loss_vs_tokens.png", "importance_heads.png", "importance_ffn.png", "layer_scores.png",
                     "aggregation_grid.png"}
    for p in results["plots"]:
        data = (run / p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, p
        assert f"]({p})" in (run / "report.md").read_text()


def test_a_second_run_reuses_the_teacher_and_replaces_its_own_output(demo, data_cache):
    root, first_stdout = demo
    results = json.loads((root / "run" / "results.json").read_text())
    teacher = Path(results["teacher"]["path"])
    assert results["teacher"]["source"] == "trained" and teacher.parent == root / "teachers"
    before = (teacher / "metrics.jsonl").stat().st_mtime_ns
    proc = _demo(root / "run", root / "teachers", data_cache, "--retrain-iters", "3", "--retrain-warmup-iters", "1",
                 "--eval-interval", "0", "--no-plots", "--task-limit", "0")
    again = json.loads((root / "run" / "results.json").read_text())
    assert again["teacher"]["source"] == "cache" and again["teacher"]["path"] == str(teacher)
    assert again["teacher"]["val_loss"] == pytest.approx(results["teacher"]["val_loss"], rel=1e-6)
    assert (teacher / "metrics.jsonl").stat().st_mtime_ns == before
    assert "teacher: reusing" in proc.stdout and not re.search(r"teacher: training", proc.stdout)
    assert again["arms"]["width_kd"]["train_steps"] == 3 and again["plots"] == []
    assert again["tasks"] is None and "The built-in task was not scored" in (root / "run" / "report.md").read_text()
    assert not (root / "run" / "plots").exists()  # the previous run's output was replaced


def test_bad_input_is_refused_before_any_process_starts(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):  # as a plain command, not one of a launched job's ranks
        monkeypatch.delenv(name, raising=False)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    assert main(["demo", "--out", str(foreign)]) == 2
    assert "is not a previous demo run" in capsys.readouterr().err
    assert (foreign / "todo.txt").read_text() == "mine"
    assert main(["demo", "--out", str(tmp_path / "r"), "--tp", "3"]) == 2
    assert "tensor-parallel size 3 does not divide" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "r"), "--retrain-warmup-iters", "90", "--retrain-iters", "80"]) == 2
    assert "--retrain-warmup-iters 90 must be >= 0 and below --retrain-iters 80" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "r"), "--nproc", "3"]) == 2
    assert "not divisible by TP x PP" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_default_targets_halve_the_small_teacher_at_equal_width_and_depth_parameters():
    from megatron_minitron.config import preset
    from megatron_minitron.demo.config import DemoConfig, default_targets
    from megatron_minitron.plan.make import check_target

    teacher = preset("small").explicit()
    width, depth = default_targets(teacher, DemoConfig())
    sizes = check_target(teacher, width, tensor_parallel=2)
    width_params = teacher.replace(**sizes, kv_channels=teacher.head_dim).num_parameters()
    depth_params = teacher.replace(num_layers=depth.num_layers).num_parameters()
    assert (sizes["hidden_size"], sizes["ffn_hidden_size"], sizes["num_attention_heads"]) == (192, 384, 4)
    assert depth.num_layers == 2 and depth.layer_metric == "block"
    assert 0.5 < width_params / teacher.num_parameters() < 0.6
    assert abs(width_params - depth_params) < 0.02 * teacher.num_parameters()
    # every other depth is further from the width target's parameter count
    gap = abs(depth_params - width_params)
    for layers in range(1, teacher.num_layers):
        assert abs(teacher.replace(num_layers=layers).num_parameters() - width_params) >= gap


def test_a_verdict_needs_a_margin_beyond_the_spread():
    """Constructed per-seed margins (positive: the paper's direction): one seed decides by sign and says so in
    the report; several give a verdict only when the mean margin exceeds the sample standard deviation."""
    import statistics

    from megatron_minitron.demo.report import _findings_section, mean_spread, verdict

    assert verdict([0.011]) == "agrees" and verdict([-0.002]) == "disagrees"
    assert verdict([0.012, 0.010, 0.011]) == "agrees"
    assert verdict([-0.05, -0.04]) == "disagrees"
    assert verdict([0.03, -0.01]) == "within noise"  # mean 0.01 < spread 0.028
    assert verdict([0.10, 0.01]) == "within noise"  # same direction, but 0.055 < 0.064: the smaller under 17%
    assert verdict([0.10, 0.02]) == "agrees"  # 0.06 > 0.057
    for values in ([5.7, 5.75, 5.71], [0.1, 0.02], [3.0]):
        mean, spread = mean_spread(values)
        assert mean == pytest.approx(statistics.mean(values), abs=1e-12)
        assert spread == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0, abs=1e-12)
    finding = {"claim": "KD beats LM", "paper": "p", "measured": "m", "verdict": "within noise"}
    lines = "\n".join(_findings_section({"seeds": [1, 2], "spread": "sample standard deviation", "findings": [finding],
                                         "per_seed": []}))
    assert _row(lines, "KD beats LM")[3] == "within noise"
    lines = "\n".join(_findings_section({"seeds": [1], "findings": [{**finding, "verdict": "disagrees"}]}))
    assert _row(lines, "KD beats LM")[3] == "**disagrees** (one seed)"


SEED_ITERS = 4


@pytest.fixture(scope="module")
def two_seeds(demo, data_cache):
    """`--seeds 2` on the teacher the first run cached: the arms and the zero-shot comparisons twice."""
    root = demo[0]
    proc = _demo(root / "seeds", root / "teachers", data_cache, "--seeds", "2", "--retrain-iters", str(SEED_ITERS),
                 "--retrain-warmup-iters", "1", "--eval-interval", "2", "--task-limit", "0")
    return root / "seeds", proc.stdout


def test_two_seeds_report_the_mean_and_spread_of_the_per_seed_metrics(two_seeds):
    """Every mean ± spread in results.json and report.md equals statistics.mean/stdev of the per-seed numbers
    read from the arms' own metrics.jsonl files; each verdict follows from the per-seed margins; the teacher and
    the scores were computed once, the data order, the from-scratch weights and the random ranking per seed."""
    import statistics

    run, stdout = two_seeds
    results = json.loads((run / "results.json").read_text())
    report = (run / "report.md").read_text()
    assert results["seeds"] == [1234, 1235] and "teacher: reusing" in stdout
    assert stdout.count("--- importance") == 1 and stdout.count("--- zero-shot seed") == 2
    finals = {}
    for arm in ARMS:
        entry = results["arms"][arm]
        valid = [_records(Path(r["path"]), "valid") for r in entry["runs"]]
        assert len({r["path"] for r in entry["runs"]}) == 2
        finals[arm] = [v[-1]["val lm loss"] for v in valid]
        assert [r["final"] for r in entry["runs"]] == finals[arm]
        assert entry["final"] == pytest.approx(statistics.mean(finals[arm]), abs=1e-12)
        assert entry["final_spread"] == pytest.approx(statistics.stdev(finals[arm]), abs=1e-12)
        for i, step in enumerate(range(0, SEED_ITERS + 1, 2)):
            losses = [v[i]["val lm loss"] for v in valid]
            assert [v[i]["iteration"] for v in valid] == [step, step]
            assert entry["curve"][i] == [step * 8 * 64, pytest.approx(statistics.mean(losses), abs=1e-12)]
            assert entry["curve_spread"][i] == pytest.approx(statistics.stdev(losses), abs=1e-12)
        cells = _row(report, entry["label"], after="## Retraining")
        assert cells[4] == f"{statistics.mean(finals[arm]):.3f} ± {statistics.stdev(finals[arm]):.3f}", cells
    # the seeds differ where they should: from-scratch weights, data order, random ranking, validation samples
    assert len(set(finals["scratch"])) == 2
    first_train = [_records(Path(r["path"]), "train")[0]["lm loss"] for r in results["arms"]["width_lm"]["runs"]]
    assert first_train[0] != first_train[1]
    random_plans = [json.loads((run / "plans" / f"{name}.json").read_text()) for name in ("random", "random-1")]
    assert random_plans[0]["ffn"] != random_plans[1]["ffn"]
    per_seed = results["per_seed"]
    for k, seed_run in enumerate(per_seed):  # each seed's zero-shot losses are on that seed's validation samples
        width_kd = results["arms"]["width_kd"]["runs"][k]
        assert width_kd["initial"] == pytest.approx(seed_run["zero_shot"]["width"], rel=1e-5)
    for name in ("width", "random", "teacher", "grid-l2-l2"):
        values = [r["zero_shot"][name] for r in per_seed]
        assert results["zero_shot"][name] == pytest.approx(statistics.mean(values), abs=1e-12)
        assert results["zero_shot_spread"][name] == pytest.approx(statistics.stdev(values), abs=1e-12)
    # each finding's margins, their mean and spread, and the verdict
    margins = {"kd_beats_lm": [lm - kd for kd, lm in zip(finals["width_kd"], finals["width_lm"])],
               "pruned_kd_beats_scratch": [s - kd for kd, s in zip(finals["width_kd"], finals["scratch"])],
               "width_beats_depth": [d - w for w, d in zip(finals["width_kd"], finals["depth_kd"])],
               "importance_beats_random": [r["zero_shot"]["random"] - r["zero_shot"]["width"] for r in per_seed]}
    for finding in results["findings"]:
        if finding["id"] not in margins:
            continue
        expected = margins[finding["id"]]
        mean, spread = statistics.mean(expected), statistics.stdev(expected)
        assert finding["margins"] == pytest.approx(expected, abs=1e-12)
        assert (finding["margin"], finding["spread"]) == (pytest.approx(mean, abs=1e-12), pytest.approx(spread))
        word = "within noise" if abs(mean) <= spread else ("agrees" if mean > 0 else "disagrees")
        assert finding["verdict"] == word, finding
        row = _row(report, finding["claim"])
        assert f"margin {mean:.3f} ± {spread:.3f}" in row[2] and row[3] == word.replace("disagrees", "**disagrees**")
    assert "Over 2 seeds" in report and "sample standard deviation over the seeds" in report


def test_the_loss_plot_of_two_seeds_draws_a_band_of_the_spread(two_seeds):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    import numpy as np

    from megatron_minitron.demo.plots import draw_loss_vs_tokens

    run = two_seeds[0]
    results = json.loads((run / "results.json").read_text())
    assert "plots/loss_vs_tokens.png" in results["plots"]
    fig, ax = plt.subplots()
    draw_loss_vs_tokens(ax, results)
    bands = ax.collections
    assert len(bands) == len(ARMS)
    for band, arm in zip(bands, results["arms"].values()):
        edge = band.get_paths()[0].vertices
        means = np.array([p[1] for p in arm["curve"]])
        spread = np.array(arm["curve_spread"])
        assert np.isclose(edge[:, 1].max(), (means + spread).max()) and np.isclose(edge[:, 1].min(),
                                                                                   (means - spread).min())
    plt.close(fig)
