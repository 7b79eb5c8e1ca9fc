"""What `--resume` may change: the settings a run was started with (run.json) against the resumed
command's, checked before any process starts.

A resumed run continues the same optimisation: its learning-rate schedule, optimizer, data order and
losses come back from the checkpoint. A setting that would change what the run means (learning
rate, batch, sequence length, data, losses) is refused with the list of differences. Bookkeeping
(how often to log, validate, save, when to stop) may change, and so may `train_iters` (to extend or
shorten a run): megatron restores the saved learning-rate schedule, so the schedule keeps the length
it was built with, which run.json then says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_minitron.config import ConfigError

RUN_JSON = "run.json"
SAFE = frozenset({"train.train_iters", "train.exit_interval", "train.log_interval", "train.eval_interval",
                  "train.eval_iters", "train.save_interval", "data.cache_dir"})
"""Settings a resumed run may change (section.field)."""


@dataclass(frozen=True, kw_only=True)
class ResumeCheck:
    """What a resumed run starts from."""

    iteration: int
    """Iteration of the checkpoint it continues from (0: killed before its first checkpoint)."""
    changes: dict
    """{"section.field": [saved, new]} of the safe settings that changed."""
    done: bool
    """The run already reached train_iters: nothing to do, nothing to write."""


def _plain(value):
    """As stored in run.json (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))


def _flatten(settings: dict) -> dict:
    return {f"{section}.{key}": value for section, values in settings.items() if isinstance(values, dict)
            for key, value in values.items()}


def check_resume(save: Path, settings: dict, *, train_iters: int, exit_interval: Optional[int]) -> ResumeCheck:
    """Compare the settings of a resumed run (sections as run.json stores them: "train", "data", and
    "distill" for distillation) with the saved ones; raise ConfigError listing every difference that
    changes the run's meaning, or when the run is already past --train-iters/--exit-interval."""
    from megatron_minitron.model.checkpoint import latest_iteration

    tracked = latest_iteration(save)
    iteration = int(tracked) if tracked is not None and tracked.isdigit() else 0
    path = save / RUN_JSON
    try:
        saved = json.loads(path.read_text()) if path.is_file() else None
    except ValueError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); it cannot be compared with this run's settings") \
            from None
    changes, refused = {}, []
    if saved is not None:
        old, new = _flatten({k: saved.get(k) for k in settings}), _flatten(_plain(settings))
        for key in sorted(set(old) | set(new)):
            if old.get(key) == new.get(key):
                continue
            if key in SAFE:
                changes[key] = [old.get(key), new.get(key)]
            else:
                refused.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    if refused:
        raise ConfigError(f"--resume: the run in {save} was started with other settings ({'; '.join(refused)}); "
                          f"they change what the run means: resume with the saved settings (see {path}) or start "
                          f"a new run")
    if iteration > train_iters:
        raise ConfigError(f"--train-iters {train_iters}: the run in {save} is already at iteration {iteration}; "
                          f"nothing was changed (pass a larger --train-iters to continue it)")
    if exit_interval is not None and iteration >= exit_interval and iteration < train_iters:
        raise ConfigError(f"--exit-interval {exit_interval}: the run in {save} is already at iteration {iteration}; "
                          f"nothing was changed (pass a later --exit-interval)")
    return ResumeCheck(iteration=iteration, changes=changes, done=iteration == train_iters)


def run_record(settings: dict, *, save: Path, check: Optional[ResumeCheck], **extra) -> dict:
    """run.json of a (resumed) run: the settings in force now and, for each resume, where it started
    and what it changed. The learning-rate schedule stays the one the run started with."""
    record = {**_plain(settings), **_plain(extra)}
    path = save / RUN_JSON
    previous = json.loads(path.read_text()) if check is not None and path.is_file() else {}
    resumes = list(previous.get("resumes", []))
    if check is not None:
        resumes.append({"iteration": check.iteration, "changes": check.changes})
    if resumes:
        record["resumes"] = resumes
    if check is not None and check.iteration > 0:  # megatron restores the saved schedule on resume
        record["lr_schedule_steps"] = previous.get("lr_schedule_steps", previous.get("train", {}).get("train_iters"))
    return record
