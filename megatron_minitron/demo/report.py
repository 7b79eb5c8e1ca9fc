"""results.json and report.md from the demo's raw results and the runs' own metrics files.

`build_results` reads each arm's metrics.jsonl (the validation records the training loop wrote), the
plans and the scores, so every number in the report traces back to a file in the run directory.
`findings` states each comparison the Minitron papers make, the direction they report and whether
this run agrees. Nothing here imports megatron.
"""

from __future__ import annotations

import json
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
    tokens_per_step = cfg["global_batch_size"] * cfg["seq_length"]
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
    arms = {}
    for arm in ARMS:
        info = raw["arms"][arm]
        curve = validation_curve(info["path"], tokens_per_step)
        trained = [r for r in read_metrics(info["path"]) if r["kind"] == "train"]
        start = info["start"]
        arms[arm] = {"label": LABELS[arm], "loss": info["loss"], "start": start, "path": info["path"],
                     "params": models["width" if start == "random" else start]["params"],
                     "train_tokens": trained[-1]["consumed_samples"] * cfg["seq_length"],
                     "train_steps": trained[-1]["iteration"], "curve": curve, "initial": curve[0][1],
                     "final": curve[-1][1], "seconds": info["seconds"]}
    zero = raw["zero_shot"]
    grid = [[zero[f"grid-{seq}-{batch}"] for batch in AGGREGATIONS] for seq in AGGREGATIONS]
    results = {"config": cfg, "layout": raw["layout"], "timings_s": raw["timings"], "teacher": {
        **raw["teacher"], "val_loss": zero["teacher"], "params": teacher_params}, "models": models,
        "importance": importance, "zero_shot": zero, "arms": arms, "tasks": raw.get("tasks"),
        "grid": {"seq": list(AGGREGATIONS), "batch": list(AGGREGATIONS), "loss": grid},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpu_count": _cpu_count()}}
    results["findings"] = findings(results)
    return results


def _cpu_count() -> Optional[int]:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def findings(results: dict) -> list[dict]:
    """Each comparison the papers make: the direction they report, what this run measured, agreement."""
    arms, zero, models = results["arms"], results["zero_shot"], results["models"]
    grid = {(s, b): results["grid"]["loss"][i][j] for i, s in enumerate(AGGREGATIONS)
            for j, b in enumerate(AGGREGATIONS)}
    ranked = sorted(grid, key=grid.get)
    rank = 1 + sum(loss < grid[("mean", "l2")] for loss in grid.values())  # ties share a rank (same kept indices)
    tokens = arms["width_kd"]["train_tokens"]

    def pair(name, claim, paper, better, worse, better_label, worse_label, note=""):
        measured = f"{better_label} {better:.3f} vs {worse_label} {worse:.3f}{note}"
        return {"id": name, "claim": claim, "paper": paper, "measured": measured,
                "agrees": bool(better < worse)}

    imp = results["importance"]
    block_cost = min(imp["block_lm_loss"]) - imp["calibration_lm_loss"]
    return [
        pair("kd_beats_lm", f"KD beats LM-loss-only retraining of the same pruned model at equal tokens ({tokens:,})",
             "KD lower loss (arXiv 2407.14679, Table 15)", arms["width_kd"]["final"], arms["width_lm"]["final"],
             "KD", "LM only"),
        pair("pruned_kd_beats_scratch", f"pruned + KD beats the same architecture trained from scratch at equal "
             f"tokens ({tokens:,})", "pruned + distilled far ahead of random init (arXiv 2407.14679)",
             arms["width_kd"]["final"], arms["scratch"]["final"], "pruned + KD", "scratch"),
        pair("width_beats_depth", f"width pruning beats depth pruning at about equal parameters "
             f"({models['width']['params'] / 1e6:.2f}M vs {models['depth']['params'] / 1e6:.2f}M), both + KD",
             "width ahead of depth after distillation (arXiv 2408.11796, Llama-3.1-Minitron 4B)",
             arms["width_kd"]["final"], arms["depth_kd"]["final"], "width", "depth",
             note=f"; removing the best block of {imp['block_size']} layers cost the teacher only "
                  f"{block_cost:+.3f} on calibration data" if block_cost < 0.5 else ""),
        pair("importance_beats_random", "activation importance ranking beats a random ranking (zero-shot, width "
             "target)", "importance ranking ahead of random (arXiv 2407.14679)", zero["width"], zero["random"],
             "importance", "random"),
        {"id": "mean_l2_among_best", "claim": "(sequence mean, batch L2) is among the best of the 3x3 aggregations "
         "(zero-shot)", "paper": "(mean, L2) best: 7.18 vs 8.73 for (L2, L2) (arXiv 2407.14679, Table 11)",
         "measured": f"(mean, L2) {grid[('mean', 'l2')]:.3f} ranks {rank} of 9 (best: {ranked[0][0]}, {ranked[0][1]} "
                     f"{grid[ranked[0]]:.3f}; (L2, L2) {grid[('l2', 'l2')]:.3f})",
         "agrees": rank <= 3},
    ]


# -------------------------------------------------------------------------------------------- markdown
def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def render(results: dict, plots: list[str]) -> str:
    """report.md."""
    cfg, models, arms, zero, imp = (results[k] for k in ("config", "models", "arms", "zero_shot", "importance"))
    lay = results["layout"]
    agree = sum(f["agrees"] for f in results["findings"])
    out = ["# Minitron demo report", ""]
    cpu = sum(v["cpu_s"] for v in results["timings_s"].values())
    out.append(f"Wall time {_minutes(results['wall_time_s'])} on {results['machine']['cpu_count']} CPU cores "
               f"({lay['device']}, {lay['backend']}; the stages took {_minutes(cpu)} of CPU time on rank 0), "
               f"TP={lay['tp']} PP={lay['pp']} DP={lay['dp']}; teacher "
               f"{'reused from the cache' if results['teacher']['source'] == 'cache' else results['teacher']['source']}"
               f" ({results['teacher']['path']}). This run agrees with {agree} of the "
               f"{len(results['findings'])} paper findings below.")
    out += ["", "Losses are validation LM losses (nats per token) on the same held-out samples for every model "
            f"({cfg['eval_iters']} batches of {cfg['global_batch_size']} x {cfg['seq_length']} tokens).", ""]

    out += ["## Findings", ""]
    out += _table(["comparison", "paper", "this run", "agrees"],
                  [[f["claim"], f["paper"], f["measured"], "yes" if f["agrees"] else "**no**"]
                   for f in results["findings"]])

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

    out += ["", f"## Retraining at equal tokens ({arms['width_kd']['train_tokens']:,} tokens, "
                f"{arms['width_kd']['train_steps']} steps each)", ""]
    tasks = results.get("tasks")

    def accuracy(name: str) -> list[str]:
        if not tasks:
            return []
        m = tasks["models"][name]
        return [f"{m[key]:.3f} ± {m[key + '_stderr']:.3f}" for key in ("acc", "acc_mutual_info")]

    rows = [["teacher", f"{results['teacher']['params']:,}", "-", f"{zero['teacher']:.3f}", "-", "-",
             *accuracy("teacher")]]
    for arm in ARMS:
        a = arms[arm]
        rows.append([a["label"], f"{a['params']:,}", "KD (forward KL, logits)" if a["loss"] == "kd" else "LM loss",
                     f"{a['initial']:.3f}", f"{a['final']:.3f}", f"{a['seconds']:.0f} s", *accuracy(arm)])
    rows.append(["random-ranked width pruning (zero-shot)", f"{models['random']['params']:,}", "-",
                 f"{zero['random']:.3f}", "-", "-", *(["-", "-"] if tasks else [])])
    header = ["model", "parameters", "retraining loss", "loss before", "loss after", "time"]
    if tasks:
        header += [f"{tasks['task']} acc (chance {tasks['chance']:.2f})", "acc_mutual_info"]
    out += _table(header, rows)
    if tasks:
        out += ["", f"Accuracy (± its standard error) on the built-in task `{tasks['task']}`: choose the true "
                f"continuation of a held-out passage among four, so a uniform guess scores {tasks['chance']:.2f}; "
                f"{tasks['documents']} documents, the same for every model, each model after its retraining. `acc` "
                f"picks the likeliest continuation; `acc_mutual_info` the one the passage makes most likely relative "
                f"to the continuation alone, which separates weak models better (plain `acc` of a model this small "
                f"stays near chance)."]
    else:
        out += ["", "The built-in task was not scored (`--task-limit 0`, or lm-eval missing: "
                    "`pip install -e .[eval]`)."]

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
    out += _table(["sequence \\ batch"] + grid["batch"],
                  [[seq] + [f"**{v:.3f}**" if v == best else f"{v:.3f}" for v in row]
                   for seq, row in zip(grid["seq"], grid["loss"])])

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
        print(f"  {'agrees  ' if f['agrees'] else 'DIFFERS '} {f['claim']}: {f['measured']}")
    return results

