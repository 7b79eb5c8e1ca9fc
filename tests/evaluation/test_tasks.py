"""The built-in task separates a trained model from an untrained one (through `minitron evaluate --tasks`), and
bad task requests fail at once with one line naming the task and the way out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_minitron.evaluation.builtin import CHANCE, CONTINUATION_TASK, continuation_items
from megatron_minitron.evaluation.run import EvaluationError, TaskConfig, prepare_tasks
from tests.conftest import REPO, child_env
from tests.evaluation.conftest import OFFLINE


@pytest.fixture(scope="module")
def untrained(tiny_teacher, single_rank_runtime, tmp_path_factory):
    """tiny_teacher's architecture with fresh random weights (and tiny_teacher's tokenizer), and the same
    without a tokenizer."""
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.model.build import build_model
    from megatron_minitron.runtime import set_seed

    info = ckpt.resolve(tiny_teacher)
    root = tmp_path_factory.mktemp("untrained")
    set_seed(1234)
    model = build_model(info.arch, single_rank_runtime, use_te=False)
    ckpt.save_checkpoint(root / "with-tokenizer", model=model, arch=info.arch, runtime=single_rank_runtime,
                         iteration=None, tokenizer=info.tokenizer)
    ckpt.save_checkpoint(root / "no-tokenizer", model=model, arch=info.arch, runtime=single_rank_runtime,
                         iteration=None)
    return {"ckpt": root / "with-tokenizer", "no_tokenizer": root / "no-tokenizer"}


def evaluate(*args: str, cache) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_minitron", "evaluate", "--cache-dir", str(cache), *args]
    return subprocess.run(cmd, cwd=REPO, env=child_env(**OFFLINE), capture_output=True, text=True, timeout=900)


def test_trained_model_beats_chance_and_untrained_does_not(tiny_teacher, untrained, data_cache, tmp_path):
    scores = {}
    for name, path in (("trained", tiny_teacher), ("untrained", untrained["ckpt"])):
        proc = evaluate("--load", str(path), "--tasks", CONTINUATION_TASK, "--batch-size", "32", "--out",
                        str(tmp_path / name), cache=data_cache)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summary = [line for line in proc.stdout.splitlines() if f"{CONTINUATION_TASK}: acc" in line]
        assert len(summary) == 1 and "chance 0.25" in summary[0] and "n=" in summary[0], proc.stdout[-2000:]
        results = json.loads((tmp_path / name / "results.json").read_text())
        scores[name] = results["results"][CONTINUATION_TASK]
        assert results["n-samples"][CONTINUATION_TASK]["effective"] >= 250
    chance, trained, untrained_ = CHANCE[CONTINUATION_TASK], scores["trained"], scores["untrained"]
    # measured: trained 0.330 +- 0.027, untrained 0.24-0.26 (294 passages)
    assert trained["acc_mutual_info,none"] >= chance + 2 * trained["acc_mutual_info_stderr,none"], scores
    assert abs(untrained_["acc_mutual_info,none"] - chance) <= 2 * untrained_["acc_mutual_info_stderr,none"], scores
    assert trained["acc_mutual_info,none"] - untrained_["acc_mutual_info,none"] >= 0.05, scores


def test_task_needing_a_download_fails_at_once_offline(tiny_teacher, data_cache):
    proc = evaluate("--load", str(tiny_teacher), "--tasks", "arc_easy", cache=data_cache)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "'arc_easy'" in last and "offline" in last and "--include-path" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_checkpoint_without_tokenizer(untrained, capsys):
    from megatron_minitron.cli import main

    assert main(["evaluate", "--load", str(untrained["no_tokenizer"]), "--tasks", CONTINUATION_TASK]) == 2
    err = capsys.readouterr().err
    assert "names no tokenizer" in err and "--tokenizer" in err and str(untrained["no_tokenizer"]) in err


def test_unknown_task_lists_close_names(data_cache):
    with pytest.raises(EvaluationError,
                       match="unknown task 'minitron_continuaton'.*close names: minitron_continuation"):
        prepare_tasks(TaskConfig(tasks=("minitron_continuaton",), cache_dir=str(data_cache)))


def test_fewshot_larger_than_pool(data_cache):
    from megatron_minitron.data.corpus import embedded_documents

    pool = len(continuation_items(embedded_documents("valid"))[0])
    prepare_tasks(TaskConfig(tasks=(CONTINUATION_TASK,), num_fewshot=pool, cache_dir=str(data_cache)))
    with pytest.raises(EvaluationError, match=f"--num-fewshot {pool + 1} .*'{CONTINUATION_TASK}'.*{pool} examples"):
        prepare_tasks(TaskConfig(tasks=(CONTINUATION_TASK,), num_fewshot=pool + 1, cache_dir=str(data_cache)))


def test_bad_flags_name_themselves(tmp_path):
    with pytest.raises(EvaluationError, match="--limit"):
        TaskConfig(tasks=("x",), limit=0)
    with pytest.raises(EvaluationError, match="--include-path"):
        TaskConfig(tasks=("x",), include_paths=(str(tmp_path / "absent"),))


def test_generate_until_with_a_sentencepiece_tokenizer(tiny_teacher, single_rank_runtime):
    """A SentencePiece EOS decodes to "": it must not become a stop string (which would end every generation at
    once); the text is the greedy tokens' text cut at the first stop string."""
    import torch
    from lm_eval.api.instance import Instance

    from megatron_minitron.data.tokenizer import TokenizerRef
    from megatron_minitron.evaluation.engine import GenerationRow
    from megatron_minitron.evaluation.lm import MegatronLM
    from megatron_minitron.evaluation.run import load_engine
    from megatron_minitron.model import checkpoint as ckpt

    info = ckpt.resolve(tiny_teacher)
    control = torch.distributed.new_group(backend="gloo")
    engine, tokenizer = load_engine(info, TokenizerRef.from_json(info.tokenizer), single_rank_runtime,
                                    control_group=control, batch_size=2)
    assert tokenizer.detokenize([tokenizer.eod]) == ""
    lm = MegatronLM(engine=engine, tokenizer=tokenizer)
    prompts = ["Return the value of the", "This module provides"]
    texts = lm.generate_until([Instance(request_type="generate_until", doc={}, idx=0,
                                        arguments=(p, {"until": ["\n\n"], "max_gen_toks": 10})) for p in prompts])
    tokens = engine.generate([GenerationRow(context=tuple(tokenizer.tokenize(p)), max_new_tokens=10, stop=("\n\n",))
                              for p in prompts])
    assert texts == [tokenizer.detokenize(t).split("\n\n")[0] for t in tokens]
    assert any(len(t) > 1 for t in tokens) and any(texts), (tokens, texts)
