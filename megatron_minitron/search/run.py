"""The search loop: for each candidate shape, a plan from the shared scores, a pruned student, a short
distillation from the same teacher on the same data order, and its validation loss.

Everything runs in one set of processes: the data and the loaded teacher are reused by every
candidate (what separate `minitron distill` runs would pay again each time). Each finished candidate
leaves `OUT/candidates/NAME/result.json`; a killed search skips those and restarts the unfinished
one from scratch (same seed, same data order), so a resumed search ranks exactly like an
uninterrupted one. Candidates run one after another on all ranks.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from megatron_minitron.search.space import Candidate

RESULT = "result.json"


@dataclass(frozen=True, kw_only=True)
class SearchSetup:
    """What every candidate shares."""

    source: object
    """CheckpointInfo of the unpruned model (the teacher)."""
    scores: object
    """Scores of the source."""
    out: Path
    """Search directory."""
    layer_metric: Optional[str]
    """How layers are chosen when a candidate is shallower (see plan.Target)."""
    seed: int
    """Reseeded before each candidate, so each starts from the same RNG state."""
    keep_checkpoints: bool = False
    """Keep each candidate's pruned and distilled checkpoints (otherwise removed once its result is in)."""


def candidate_dir(out: Path, candidate: Candidate) -> Path:
    return out / "candidates" / candidate.name


def finished(out: Path, candidate: Candidate) -> Optional[dict]:
    path = candidate_dir(out, candidate) / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def run_candidate(setup: SearchSetup, candidate: Candidate, *, runtime, train_cfg, distill_cfg, teacher,
                  train_batches, valid_batches, tokenizer: Optional[dict], log: Callable[[str], None]) -> dict:
    """Plan, prune (rank 0), distill (all ranks) and record one candidate; returns its result."""
    from megatron_minitron.distill.loop import distill
    from megatron_minitron.model.checkpoint import latest_iteration, resolve
    from megatron_minitron.plan import make_plan
    from megatron_minitron.prune.rewrite import prune_checkpoint
    from megatron_minitron.runtime import set_seed

    cdir = candidate_dir(setup.out, candidate)
    plan = make_plan(setup.scores, candidate.target(setup.layer_metric), source=setup.source.arch,
                     tensor_parallel=runtime.parallel.tensor_parallel,
                     pipeline_parallel=runtime.parallel.pipeline_parallel)
    if runtime.rank == 0:
        cdir.mkdir(parents=True, exist_ok=True)
        plan.save(cdir / "plan.json")
        if latest_iteration(cdir / "run") is None:  # an unfinished attempt starts again from scratch
            shutil.rmtree(cdir / "run", ignore_errors=True)
        if not (cdir / "student").exists():
            prune_checkpoint(setup.source.root, plan, cdir / "student", print_fn=lambda _: None)
    runtime.barrier()
    set_seed(setup.seed)
    final = distill(teacher_info=setup.source, student_info=resolve(cdir / "student"), runtime=runtime,
                    train_cfg=train_cfg, cfg=distill_cfg, train_batches=train_batches, valid_batches=valid_batches,
                    save=cdir / "run", tokenizer=tokenizer, teacher=teacher,
                    provenance={"command": "search", "candidate": candidate.name, "plan": plan.to_json()})
    result = {**candidate.to_json(), **read_curves(cdir / "run" / "metrics.jsonl"), "final": final}
    if runtime.rank == 0:
        tmp = cdir / (RESULT + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.rename(cdir / RESULT)
        if not setup.keep_checkpoints:
            shutil.rmtree(cdir / "student", ignore_errors=True)
            for path in (cdir / "run").glob("iter_*"):
                shutil.rmtree(path, ignore_errors=True)
    runtime.barrier()
    log(f"candidate {candidate.name}: {candidate.params:,} parameters, zero-shot LM loss "
        f"{result['zero_shot_lm_loss']:.4f}, after {train_cfg.train_iters} steps {result['val_lm_loss']:.4f}")
    return result


def read_curves(metrics: Path) -> dict:
    """Zero-shot loss (step 0) and the validation curve, from the candidate's own metrics file."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    valid = [r for r in records if r["kind"] == "valid"]
    zero = next((r for r in valid if r["iteration"] == 0), None)
    curve = [[r["iteration"], r["val lm loss"]] for r in valid if r["iteration"] > 0]
    return {"zero_shot_lm_loss": zero["val lm loss"] if zero else math.nan,
            "val_lm_loss": curve[-1][1] if curve else math.nan, "curve": curve,
            "train_curve": [[r["iteration"], r["loss"]] for r in records if r["kind"] == "train"]}


def rank(results: list[dict]) -> dict:
    """Rankings by validation loss after retraining and zero-shot, and how well they agree."""
    by_val = sorted(results, key=lambda r: (r["val_lm_loss"], r["name"]))
    by_zero = sorted(results, key=lambda r: (r["zero_shot_lm_loss"], r["name"]))
    return {"ranking": [r["name"] for r in by_val], "zero_shot_ranking": [r["name"] for r in by_zero],
            "winner": by_val[0]["name"], "zero_shot_winner": by_zero[0]["name"],
            "spearman": spearman([r["name"] for r in by_val], [r["name"] for r in by_zero])}


def spearman(a: list[str], b: list[str]) -> float:
    """Spearman rank correlation of two orderings of the same names (1: identical, -1: reversed)."""
    n = len(a)
    if n < 2:
        return 1.0
    pos = {name: i for i, name in enumerate(b)}
    d2 = sum((i - pos[name]) ** 2 for i, name in enumerate(a))
    return 1 - 6 * d2 / (n * (n * n - 1))


def write_report(out: Path, setup_json: dict, results: list[dict], ranking: dict,
                 winner: Optional[dict] = None) -> None:
    """search.json, search.md (the candidate table) and search.png (validation loss vs step), rank 0;
    `winner` is the result of the winner's full distillation when there was one."""
    extra = {"winner_distilled": winner} if winner is not None else {}
    (out / "search.json").write_text(json.dumps({**setup_json, **ranking, "candidates": results, **extra},
                                                indent=2) + "\n")
    order = {name: i + 1 for i, name in enumerate(ranking["ranking"])}
    zero = {name: i + 1 for i, name in enumerate(ranking["zero_shot_ranking"])}
    lines = [f"# Architecture search: {len(results)} candidates near {setup_json['budget']:,} parameters", "",
             f"Winner after retraining: **{ranking['winner']}**; zero-shot winner: {ranking['zero_shot_winner']}; "
             f"Spearman correlation of the two rankings: {ranking['spearman']:.2f}.", "",
             "| rank | candidate | parameters | zero-shot LM loss (rank) | LM loss after retraining |",
             "|---:|---|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: order[r["name"]]):
        lines.append(f"| {order[r['name']]} | {r['name']} | {r['params']:,} | {r['zero_shot_lm_loss']:.4f} "
                     f"({zero[r['name']]}) | {r['val_lm_loss']:.4f} |")
    if winner is not None:
        steps = winner["curve"][-1][0] if winner["curve"] else 0
        lines += ["", f"The winner distilled for {steps} steps (`winner/`): validation LM loss "
                  f"{winner['val_lm_loss']:.4f}, zero-shot {winner['zero_shot_lm_loss']:.4f}."]
    lines += ["", "Names: L layers, h hidden, f MLP, H query heads, G query groups. "
              "![validation loss vs step](search.png)", ""]
    (out / "search.md").write_text("\n".join(lines))
    _plot(out / "search.png", results)


def _plot(path: Path, results: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot extra is optional; the tables carry the numbers
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        points = [[0, r["zero_shot_lm_loss"]], *r["curve"]]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=r["name"])
    ax.set_xlabel("distillation step")
    ax.set_ylabel("validation LM loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
