"""Downstream tasks on a checkpoint with lm-evaluation-harness, at any TP/PP/DP.

Every rank calls `evaluate_tasks`. Global rank 0 resolves the tasks first (before any model is built) and
shares the verdict, so a bad task name, data that cannot be had offline or a few-shot count larger than a
task's pool stops every rank at once with one message. Then rank 0 runs lm-eval's `simple_evaluate` on a
`MegatronLM` while the other ranks serve its forward passes (engine.py).

When the Hugging Face Hub cannot be reached (or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set), `datasets`
is put in offline mode before it is imported: cached and local data still load, and a task whose data would
need a download fails at once instead of retrying for minutes.
"""

from __future__ import annotations

import difflib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import torch

from megatron_minitron.config import ConfigError
from megatron_minitron.evaluation.builtin import BUILTIN_TASKS, CHANCE, builtin_task_dir


class EvaluationError(ConfigError):
    """A task request that cannot run, with the task and the way out named in the message."""


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """What to evaluate and how."""

    tasks: tuple[str, ...]
    """lm-eval task (or group/tag) names, e.g. ("minitron_continuation",) or ("mmlu", "hellaswag")."""
    num_fewshot: Optional[int] = None
    """Few-shot examples per prompt; None keeps each task's own default (0 for most)."""
    limit: Optional[float] = None
    """Documents per task: a count (>= 1) or a fraction (< 1); None evaluates every document."""
    batch_size: int = 8
    """Sequences per forward pass on each data-parallel replica."""
    include_paths: tuple[str, ...] = ()
    """Directories of extra lm-eval task YAMLs (the built-in tasks are always included)."""
    cache_dir: str = ".cache/minitron-data"
    """Where the built-in tasks' data and YAMLs are written."""
    log_samples: bool = False
    """Also return lm-eval's per-document records (prompts, responses, per-document metrics)."""
    bootstrap_iters: int = 1000
    """Bootstrap resamples for the standard errors lm-eval cannot compute in closed form (perplexities)."""
    max_gen_toks: int = 256
    """New tokens generated when a generation task sets no max_gen_toks."""
    add_bos_token: bool = False
    """Start every sequence with the tokenizer's BOS token (lm-eval's add_bos_token)."""
    seed: int = 1234
    """Seed of lm-eval's few-shot sampling and its other random choices."""

    def __post_init__(self) -> None:
        if not self.tasks or any(not t for t in self.tasks):
            raise EvaluationError(f"--tasks needs at least one task name, got {','.join(self.tasks)!r}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise EvaluationError(f"--num-fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit <= 0:
            raise EvaluationError(f"--limit must be positive, got {self.limit}")
        if self.batch_size < 1:
            raise EvaluationError(f"--batch-size must be >= 1, got {self.batch_size}")
        for path in self.include_paths:
            if not Path(path).is_dir():
                raise EvaluationError(f"--include-path {path} is not a directory of lm-eval task YAMLs")


# ------------------------------------------------------------------------------------------ offline data
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face Hub (HF_ENDPOINT) opens within `timeout` seconds."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def use_offline_mode_if_unreachable() -> bool:
    """Put huggingface_hub and datasets offline when the Hub is unreachable; True when offline. Must run
    before `datasets` is imported (both read the variables at import)."""
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(f, "").lower() in ("1", "true", "yes", "on") for f in flags):
        return True
    if hub_reachable():
        return False
    for flag in flags:
        os.environ[flag] = "1"
    return True


def _missing_data_error(task: str, error: BaseException, offline: bool) -> EvaluationError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = "the Hugging Face Hub is unreachable (offline mode)" if offline else "its data could not be loaded"
    return EvaluationError(
        f"task {task!r}: {where}: {reason}. Provide its data locally: run the same command once where the Hub "
        f"is reachable and copy the datasets cache (HF_DATASETS_CACHE, default ~/.cache/huggingface/datasets) "
        f"here, or save the dataset's files and point a task YAML at them (dataset_path: json, "
        f"dataset_kwargs: {{data_files: ...}}) in a directory passed with --include-path")


# ------------------------------------------------------------------------------------------ tasks
def task_manager(cfg: TaskConfig):
    """An lm-eval TaskManager that knows every requested name: the built-in and --include-path tasks first
    (fast), lm-eval's whole registry only when a name is not among them. Unknown names raise EvaluationError
    listing close names."""
    from lm_eval.tasks import TaskManager

    include = [str(builtin_task_dir(cfg.cache_dir)), *cfg.include_paths]
    manager = TaskManager(include_path=include, include_defaults=False)
    if not set(cfg.tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include)
    for name in cfg.tasks:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"close names: {', '.join(close)}" if close else f"built-in tasks: {', '.join(BUILTIN_TASKS)}"
            raise EvaluationError(f"unknown task {name!r} ({hint}); `lm-eval ls tasks` lists every name, and "
                                  f"--include-path adds task YAMLs of your own")
    return manager


def _pool_size(task) -> tuple[int, str]:
    """(few-shot examples available to one document, which split they come from)."""
    cfg = task.config
    if cfg.fewshot_split is not None:
        return len(task.dataset[cfg.fewshot_split]), cfg.fewshot_split
    for has, split, docs in ((task.has_training_docs, cfg.training_split, task.training_docs),
                             (task.has_validation_docs, cfg.validation_split, task.validation_docs)):
        if has():
            return len(docs()), split
    return len(task.test_docs()) - 1, f"{cfg.test_split} (the other documents)"


def check_tasks(manager, cfg: TaskConfig, offline: bool) -> None:
    """Load every requested task's data now; EvaluationError names the task whose data is missing or whose
    few-shot pool is smaller than --num-fewshot."""
    for name in cfg.tasks:
        try:
            loaded = manager.load([name])
        except (ConnectionError, FileNotFoundError) as error:
            raise _missing_data_error(name, error, offline) from None
        if not cfg.num_fewshot:
            continue
        for task_name, task in loaded["tasks"].items():
            available, split = _pool_size(task)
            if cfg.num_fewshot > available:
                raise EvaluationError(f"--num-fewshot {cfg.num_fewshot} is larger than task {task_name!r}'s few-shot "
                                      f"pool: {available} examples in split {split!r}; use --num-fewshot <= "
                                      f"{available}")


def metric_direction(manager, task: str, metric: Optional[str] = None) -> tuple[str, bool]:
    """(the metric, whether a larger value is better) of a task or group, as its tasks declare them; metric None
    means the task's first metric. EvaluationError names the task's metrics when `metric` is not one of them."""
    directions: dict[str, set] = {}
    for loaded in manager.load([task])["tasks"].values():
        for name, higher in loaded.higher_is_better().items():
            directions.setdefault(name, set()).add(bool(higher))
    if not directions:
        raise EvaluationError(f"task {task!r} declares no metric to rank by")
    metric = metric or next(iter(directions))
    if metric not in directions:
        raise EvaluationError(f"task {task!r} has no metric {metric!r}; its metrics: {', '.join(directions)} "
                              f"(give one as {task}:METRIC)")
    if len(directions[metric]) > 1:
        raise EvaluationError(f"the tasks of group {task!r} disagree on whether a larger {metric!r} is better; "
                              f"rank by one of its tasks instead")
    return metric, directions[metric].pop()


def prepare_tasks(cfg: TaskConfig):
    """Offline mode if needed, then the TaskManager with every task checked (rank 0 only)."""
    offline = use_offline_mode_if_unreachable()
    manager = task_manager(cfg)
    check_tasks(manager, cfg, offline)
    return manager


# ------------------------------------------------------------------------------------------ running
def checked_tasks(cfg: TaskConfig, runtime, control_group):
    """The TaskManager on rank 0 (None elsewhere) once rank 0 has checked every task; a failed check raises the
    same EvaluationError on every rank. Every rank calls this."""
    manager, verdict = None, [None]
    if runtime.rank == 0:
        try:
            manager = prepare_tasks(cfg)
        except EvaluationError as error:
            verdict = [str(error)]
    torch.distributed.broadcast_object_list(verdict, src=0, group=control_group)
    if verdict[0] is not None:
        raise EvaluationError(verdict[0])
    return manager


def evaluate_tasks(info, tokenizer_ref, runtime, cfg: TaskConfig) -> Optional[dict]:
    """lm-eval's results (rank 0; None elsewhere) for a checkpoint's weights. Every rank calls this."""
    control = runtime.new_control_group()
    manager = checked_tasks(cfg, runtime, control)
    engine, tokenizer = load_engine(info, tokenizer_ref, runtime, control_group=control, batch_size=cfg.batch_size)
    if runtime.rank != 0:
        engine.follow()
        return None
    try:
        return run_lm_eval(engine, tokenizer, manager, cfg)
    finally:
        engine.stop()


class TaskScorer:
    """Downstream scores of a model being trained (`distill --eval-tasks`): built by every rank before training
    (the tasks are checked then), called by every rank with the trainer; returns {"TASK/METRIC": value} on every
    rank (rank 0 runs lm-eval, the scores are then broadcast so the logging rank has them)."""

    def __init__(self, cfg: TaskConfig, *, runtime, tokenizer_ref, vocab_size: int, max_length: int) -> None:
        self.cfg, self.runtime = cfg, runtime
        self.control = runtime.new_control_group()
        self.manager = checked_tasks(cfg, runtime, self.control)
        self.tokenizer = tokenizer_ref.load()
        self.vocab_size, self.max_length = vocab_size, max_length

    def metric(self, task: str, metric: Optional[str] = None) -> tuple[str, bool]:
        """metric_direction of one of the scored tasks, checked on rank 0; every rank calls this and a bad metric
        raises the same EvaluationError on every rank."""
        verdict = [None]
        if self.runtime.rank == 0:
            try:
                verdict = [metric_direction(self.manager, task, metric)]
            except EvaluationError as error:
                verdict = [str(error)]
        torch.distributed.broadcast_object_list(verdict, src=0, group=self.control)
        if isinstance(verdict[0], str):
            raise EvaluationError(verdict[0])
        return tuple(verdict[0])

    def __call__(self, trainer) -> dict[str, float]:
        from megatron_minitron.evaluation.engine import Engine

        tok = self.tokenizer
        engine = Engine(model=trainer.model[0], runtime=self.runtime, control_group=self.control,
                        vocab_size=self.vocab_size, batch_size=self.cfg.batch_size, max_length=self.max_length,
                        pad=tok.pad, eod=tok.eod, detokenize=tok.detokenize)
        scores = [None]
        if self.runtime.rank == 0:
            try:
                scores = [flat_scores(run_lm_eval(engine, tok, self.manager, self.cfg))]
            finally:
                engine.stop()
        else:
            engine.follow()
        torch.distributed.broadcast_object_list(scores, src=0, group=self.control)
        return scores[0]


def flat_scores(results: dict) -> dict[str, float]:
    """{"TASK/METRIC": value} of every numeric metric (standard errors left out)."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if filt and not name.endswith("_stderr") and isinstance(value, (int, float)):
                out[f"{task}/{name}"] = float(value)
    return out


def load_engine(info, tokenizer_ref, runtime, *, control_group, batch_size: int):
    """(Engine over the checkpoint's weights, its tokenizer); every rank calls this."""
    from megatron_minitron.evaluation.engine import Engine
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.checkpoint import load_checkpoint

    tokenizer = tokenizer_ref.load()
    if tokenizer.vocab_size > info.arch.vocab_size:
        raise EvaluationError(f"the tokenizer {tokenizer_ref.path} has {tokenizer.vocab_size} tokens, more than the "
                              f"model's vocabulary ({info.arch.vocab_size}); pass the tokenizer it was trained with")
    model = build_model(info.arch, runtime)
    load_checkpoint(info, model=model)
    engine = Engine(model=model, runtime=runtime, control_group=control_group, vocab_size=info.arch.vocab_size,
                    batch_size=batch_size, max_length=info.arch.max_position_embeddings, pad=tokenizer.pad,
                    eod=tokenizer.eod, detokenize=tokenizer.detokenize)
    return engine, tokenizer


def run_lm_eval(engine, tokenizer, manager, cfg: TaskConfig) -> dict:
    """lm-eval's simple_evaluate of cfg's tasks on the engine's model (the driver only; followers serve)."""
    from lm_eval.evaluator import simple_evaluate

    from megatron_minitron.evaluation.lm import MegatronLM

    lm = MegatronLM(engine=engine, tokenizer=tokenizer, add_bos_token=cfg.add_bos_token, max_gen_toks=cfg.max_gen_toks)
    limit = None if cfg.limit is None else (int(cfg.limit) if cfg.limit >= 1 else cfg.limit)
    return simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=limit,
                           task_manager=manager, log_samples=cfg.log_samples, bootstrap_iters=cfg.bootstrap_iters,
                           random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                           fewshot_random_seed=cfg.seed)


# ------------------------------------------------------------------------------------------ reporting
def summary_lines(results: dict) -> list[str]:
    """One line per task: its metrics with standard errors, documents, few-shot count (and chance level)."""
    lines = []
    for task, metrics in results["results"].items():
        parts = []
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{name}_stderr,{filt}")
            parts.append(f"{name} {value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else ""))
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        shots = results.get("n-shot", {}).get(task)
        extra = [f"n={n}" if n is not None else None, f"{shots}-shot" if shots is not None else None,
                 f"chance {CHANCE[task]:.2f}" if task in CHANCE else None]
        lines.append(f"{task}: {', '.join(parts)} ({', '.join(e for e in extra if e)})")
    return lines


def write_results(results: dict, out: Path) -> list[Path]:
    """OUT/results.json (lm-eval's results without the per-document samples) and, when they were logged,
    OUT/samples_TASK.jsonl; each written under a temporary name and renamed. Returns the paths."""
    from lm_eval.utils import handle_non_serializable

    from megatron_minitron.data.files import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    written = []

    def dump(path: Path, text: str) -> None:
        with atomic_path(str(path)) as temp, open(temp, "w", encoding="utf-8") as stream:
            stream.write(text)
        written.append(path)

    body = {k: v for k, v in results.items() if k != "samples"}
    dump(out / "results.json", json.dumps(body, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    for task, samples in (results.get("samples") or {}).items():
        dump(out / f"samples_{task}.jsonl", "".join(
            json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n" for s in samples))
    return written
