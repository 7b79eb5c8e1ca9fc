"""results.json and report.md from the demo's raw results and the runs' own metrics files.

`build_results` reads each arm's metrics.jsonl (the validation records the training loop wrote), the
plans and the scores, so every number in the report traces back to a file in the run directory.
`findings` states each comparison the Minitron papers make, the direction they report and whether
this run agrees. Nothing here imports megatron.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Optional

from megatron_minitron.demo.config import AGGREGATIONS, ARMS

LABELS = {
    "width_kd": "width-pruned + KD",
    "depth_kd": "depth-pruned + KD",
    "scratch": "width architecture from scratch (LM loss)",
    "width_lm": "width-pruned + LM loss only",
}


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def validation_curve(run_dir: str | Path, tokens_per_step: int) -> list[list[float]]:
    """[[training tokens, validation LM loss], ...] from a run's metrics.jsonl, in step order."""
    points = {r["iteration"]: r["val lm loss"] for r in read_metrics(run_dir) if r["kind"] == "valid"}
    return [[it * tokens_per_step, points[it]] for it in sorted(points)]


def _arch_row(arch) -> dict:
    return {"num_layers": arch.num_layers, "hidden_size": arch.hidden_size, "ffn_hidden_size": arch.ffn_hidden_size,
            "num_attention_heads": arch.num_attention_heads, "num_query_groups": arch.query_groups,
            "params": arch.num_parameters()}


def build_results(raw: dict) -> dict:
    """Everything the report and the plots show, from the raw results and the files they name."""
    from megatron_minitron.importance.scores import load_scores
    from megatron_minitron.model.checkpoint import resolve
    from megatron_minitron.plan import load_plan

    cfg = raw["config"]
    teacher = resolve(raw["teacher"]["path"])
    teacher_params = teacher.arch.num_parameters()
    models = {"teacher": {**_arch_row(teacher.arch), "fraction": 1.0, "how": raw["teacher"]["source"]}}
    plans = {name: load_plan(path) for name, path in raw["plans"].items()}
    for name in ("width", "depth", "random"):
        plan = plans[name]
        models[name] = {**_arch_row(plan.target), "fraction": plan.params_after / teacher_params,
                        "layer_metric": plan.scores.get("layer_metric"),
                        "dropped_layers": plan.scores.get("dropped_layers", [])}
    scores = load_scores(raw["scores"])
    block = raw["block_size"]
    block_row = scores["blocks_lm_loss"][0][: teacher.arch.num_layers - block + 1].tolist()
    dropped = models["depth"]["dropped_layers"]
    importance = {"scores": raw["scores"], "calibration_samples": scores.manifest.num_samples,
                  "seq_length": scores.manifest.seq_length, "calibration_lm_loss": scores.manifest.data.get("lm_loss"),
                  "layers_bi": scores["layers_bi"].tolist(), "layers_lm_loss": scores["layers_lm_loss"].tolist(),
                  "block_size": block, "block_lm_loss": block_row,
                  "best_block": [min(dropped), max(dropped)] if dropped else None}
    repeats = raw["repeats"]
    arms = {arm: _arm_summary(arm, [r["arms"][arm] for r in repeats], [r["seed"] for r in repeats], models, cfg)
            for arm in ARMS}
    zero_runs = [r["zero_shot"] for r in repeats]
    zero = {name: mean_spread([z[name] for z in zero_runs])[0] for name in zero_runs[0]}
    zero_spread = {name: mean_spread([z[name] for z in zero_runs])[1] for name in zero_runs[0]}
    grid = [[zero[f"grid-{seq}-{batch}"] for batch in AGGREGATIONS] for seq in AGGREGATIONS]
    grid_spread = [[zero_spread[f"grid-{seq}-{batch}"] for batch in AGGREGATIONS] for seq in AGGREGATIONS]
    checkpoints = raw["checkpoints"]
    results = {"config": cfg, "layout": raw["layout"], "timings_s": raw["timings"], "teacher": {
        **raw["teacher"], "val_loss": zero["teacher"], "params": teacher_params}, "models": models,
        "importance": importance, "seeds": [r["seed"] for r in repeats], "spread": SPREAD,
        "zero_shot": zero, "zero_shot_spread": zero_spread, "arms": arms, "tasks": _task_summary(repeats),
        "per_seed": [{"seed": r["seed"], "random_seed": r["random_seed"], "zero_shot": r["zero_shot"],
                      "final": {arm: arms[arm]["runs"][k]["final"] for arm in ARMS}, "tasks": r["tasks"]}
                     for k, r in enumerate(repeats)],
        "grid": {"seq": list(AGGREGATIONS), "batch": list(AGGREGATIONS), "loss": grid, "spread": grid_spread,
                 "same_as_mean_l2": [name for name in checkpoints if name.startswith("grid-")
                                     and checkpoints[name] == checkpoints["grid-mean-l2"]]},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpu_count": _cpu_count()}}
    results["findings"] = findings(results)
    return results


SPREAD = "sample standard deviation over the seeds (n - 1 in the denominator; 0 for one seed)"
"""What every ± of a multi-seed report is."""


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of per-seed values; the deviation of one value is 0.0."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def verdict(margins: list[float]) -> str:
    """"agrees" / "disagrees" / "within noise" from the per-seed margins of a comparison (positive: the
    paper's direction). With one seed, the sign decides; with several, the mean margin must exceed the
    margins' sample standard deviation (they are paired: every arm of a seed saw the same data order and
    is validated on the same samples), else the comparison is within noise. With two seeds that deviation
    is |m1 - m2| / sqrt(2), so a verdict needs both seeds to point the same way and the smaller margin
    to be at least 17% of the larger."""
    mean, spread = mean_spread(margins)
    if len(margins) > 1 and abs(mean) <= spread:
        return "within noise"
    return "agrees" if mean > 0 else "disagrees"


def _arm_summary(arm: str, infos: list[dict], seeds: list[int], models: dict, cfg: dict) -> dict:
    """One arm over the seeds: its runs (curve, losses, path per seed), the mean curve with its spread
    at every evaluation, and the mean and spread of the losses before and after retraining."""
    tokens_per_step = cfg["global_batch_size"] * cfg["seq_length"]
    runs = []
    for seed, info in zip(seeds, infos):
        curve = validation_curve(info["path"], tokens_per_step)
        trained = [r for r in read_metrics(info["path"]) if r["kind"] == "train"]
        runs.append({"seed": seed, "path": info["path"], "curve": curve, "initial": curve[0][1],
                     "final": curve[-1][1], "seconds": info["seconds"],
                     "train_tokens": trained[-1]["consumed_samples"] * cfg["seq_length"],
                     "train_steps": trained[-1]["iteration"]})
    if len({tuple(p[0] for p in r["curve"]) for r in runs}) != 1:
        raise ValueError(f"the {arm} runs were validated at different steps: {[r['path'] for r in runs]}")
    points = [mean_spread([r["curve"][i][1] for r in runs]) for i in range(len(runs[0]["curve"]))]
    initial, initial_spread = mean_spread([r["initial"] for r in runs])
    final, final_spread = mean_spread([r["final"] for r in runs])
    start = infos[0]["start"]
    return {"label": LABELS[arm], "loss": infos[0]["loss"], "start": start,
            "params": models["width" if start == "random" else start]["params"],
            "train_tokens": runs[0]["train_tokens"], "train_steps": runs[0]["train_steps"],
            "curve": [[p[0], m] for p, (m, _) in zip(runs[0]["curve"], points)],
            "curve_spread": [s for _, s in points], "initial": initial, "initial_spread": initial_spread,
            "final": final, "final_spread": final_spread,
            "seconds": mean_spread([r["seconds"] for r in runs])[0], "runs": runs}


def _task_summary(repeats: list[dict]) -> Optional[dict]:
    """The built-in task: every model's metrics as the mean over the seeds that scored it (the teacher is
    scored once), each metric's spread over those seeds as KEY_spread, and the number of seeds."""
    scored = [r["tasks"] for r in repeats if r["tasks"]]
    if not scored:
        return None
    models = {}
    for name in scored[0]["models"]:
        runs = [t["models"][name] for t in scored if name in t["models"]]
        models[name] = {"seeds": len(runs)}
        for key in runs[0]:
            models[name][key], models[name][f"{key}_spread"] = mean_spread([m[key] for m in runs])
    return {**{k: v for k, v in scored[0].items() if k != "models"}, "models": models}


def _cpu_count() -> Optional[int]:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def _pm(mean: float, spread: float, seeds: int) -> str:
    return f"{mean:.3f} ± {spread:.3f}" if seeds > 1 else f"{mean:.3f}"


def _finding(name: str, claim: str, paper: str, measured: str, margins: list[float]) -> dict:
    margin, spread = mean_spread(margins)
    word = verdict(margins)
    return {"id": name, "claim": claim, "paper": paper, "measured": measured, "margins": margins, "margin": margin,
            "spread": spread, "verdict": word, "agrees": word == "agrees"}


def findings(results: dict) -> list[dict]:
    """Each comparison the papers make: the direction they report, what this run measured (mean ± spread
    over the seeds), the per-seed margins in the paper's direction and the verdict on them."""
    arms, models, per_seed = results["arms"], results["models"], results["per_seed"]
    n = len(per_seed)
    tokens = arms["width_kd"]["train_tokens"]

    def pair(name, claim, paper, better, worse, better_label, worse_label, note=""):
        """better/worse: (key, per-seed values, mean, spread); the paper says `better` is lower."""
        margins = [w - b for b, w in zip(better[0], worse[0])]
        m, s = mean_spread(margins)
        measured = (f"{better_label} {_pm(*better[1:], n)} vs {worse_label} {_pm(*worse[1:], n)}; "
                    f"margin {_pm(m, s, n)}{note}")
        return _finding(name, claim, paper, measured, margins)

    def arm(key):
        return [run["final"] for run in arms[key]["runs"]], arms[key]["final"], arms[key]["final_spread"]

    def zero(key):
        return ([r["zero_shot"][key] for r in per_seed], results["zero_shot"][key],
                results["zero_shot_spread"][key])

    imp = results["importance"]
    block_cost = min(imp["block_lm_loss"]) - imp["calibration_lm_loss"]
    return [
        pair("kd_beats_lm", f"KD beats LM-loss-only retraining of the same pruned model at equal tokens ({tokens:,})",
             "KD lower loss (arXiv 2407.14679, Table 15)", arm("width_kd"), arm("width_lm"), "KD", "LM only"),
        pair("pruned_kd_beats_scratch", f"pruned + KD beats the same architecture trained from scratch at equal "
             f"tokens ({tokens:,})", "pruned + distilled far ahead of random init (arXiv 2407.14679)",
             arm("width_kd"), arm("scratch"), "pruned + KD", "scratch"),
        pair("width_beats_depth", f"width pruning beats depth pruning at about equal parameters "
             f"({models['width']['params'] / 1e6:.2f}M vs {models['depth']['params'] / 1e6:.2f}M), both + KD",
             "width ahead of depth after distillation (arXiv 2408.11796, Llama-3.1-Minitron 4B)",
             arm("width_kd"), arm("depth_kd"), "width", "depth",
             note=f"; removing the best block of {imp['block_size']} layers cost the teacher only "
                  f"{block_cost:+.3f} on calibration data" if block_cost < 0.5 else ""),
        pair("importance_beats_random", "activation importance ranking beats a random ranking (zero-shot, width "
             "target)", "importance ranking ahead of random (arXiv 2407.14679)", zero("width"), zero("random"),
             "importance", "random" if n == 1 else "random (a new ranking per seed)"),
        _aggregation_finding(results),
    ]


def _aggregation_finding(results: dict) -> dict:
    """(mean, L2) among the best three of the 3x3 grid: per seed, the margin is the loss of the third best
    of the other aggregations (those whose plan keeps other indices) minus (mean, L2)'s, positive when
    at most two others beat it."""
    grid = results["grid"]
    names = [f"grid-{seq}-{batch}" for seq in grid["seq"] for batch in grid["batch"]]
    others = [name for name in names if name not in grid["same_as_mean_l2"]]
    n = len(results["per_seed"])
    if len(others) < 3:  # only two other distinct plans: among the best three whatever the losses
        return {"id": "mean_l2_among_best", "claim": "(sequence mean, batch L2) is among the best of the 3x3 "
                "aggregations (zero-shot)", "paper": "(mean, L2) best (arXiv 2407.14679, Table 11)",
                "measured": f"only {len(others) + 1} distinct plans among the nine", "margins": [], "margin": None,
                "spread": None, "verdict": "agrees", "agrees": True}
    margins = []
    for run in results["per_seed"]:
        z = run["zero_shot"]
        margins.append(sorted(z[name] for name in others)[2] - z["grid-mean-l2"])
    mean = results["zero_shot"]
    rank = 1 + sum(mean[name] < mean["grid-mean-l2"] for name in others)  # ties share a rank (same kept indices)
    best = min(names, key=mean.get)
    spread = results["zero_shot_spread"]
    m, s = mean_spread(margins)
    measured = (f"(mean, L2) {_pm(mean['grid-mean-l2'], spread['grid-mean-l2'], n)} ranks {rank} of 9"
                f"{' by mean loss' if n > 1 else ''} (best: {best.split('-')[1]}, {best.split('-')[2]} "
                f"{_pm(mean[best], spread[best], n)}; (L2, L2) {_pm(mean['grid-l2-l2'], spread['grid-l2-l2'], n)}); "
                f"margin to the third best other {_pm(m, s, n)}")
    return _finding("mean_l2_among_best", "(sequence mean, batch L2) is among the best of the 3x3 aggregations "
                    "(zero-shot)", "(mean, L2) best: 7.18 vs 8.73 for (L2, L2) (arXiv 2407.14679, Table 11)",
                    measured, margins)


# -------------------------------------------------------------------------------------------- markdown
def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


VERDICT_CELLS = {"agrees": "agrees", "disagrees": "**disagrees**", "within noise": "within noise"}


def _headline(found: list[dict], n: int) -> str:
    count = {word: sum(f["verdict"] == word for f in found) for word in VERDICT_CELLS}
    if n == 1:
        return (f"This run agrees with {count['agrees']} of the {len(found)} paper findings below, from one seed: "
                f"`--seeds 3` tells which margins exceed the run-to-run spread.")
    return (f"Over {n} seeds, {count['agrees']} of the {len(found)} paper findings below agree beyond the spread, "
            f"{count['disagrees']} disagree{'s' if count['disagrees'] == 1 else ''} and {count['within noise']} "
            f"{'is' if count['within noise'] == 1 else 'are'} within noise.")


def _findings_section(results: dict) -> list[str]:
    """The findings table, what ± and the verdict mean, and (several seeds) the per-seed numbers."""
    n = len(results["seeds"])
    out = ["## Findings", ""]
    if n == 1:
        out += ["One seed: each verdict is the sign of a single run's margin (no spread to judge it against).", ""]
    else:
        out += [f"Seeds {', '.join(map(str, results['seeds']))}. Each ± is the {results['spread']}; the margin is "
                f"the worse model's loss minus the better's in the paper's direction, per seed, and a verdict is "
                f"given only when the mean margin exceeds its spread (else: within noise). The seeds pair the "
                f"comparisons: within a seed every arm saw the same data order and every model the same "
                f"validation samples. With two seeds the sample deviation is |m1 - m2| / sqrt(2): a verdict then "
                f"needs both seeds to point the same way, the smaller margin at least 17% of the larger.", ""]
    cell = (lambda f: VERDICT_CELLS[f["verdict"]] + " (one seed)") if n == 1 else (
        lambda f: VERDICT_CELLS[f["verdict"]])
    out += _table(["comparison", "paper", "this run", "verdict"],
                  [[f["claim"], f["paper"], f["measured"], cell(f)] for f in results["findings"]])
    if n > 1:
        out += ["", "Per seed (validation LM loss after retraining; zero-shot for the pruned models):", ""]
        names = [("width_kd", "width + KD"), ("width_lm", "width + LM only"), ("depth_kd", "depth + KD"),
                 ("scratch", "scratch")]
        out += _table(["seed", *(label for _, label in names), "width zero-shot", "random zero-shot",
                       "(mean, L2) zero-shot", "teacher"],
                      [[run["seed"], *(f"{run['final'][arm]:.3f}" for arm, _ in names),
                        *(f"{run['zero_shot'][key]:.3f}" for key in ("width", "random", "grid-mean-l2", "teacher"))]
                       for run in results["per_seed"]])
    return out


def _retraining_section(results: dict) -> list[str]:
    """The arms beside the teacher and the random ranking: losses before and after, time, task scores."""
    models, arms, zero, spread = (results[k] for k in ("models", "arms", "zero_shot", "zero_shot_spread"))
    n = len(results["seeds"])
    out = ["", f"## Retraining at equal tokens ({arms['width_kd']['train_tokens']:,} tokens, "
               f"{arms['width_kd']['train_steps']} steps each{'' if n == 1 else f', {n} seeds'})", ""]
    tasks = results.get("tasks")

    def accuracy(name: str) -> list[str]:
        if not tasks:
            return []
        m = tasks["models"][name]
        how = "_stderr" if m["seeds"] == 1 else "_spread"
        return [f"{m[key]:.3f} ± {m[key + how]:.3f}" for key in ("acc", "acc_mutual_info")]

    rows = [["teacher", f"{results['teacher']['params']:,}", "-", _pm(zero["teacher"], spread["teacher"], n), "-",
             "-", *accuracy("teacher")]]
    for arm in ARMS:
        a = arms[arm]
        rows.append([a["label"], f"{a['params']:,}", "KD (forward KL, logits)" if a["loss"] == "kd" else "LM loss",
                     _pm(a["initial"], a["initial_spread"], n), _pm(a["final"], a["final_spread"], n),
                     f"{a['seconds']:.0f} s", *accuracy(arm)])
    rows.append(["random-ranked width pruning (zero-shot)", f"{models['random']['params']:,}", "-",
                 _pm(zero["random"], spread["random"], n), "-", "-", *(["-", "-"] if tasks else [])])
    header = ["model", "parameters", "retraining loss", "loss before", "loss after", "time" + (" per seed" * (n > 1))]
    if tasks:
        header += [f"{tasks['task']} acc (chance {tasks['chance']:.2f})", "acc_mutual_info"]
    out += _table(header, rows)
    if tasks:
        several = ("; over several seeds a student's is the mean ± sample standard deviation over its seeds, "
                   "the teacher is scored once") if n > 1 else ""
        out += ["", f"Accuracy (± its standard error{several}) on the built-in task `{tasks['task']}`: choose the "
                f"true continuation of a held-out passage among four, so a uniform guess scores {tasks['chance']:.2f}; "
                f"{tasks['documents']} documents, the same for every model, each model after its retraining. `acc` "
                f"picks the likeliest continuation; `acc_mutual_info` the one the passage makes most likely relative "
                f"to the continuation alone, which separates weak models better (plain `acc` of a model this small "
                f"stays near chance)."]
    else:
        out += ["", "The built-in task was not scored (`--task-limit 0`, or lm-eval missing: "
                    "`pip install -e .[eval]`)."]
    return out


def render(results: dict, plots: list[str]) -> str:
    """report.md."""
    cfg, models, imp = (results[k] for k in ("config", "models", "importance"))
    lay = results["layout"]
    n = len(results["seeds"])
    out = ["# Minitron demo report", ""]
    cpu = sum(v["cpu_s"] for v in results["timings_s"].values())
    out.append(f"Wall time {_minutes(results['wall_time_s'])} on {results['machine']['cpu_count']} CPU cores "
               f"({lay['device']}, {lay['backend']}; the stages took {_minutes(cpu)} of CPU time on rank 0), "
               f"TP={lay['tp']} PP={lay['pp']} DP={lay['dp']}; teacher "
               f"{'reused from the cache' if results['teacher']['source'] == 'cache' else results['teacher']['source']}"
               f" ({results['teacher']['path']}). {_headline(results['findings'], n)}")
    out += ["", "Losses are validation LM losses (nats per token) on the same held-out samples for every model "
            f"({cfg['eval_iters']} batches of {cfg['global_batch_size']} x {cfg['seq_length']} tokens"
            f"{'' if n == 1 else '; each seed draws its own samples'}).", ""]
    out += _findings_section(results)

    out += ["", "## Architectures", ""]
    rows = []
    for name, label in (("teacher", "teacher"), ("width", "width-pruned"), ("depth", "depth-pruned"),
                        ("random", "random-ranked (width shape)")):
        m = models[name]
        note = ""
        if name == "depth":
            note = f"dropped layers {m['dropped_layers']} (contiguous block with the lowest LM loss)"
        elif name == "width":
            note = "ranking: sequence mean, batch L2"
        rows.append([label, m["num_layers"], m["hidden_size"], m["ffn_hidden_size"], m["num_attention_heads"],
                     m["num_query_groups"], f"{m['params']:,}", f"{100 * m['fraction']:.1f}%", note])
    out += _table(["model", "layers", "hidden", "ffn", "heads", "query groups", "parameters", "of teacher", ""], rows)

    out += _retraining_section(results)

    out += ["", "## Importance (teacher)", ""]
    out.append(f"{imp['calibration_samples']} calibration samples x {imp['seq_length']} tokens "
               f"(calibration LM loss {imp['calibration_lm_loss']:.3f}).")
    out.append("")
    L = len(imp["layers_bi"])
    out += _table(["layer"] + [str(i) for i in range(L)],
                  [["Block Importance"] + [f"{v:.3f}" for v in imp["layers_bi"]],
                   ["LM loss without it"] + [f"{v:.3f}" for v in imp["layers_lm_loss"]],
                   [f"LM loss without {imp['block_size']} layers from here"] +
                   [f"{v:.3f}" for v in imp["block_lm_loss"]] + [""] * (L - len(imp["block_lm_loss"]))])

    out += ["", "## Aggregation grid (zero-shot LM loss of the width-pruned model; paper's Table 11)", ""]
    grid = results["grid"]
    best = min(min(row) for row in grid["loss"])
    n = len(results["seeds"])
    if n > 1:
        out += [f"Mean ± sample standard deviation over the {n} seeds' validation samples.", ""]
    out += _table(["sequence \\ batch"] + grid["batch"],
                  [[seq] + [f"**{_pm(v, d, n)}**" if v == best else _pm(v, d, n) for v, d in zip(row, spread)]
                   for seq, row, spread in zip(grid["seq"], grid["loss"], grid["spread"])])

    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    else:
        out += ["", "Plots were skipped (install the `plot` extra: `pip install -e .[plot]`)."]
    out += ["", "## Stage times", ""]
    out += _table(["stage", "wall seconds", "CPU seconds (rank 0)"],
                  [[k, f"{v['wall_s']:.0f}", f"{v['cpu_s']:.0f}"] for k, v in results["timings_s"].items()])
    out += ["", "Every number above comes from files in this directory: `results.json` (built from "
                "`stages.json`), the arms' `arms/*/metrics.jsonl`, `plans/*.json` and `scores/`.", ""]
    return "\n".join(out)


def finish(raw: dict, *, plots: bool = True) -> dict:
    """Write results.json, plots/*.png and report.md into the run directory; print the headline."""
    out = Path(raw["config"]["out"])
    (out / "stages.json").write_text(json.dumps(raw, indent=2) + "\n")  # what the stages returned: paths, times
    results = build_results(raw)
    written: list[str] = []
    if plots:
        try:
            from megatron_minitron.demo.plots import write_plots
        except ImportError as error:
            print(f"minitron demo: no plots ({error}); install the `plot` extra", flush=True)
        else:
            written = [str(Path(p).relative_to(out)) for p in write_plots(results, out / "plots")]
    started = raw["config"].get("started_at")
    results["wall_time_s"] = round(time.time() - started, 1) if started else sum(
        v["wall_s"] for v in raw["timings"].values())
    results["plots"] = written
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(render(results, written))
    print(f"\nminitron demo: finished in {_minutes(results['wall_time_s'])}; report {out / 'report.md'}")
    for f in results["findings"]:
        word = {"agrees": "agrees", "disagrees": "DIFFERS", "within noise": "noise"}[f["verdict"]]
        print(f"  {word:8} {f['claim']}: {f['measured']}" + (" (one seed)" if len(results["seeds"]) == 1 else ""))
    return results

