"""The search loop: for each candidate shape, a plan from the shared scores, a pruned student, a short
distillation from the same teacher on the same data order, and its validation loss.

Everything runs in one set of processes: the data and the loaded teacher are reused by every
candidate (what separate `minitron distill` runs would pay again each time). Each finished candidate
leaves `OUT/candidates/NAME/result.json`; a killed search skips those and restarts the unfinished
one from scratch (same seed, same data order), so a resumed search ranks exactly like an
uninterrupted one. Candidates run one after another on all ranks. `search` is the whole run (what
`minitron search` calls once its flags are checked); `check_out` and `check_winner` are its resume
checks, which need no process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_minitron.config import ConfigError
from megatron_minitron.search.space import Candidate, SearchSpace

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


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """Rank the candidates by a downstream task score (`--score TASK[:metric]`) instead of validation loss."""

    tasks: Any
    """evaluation.run.TaskConfig of the one task scored on every candidate after its distillation."""
    metric: Optional[str] = None
    """The task's metric that ranks the candidates (None: the task's first metric, e.g. acc). Its direction is
    the task's own: larger is better for accuracies, smaller for perplexities."""
    min_score: Optional[float] = None
    """Stop with an error, before the winner's longer distillation, when the best candidate's score is below
    this (metrics where larger is better only)."""

    @property
    def task(self) -> str:
        return self.tasks.tasks[0]

    def to_json(self) -> dict:
        """What a resumed search must share (the floor may change between runs)."""
        return {"task": self.task, "metric": self.metric, "limit": self.tasks.limit}


class ScoreFloorError(ConfigError):
    """The best candidate's task score is below --min-score."""


@dataclass(frozen=True, kw_only=True)
class SearchJob:
    """A whole search, its inputs checked: what `search` runs."""

    setup: SearchSetup
    """What every candidate shares."""
    scores_path: str
    """The scores directory as given (recorded in space.json)."""
    budget: int
    """Target parameter count."""
    budget_kind: str = "total"
    """What the budget counts: "total" parameters or "active" ones (one token's path through an MoE model)."""
    tolerance: float
    """Candidates lie within ±tolerance × budget."""
    space: SearchSpace
    """The space the candidates were enumerated from."""
    candidates: tuple[Candidate, ...]
    """The candidates, in the deterministic order they run."""
    removed: dict[str, int]
    """Combinations removed from the space, by reason."""
    train: Any
    """TrainConfig of every candidate's distillation."""
    distill: Any
    """DistillConfig of every candidate's distillation."""
    data: Any
    """DataConfig (tokenizer included) of the training and validation data."""
    winner_iters: int = 0
    """Then distill the winner this many steps into OUT/winner (0: no)."""
    overwrite: bool = False
    """Delete a previous search in OUT first."""
    score: Optional[ScoreConfig] = None
    """Rank by this task score (validation loss still reported); None ranks by validation loss."""
    teacher_logits: Optional[str] = None
    """A logits cache of the source (`minitron cache-logits`) every candidate distills from instead of the
    teacher (already checked against this search's data and source); the winner too if it covers its run."""

    def setup_json(self) -> dict:
        """The settings a resumed search must share with the one it continues (OUT/space.json), as stored."""
        raw = {"source": str(self.setup.source.root), "scores": self.scores_path, "budget": self.budget,
               "tolerance": self.tolerance, "space": self.space.to_json(), "train": self.train.to_json(),
               "distill": self.distill.to_json(), "removed": dict(self.removed)}
        if self.score is not None:
            raw["score"] = self.score.to_json()
        if self.budget_kind != "total":  # absent for total, so searches started before it existed resume
            raw["budget_kind"] = self.budget_kind
        if self.teacher_logits is not None:
            raw["teacher_logits"] = self.teacher_logits
        return json.loads(json.dumps(raw))  # tuples become lists, as in the file


def check_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """OUT is new or empty, or a search continued with --resume or replaced with --overwrite."""
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise ConfigError(f"--resume: {out} holds no search to continue")
        return
    if not (out / "space.json").is_file():
        raise ConfigError(f"--out {out} exists and is not a search directory; choose a new path")
    if not (resume or overwrite):
        raise ConfigError(f"--out {out} already holds a search; pass --resume to continue it or --overwrite to "
                          f"start again")


def check_winner(out: Path, iters: int, *, overwrite: bool) -> None:
    """A resumed search continues its winner's distillation only at the same length (its LR schedule)."""
    done = out / "winner" / "winner.json"
    if overwrite or not iters or not done.is_file():
        return
    before = json.loads(done.read_text())["winner_iters"]
    if before != iters:
        raise ConfigError(f"--winner-iters {iters}: {out / 'winner'} holds the winner distilled for {before} steps; "
                          f"pass --winner-iters {before} or move that directory away")


def search(job: SearchJob, runtime) -> dict:
    """Every candidate (those finished earlier are read back), the ranking and report, then the winner's
    longer distillation if asked; returns the ranking. Runs on every rank of `runtime`."""
    from megatron_minitron.data.loader import load_tokenizer, run_batches, tokenizer_json
    from megatron_minitron.distill.loop import load_teacher

    def log(line: str) -> None:
        if runtime.is_logging_rank:
            print(line, flush=True)

    out, source, cfg = job.setup.out, job.setup.source, job.train
    tokenizer = load_tokenizer(job.data)
    scorer, score = _scorer(job, runtime, tokenizer.ref)  # a bad task or metric stops every rank before OUT is touched
    setup_json = _open_out(job, runtime)
    kind = " active" if job.budget_kind == "active" else ""
    log(f"search: {len(job.candidates)} candidates within {job.tolerance:.0%} of {job.budget:,}{kind} parameters "
        f"({sum(job.removed.values())} combinations removed: {dict(job.removed)}); {cfg.train_iters} distillation "
        f"steps each")
    cache, teacher = None, None
    if job.teacher_logits is not None:  # every candidate reads the same cached targets; no teacher built
        from megatron_minitron.distill.cached import cached_batches
        from megatron_minitron.distill.logits_cache import LogitsCache

        cache = LogitsCache(job.teacher_logits)
        batches = cached_batches(cache, job.data, tokenizer, cfg, runtime, model_vocab_size=source.arch.vocab_size)
        log(f"distilling every candidate from the cached top-{cache.manifest.top_k} in {cache.root}")
    else:
        batches = run_batches(job.data, tokenizer, cfg, runtime, model_vocab_size=source.arch.vocab_size)
        teacher = load_teacher(source, runtime, job.distill, dtype=_dtype(cfg, runtime),
                               padded_vocab=source.arch.padded_vocab)
    common = dict(runtime=runtime, distill_cfg=job.distill, teacher=teacher,
                  tokenizer=tokenizer_json(job.data, tokenizer), log=log, scorer=scorer, score=score)
    results = []
    for i, candidate in enumerate(job.candidates):
        done = finished(out, candidate)
        if done is not None:
            log(f"[{i + 1}/{len(job.candidates)}] {candidate.name}: finished earlier (val LM loss "
                f"{done['val_lm_loss']:.4f})")
            results.append(done)
            continue
        active = "" if candidate.active_params is None else f" ({candidate.active_params:,} active)"
        log(f"[{i + 1}/{len(job.candidates)}] {candidate.name}: {candidate.params:,} parameters{active}")
        results.append(run_candidate(job.setup, candidate, train_cfg=cfg, **common, **batches))
    ranking = rank(results, score)
    if runtime.rank == 0:
        write_report(out, setup_json, results, ranking)
        (out / "best_plan.json").write_text((out / "candidates" / ranking["winner"] / "plan.json").read_text())
    runtime.barrier()
    log("\n".join((out / "search.md").read_text().splitlines()[:4 + len(results) + 3]))
    if job.score is not None and job.score.min_score is not None:
        check_floor(results, ranking, job.score.min_score)
    if job.winner_iters:
        winner = next(c for c in job.candidates if c.name == ranking["winner"])
        full = dataclasses.replace(cfg, train_iters=job.winner_iters)
        if cache is not None and job.winner_iters * cfg.global_batch_size <= cache.manifest.samples("train"):
            log(f"the winner's {job.winner_iters} steps are in the cache too")  # batches as they are
        else:
            # data sized for the winner's run: the same order a separate `minitron distill` of that length sees
            batches = run_batches(job.data, tokenizer, full, runtime, model_vocab_size=source.arch.vocab_size)
            if common["teacher"] is None:
                log(f"the cache does not cover the winner's {job.winner_iters} steps: loading the teacher")
                common["teacher"] = load_teacher(source, runtime, job.distill, dtype=_dtype(cfg, runtime),
                                                 padded_vocab=source.arch.padded_vocab)
        if runtime.rank == 0:
            (out / "winner").mkdir(exist_ok=True)
            (out / "winner" / "winner.json").write_text(json.dumps({"winner_iters": job.winner_iters}) + "\n")
        distilled = finished(out / "winner", winner) or run_candidate(
            dataclasses.replace(job.setup, out=out / "winner", keep_checkpoints=True), winner, train_cfg=full,
            **common, **batches)
        if runtime.rank == 0:
            write_report(out, setup_json, results, ranking, winner=distilled)
        runtime.barrier()
    return ranking


def _scorer(job: SearchJob, runtime, tokenizer_ref) -> tuple[Any, Optional[dict]]:
    """(TaskScorer, {"task", "metric", "higher_is_better"}) of --score, its task and metric checked on rank 0;
    (None, None) without --score. Every rank calls this."""
    if job.score is None:
        return None, None
    from megatron_minitron.evaluation.run import TaskScorer

    arch = job.setup.source.arch  # pruning keeps the vocabulary and the positions
    scorer = TaskScorer(job.score.tasks, runtime=runtime, tokenizer_ref=tokenizer_ref,
                        vocab_size=arch.vocab_size, max_length=arch.max_position_embeddings)
    metric, higher = scorer.metric(job.score.task, job.score.metric)
    if job.score.min_score is not None and not higher:
        raise ConfigError(f"--min-score: {job.score.task}:{metric} is better when smaller, so a floor on it means "
                          f"nothing; rank by a metric where larger is better or drop --min-score")
    return scorer, {"task": job.score.task, "metric": metric, "higher_is_better": higher}


def _open_out(job: SearchJob, runtime) -> dict:
    """Rank 0 replaces (--overwrite) or creates OUT and records the settings; a resumed search must have
    been started with the same ones. Returns them."""
    out, setup_json = job.setup.out, job.setup_json()
    if runtime.rank == 0:
        if job.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        previous = out / "space.json"
        if previous.is_file() and json.loads(previous.read_text()) != setup_json:
            raise ConfigError(f"--resume: {out} was searched with other settings; use a new --out")
        previous.write_text(json.dumps(setup_json, indent=2) + "\n")
    runtime.barrier()
    return setup_json


def _dtype(cfg, runtime):
    import torch

    bf16 = cfg.bf16 if cfg.bf16 is not None else runtime.device.type == "cuda"
    return torch.bfloat16 if bf16 else torch.float32


def candidate_dir(out: Path, candidate: Candidate) -> Path:
    return out / "candidates" / candidate.name


def finished(out: Path, candidate: Candidate) -> Optional[dict]:
    path = candidate_dir(out, candidate) / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def run_candidate(setup: SearchSetup, candidate: Candidate, *, runtime, train_cfg, distill_cfg, teacher,
                  train_batches, valid_batches, tokenizer: Optional[dict], log: Callable[[str], None],
                  scorer=None, score: Optional[dict] = None) -> dict:
    """Plan, prune (rank 0), distill (all ranks) and record one candidate; returns its result. With a scorer,
    the task is scored on the distilled student (at its last step) and the result gains "score"."""
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
    common = dict(student_info=resolve(cdir / "student"), runtime=runtime, train_cfg=train_cfg, cfg=distill_cfg,
                  train_batches=train_batches, valid_batches=valid_batches, save=cdir / "run", tokenizer=tokenizer,
                  provenance={"command": "search", "candidate": candidate.name, "plan": plan.to_json()},
                  task_scores=scorer)
    if teacher is None:  # the cached targets come with the batches
        from megatron_minitron.distill.cached import distill_from_cache

        final = distill_from_cache(**common)
    else:
        final = distill(teacher_info=setup.source, teacher=teacher, **common)
    result = {**candidate.to_json(), **read_curves(cdir / "run" / "metrics.jsonl"), "final": final}
    if score is not None:
        result["score"] = task_score(result["tasks"], score, cdir / "run" / "metrics.jsonl")
    if runtime.rank == 0:
        tmp = cdir / (RESULT + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.rename(cdir / RESULT)
        if not setup.keep_checkpoints:
            shutil.rmtree(cdir / "student", ignore_errors=True)
            for path in (cdir / "run").glob("iter_*"):
                shutil.rmtree(path, ignore_errors=True)
    runtime.barrier()
    scored = f", {score['task']} {score['metric']} {result['score']:.4f}" if score is not None else ""
    log(f"candidate {candidate.name}: {candidate.params:,} parameters, zero-shot LM loss "
        f"{result['zero_shot_lm_loss']:.4f}, after {train_cfg.train_iters} steps {result['val_lm_loss']:.4f}{scored}")
    return result


def task_score(tasks: dict, score: dict, where: Path) -> float:
    """The ranking metric among a candidate's last task scores."""
    key = f"{score['task']}/{score['metric']}"
    if key not in tasks:
        raise ConfigError(f"--score {score['task']}:{score['metric']}: {where} holds no {key} after distillation "
                          f"(scores: {', '.join(tasks) or 'none'}); a group needs an aggregate of that metric, or "
                          f"rank by one of its tasks")
    return tasks[key]


def read_curves(metrics: Path) -> dict:
    """Zero-shot loss (step 0) and the validation curve, from the candidate's own metrics file."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    valid = [r for r in records if r["kind"] == "valid"]
    zero = next((r for r in valid if r["iteration"] == 0), None)
    curve = [[r["iteration"], r["val lm loss"]] for r in valid if r["iteration"] > 0]
    tasks = [r for r in records if r["kind"] == "tasks"]
    last_tasks = {k: v for k, v in tasks[-1].items() if k not in ("kind", "iteration")} if tasks else {}
    return {"zero_shot_lm_loss": zero["val lm loss"] if zero else math.nan,
            "val_lm_loss": curve[-1][1] if curve else math.nan, "curve": curve,
            "train_curve": [[r["iteration"], r["loss"]] for r in records if r["kind"] == "train"],
            **({"tasks": last_tasks} if tasks else {})}


def rank(results: list[dict], score: Optional[dict] = None) -> dict:
    """Rankings by validation loss after retraining and zero-shot, and how well they agree. With `score`
    ({"task", "metric", "higher_is_better"}), "ranking" and "winner" follow each result's "score" instead (ties
    broken by validation loss; a NaN score ranks last), and "loss_ranking" / "loss_winner" keep the loss's."""
    by_val = sorted(results, key=lambda r: (r["val_lm_loss"], r["name"]))
    by_zero = sorted(results, key=lambda r: (r["zero_shot_lm_loss"], r["name"]))
    ranking = {"ranking": [r["name"] for r in by_val], "zero_shot_ranking": [r["name"] for r in by_zero],
               "winner": by_val[0]["name"], "zero_shot_winner": by_zero[0]["name"],
               "loss_ranking": [r["name"] for r in by_val], "loss_winner": by_val[0]["name"],
               "spearman": spearman([r["name"] for r in by_val], [r["name"] for r in by_zero])}
    if score is not None:
        sign = -1 if score["higher_is_better"] else 1

        def key(r: dict) -> tuple:
            value = r["score"]
            return (math.inf if math.isnan(value) else sign * value, r["val_lm_loss"], r["name"])

        by_score = sorted(results, key=key)
        ranking.update(ranking=[r["name"] for r in by_score], winner=by_score[0]["name"], score=dict(score))
    return ranking


def check_floor(results: list[dict], ranking: dict, min_score: float) -> None:
    """ScoreFloorError naming the best candidate, its score and the floor when it scores below --min-score."""
    best = next(r for r in results if r["name"] == ranking["winner"])
    score = ranking["score"]
    if not best["score"] >= min_score:  # NaN fails too
        raise ScoreFloorError(
            f"--min-score {min_score:g}: the best candidate, {best['name']}, scores {score['task']} "
            f"{score['metric']} {best['score']:.4f}, below the floor; no winner was distilled further (every "
            f"candidate is in search.md). Lower --min-score, raise --budget or distill candidates longer "
            f"(--train-iters)")


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
    score = ranking.get("score")
    by = "" if score is None else (f" by {score['task']} {score['metric']} "
                                   f"({'larger' if score['higher_is_better'] else 'smaller'} is better)")
    kind = " active" if setup_json.get("budget_kind") == "active" else ""
    lines = [f"# Architecture search: {len(results)} candidates near {setup_json['budget']:,}{kind} parameters", "",
             f"Winner after retraining{by}: **{ranking['winner']}**; zero-shot winner: {ranking['zero_shot_winner']}; "
             f"Spearman correlation of the loss rankings after retraining and zero-shot: {ranking['spearman']:.2f}.",
             "", "| rank | candidate | parameters | zero-shot LM loss (rank) | LM loss after retraining |"
             + ("" if score is None else f" {score['task']} {score['metric']} |"),
             "|---:|---|---:|---:|---:|" + ("" if score is None else "---:|")]
    for r in sorted(results, key=lambda r: order[r["name"]]):
        lines.append(f"| {order[r['name']]} | {r['name']} | {r['params']:,} | {r['zero_shot_lm_loss']:.4f} "
                     f"({zero[r['name']]}) | {r['val_lm_loss']:.4f} |"
                     + ("" if score is None else f" {r['score']:.4f} |"))
    if winner is not None:
        steps = winner["curve"][-1][0] if winner["curve"] else 0
        scored = "" if score is None else f", {score['task']} {score['metric']} {winner['score']:.4f}"
        lines += ["", f"The winner distilled for {steps} steps (`winner/`): validation LM loss "
                  f"{winner['val_lm_loss']:.4f}, zero-shot {winner['zero_shot_lm_loss']:.4f}{scored}."]
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
