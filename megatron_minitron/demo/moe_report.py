"""results.json and report.md of `minitron demo --moe`, from the stages' raw results and the runs' own files.

Every loss is read back from a file of the run directory (the zero-shot losses from stages.json, each
arm's curve from its metrics.jsonl); the architectures and parameter counts from the plans. The winner
is the arm with the lowest validation loss after distillation. Nothing here imports megatron.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from megatron_minitron.demo.moe import ARMS
from megatron_minitron.demo.report import _cpu_count, _minutes, _table, read_metrics, validation_curve

LABELS = {
    "experts_kd": "whole experts pruned by importance + KD",
    "width_kd": "expert width pruned by importance + KD",
    "random_kd": "whole experts pruned at random + KD",
}


def _model_row(arch, teacher_params: int) -> dict:
    return {"num_experts": arch.num_experts, "moe_ffn_hidden_size": arch.expert_ffn_hidden_size,
            "moe_router_topk": arch.moe_router_topk, "params": arch.num_parameters(),
            "active_params": arch.num_active_parameters(), "fraction": arch.num_parameters() / teacher_params}


def build_results(raw: dict) -> dict:
    """Everything the report shows, from the raw results and the files they name."""
    from megatron_minitron.model.checkpoint import resolve
    from megatron_minitron.plan import load_plan

    cfg = raw["config"]
    tokens_per_step = cfg["global_batch_size"] * cfg["seq_length"]
    teacher = resolve(raw["teacher"]["path"]).arch
    plans = {name: load_plan(path) for name, path in raw["plans"].items()}
    models = {"teacher": _model_row(teacher, teacher.num_parameters())}
    for name, plan in plans.items():
        models[name] = {**_model_row(plan.target, teacher.num_parameters()),
                        "kept_experts": [list(e) for e in plan.experts]}
    zero = raw["zero_shot"]
    randoms = sorted((name for name in plans if name.startswith("random-")), key=lambda n: int(n.split("-")[1]))
    random_losses = [zero[name] for name in randoms]
    arms = {}
    for arm in ARMS:
        info = raw["arms"][arm]
        curve = validation_curve(info["path"], tokens_per_step)
        trained = [r for r in read_metrics(info["path"]) if r["kind"] == "train"]
        start = info["start"]
        arms[arm] = {"label": LABELS[arm], "start": start, "path": info["path"], "params": models[start]["params"],
                     "active_params": models[start]["active_params"],
                     "train_tokens": trained[-1]["consumed_samples"] * cfg["seq_length"],
                     "train_steps": trained[-1]["iteration"], "curve": curve, "initial": curve[0][1],
                     "final": curve[-1][1], "seconds": info["seconds"]}
    gap = abs(models["experts"]["params"] - models["width"]["params"]) / models["experts"]["params"]
    results = {"config": cfg, "layout": raw["layout"], "timings_s": raw["timings"],
               "teacher": {**raw["teacher"], "val_loss": zero["teacher"], "params": teacher.num_parameters(),
                           "active_params": teacher.num_active_parameters()},
               "models": models, "zero_shot": zero, "params_gap": gap,
               "random_zero_shot": {"plans": randoms, "losses": random_losses,
                                    "mean": sum(random_losses) / len(random_losses)},
               "arms": arms, "machine": {"cpu_count": _cpu_count()}}
    results["winner"] = min(ARMS, key=lambda arm: arms[arm]["final"])
    results["zero_shot_winner"] = min(("experts", "width", randoms[0]), key=zero.__getitem__)
    results["findings"] = findings(results)
    return results


def findings(results: dict) -> list[dict]:
    """What the run shows, each a comparison that could come out either way."""
    zero, arms, rnd = results["zero_shot"], results["arms"], results["random_zero_shot"]
    n = len(rnd["losses"])
    return [
        {"id": "importance_beats_random_zero_shot", "claim": f"whole experts chosen by importance beat random "
         f"experts zero-shot (mean of {n} random draws)", "agrees": zero["experts"] < rnd["mean"],
         "measured": f"importance {zero['experts']:.3f} vs random {rnd['mean']:.3f} (draws "
                     f"{', '.join(f'{v:.3f}' for v in rnd['losses'])})"},
        {"id": "importance_beats_random_after_kd", "claim": "whole experts chosen by importance beat the first random "
         "draw after the same distillation",
         "agrees": arms["experts_kd"]["final"] < arms["random_kd"]["final"],
         "measured": f"importance {arms['experts_kd']['final']:.3f} vs random {arms['random_kd']['final']:.3f}"},
        {"id": "experts_beat_width", "claim": "pruning whole experts beats pruning expert width at equal total "
         "parameters (after KD)", "agrees": arms["experts_kd"]["final"] < arms["width_kd"]["final"],
         "measured": f"experts {arms['experts_kd']['final']:.3f} vs width {arms['width_kd']['final']:.3f}"},
    ]


def _kept_cell(kept: list, num_experts: int) -> str:
    """The kept experts of each MoE layer, or "all" when every layer keeps every expert."""
    layers = [k for k in kept if k]
    if not layers or all(k == list(range(num_experts)) for k in layers):
        return "all"
    return " ".join(str(k) for k in layers)


def render(results: dict) -> str:
    """report.md."""
    cfg, models, arms, zero = (results[k] for k in ("config", "models", "arms", "zero_shot"))
    lay, t, win = results["layout"], results["teacher"], results["winner"]
    cpu = sum(v["cpu_s"] for v in results["timings_s"].values())
    e, w = models["experts"], models["width"]
    out = ["# Minitron MoE demo report", "",
           f"Wall time {_minutes(results['wall_time_s'])} on {results['machine']['cpu_count']} CPU cores "
           f"({lay['device']}, {lay['backend']}; the stages took {_minutes(cpu)} of CPU time on rank 0), "
           f"TP={lay['tp']} PP={lay['pp']} DP={lay['dp']}; teacher "
           f"{'reused from the cache' if t['source'] == 'cache' else t['source']} ({t['path']}).", "",
           f"**Winner: {arms[win]['label']}** (validation loss {arms[win]['final']:.3f} after "
           f"{arms[win]['train_tokens']:,} tokens of distillation; the lowest of the three arms). Zero-shot, before "
           f"any retraining, the lowest loss is the {results['zero_shot_winner']} plan's ({zero[results['zero_shot_winner']]:.3f}).",
           "", f"The teacher ({t['params']:,} parameters, {t['active_params']:,} active per token; "
               f"{models['teacher']['num_experts']} experts x {models['teacher']['moe_ffn_hidden_size']} wide, top-"
               f"{models['teacher']['moe_router_topk']}) is cut to the same total parameter count three ways: "
               f"{e['num_experts']} experts per MoE layer kept whole (by importance, or at random), or all "
               f"{w['num_experts']} experts at width {w['moe_ffn_hidden_size']} (each its own best neurons). The "
               f"equalised count is total parameters: the two importance arms differ by {100 * results['params_gap']:.2f}% "
               f"(the dropped experts' router rows). Active parameters differ by design: the experts arm still "
               f"routes each token through {e['moe_router_topk']} full-width experts, the width arm through "
               f"{w['moe_router_topk']} narrower ones.",
           "", f"Losses are validation LM losses (nats per token) on the same held-out samples for every model "
               f"({cfg['eval_iters']} batches of {cfg['global_batch_size']} x {cfg['seq_length']} tokens).", ""]
    out += ["## Findings", ""]
    out += _table(["comparison", "this run", "holds"],
                  [[f["claim"], f["measured"], "yes" if f["agrees"] else "**no**"] for f in results["findings"]])
    out += ["", f"## Distillation at equal tokens ({arms[ARMS[0]]['train_tokens']:,} tokens, "
                f"{arms[ARMS[0]]['train_steps']} steps each)", ""]
    rows = [["teacher", f"{t['params']:,}", f"{t['active_params']:,}", f"{zero['teacher']:.3f}", "-", "-"]]
    for arm in ARMS:
        a = arms[arm]
        label = f"**{a['label']}**" if arm == win else a["label"]
        rows.append([label, f"{a['params']:,}", f"{a['active_params']:,}", f"{a['initial']:.3f}",
                     f"{a['final']:.3f}", f"{a['seconds']:.0f} s"])
    out += _table(["model", "parameters", "active", "loss before", "loss after", "time"], rows)
    rnd = results["random_zero_shot"]
    out += ["", "## Zero-shot (pruned, not retrained)", ""]
    rows = [[name, m["num_experts"], m["moe_ffn_hidden_size"], f"{m['params']:,}", f"{m['active_params']:,}",
             f"{100 * m['fraction']:.1f}%", f"{zero[name]:.3f}",
             _kept_cell(m.get("kept_experts", []), models["teacher"]["num_experts"])]
            for name, m in models.items()]
    out += _table(["model", "experts", "expert width", "parameters", "active", "of teacher", "loss",
                   "kept experts per MoE layer"], rows)
    out += ["", f"Random experts, {len(rnd['losses'])} seeds: mean zero-shot loss {rnd['mean']:.3f}; the first "
                f"({rnd['plans'][0]}) is the one distilled."]
    out += ["", "## Stage times", ""]
    out += _table(["stage", "wall seconds", "CPU seconds (rank 0)"],
                  [[k, f"{v['wall_s']:.0f}", f"{v['cpu_s']:.0f}"] for k, v in results["timings_s"].items()])
    out += ["", "Every number above comes from files in this directory: `results.json` (built from `stages.json`), "
                "the arms' `arms/*/metrics.jsonl`, `plans/*.json` and `scores/`.", ""]
    return "\n".join(out)


def finish(raw: dict, *, plots: bool = True) -> dict:
    """Write results.json and report.md into the run directory; print the headline. (No plots yet: `plots` is
    accepted for the dense demo's call.)"""
    out = Path(raw["config"]["out"])
    (out / "stages.json").write_text(json.dumps(raw, indent=2) + "\n")
    results = build_results(raw)
    started = raw["config"].get("started_at")
    results["wall_time_s"] = round(time.time() - started, 1) if started else sum(
        v["wall_s"] for v in raw["timings"].values())
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(render(results))
    print(f"\nminitron demo --moe: finished in {_minutes(results['wall_time_s'])}; report {out / 'report.md'}")
    print(f"  winner: {LABELS[results['winner']]} ({results['arms'][results['winner']]['final']:.3f})")
    for f in results["findings"]:
        print(f"  {'holds  ' if f['agrees'] else 'DIFFERS'} {f['claim']}: {f['measured']}")
    return results
