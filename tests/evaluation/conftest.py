"""Fixtures of the evaluation tests: offline Hugging Face libraries, one small model in both worlds, and lm-eval's
own `hf` backend run on its export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env
from tests.evaluation import models

pytest.importorskip("lm_eval", reason="the evaluation tests need lm-eval (pip install -e .[test])")

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="session", autouse=True)
def offline_hub(tmp_path_factory):
    """No test may reach the network; datasets' cache lives in the session's temporary directory."""
    import os

    saved = {k: os.environ.get(k) for k in (*OFFLINE, "HF_DATASETS_CACHE")}
    os.environ.update(OFFLINE, HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("hf-datasets")))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def bpe_case(tmp_path_factory, data_cache):
    """The small model (HF source, imported checkpoint, export-hf output), the built-in tasks' directory and the
    generation prompts."""
    from megatron_minitron.data.tokenizer import HFTokenizer
    from megatron_minitron.evaluation.builtin import builtin_task_dir

    paths = models.build(tmp_path_factory.mktemp("bpe-case"))
    tokenizer = HFTokenizer(str(paths["ckpt"] / "tokenizer"))
    assert tokenizer.bos is None  # lm-eval's hf backend then uses EOS as the prefix token, as we do
    prompts_file = paths["hf"].parent / "prompts.json"
    prompts_file.write_text(json.dumps(models.prompts(tokenizer)))
    return {**paths, "tasks": builtin_task_dir(data_cache), "prompts": prompts_file}


@pytest.fixture(scope="session")
def hf_reference(bpe_case, tmp_path_factory):
    """lm-eval's `hf` backend (and transformers' generate) on the exported model, in a fresh interpreter."""
    out = tmp_path_factory.mktemp("hf-reference") / "hf.json"
    cmd = [sys.executable, str(REPO / "tests/evaluation/hf_reference.py"), str(bpe_case["exported"]),
           str(bpe_case["tasks"]), str(out), ",".join(models.TASKS), str(models.LIMIT), "4", str(bpe_case["prompts"])]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(**OFFLINE), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())
