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


def _case(root, data_cache, **config) -> dict:
    """A model (HF source, imported checkpoint, export-hf output), the built-in tasks' directory and the
    generation prompts."""
    from megatron_minitron.data.tokenizer import HFTokenizer
    from megatron_minitron.evaluation.builtin import builtin_task_dir

    paths = models.build(root, **config)
    tokenizer = HFTokenizer(str(paths["ckpt"] / "tokenizer"))
    assert tokenizer.bos is None  # lm-eval's hf backend then uses EOS as the prefix token, as we do
    prompts_file = paths["hf"].parent / "prompts.json"
    prompts_file.write_text(json.dumps(models.prompts(tokenizer)))
    return {**paths, "tasks": builtin_task_dir(data_cache), "prompts": prompts_file}


def _hf_reference(case: dict, out) -> dict:
    """lm-eval's `hf` backend (and transformers' generate) on the case's exported model, in a fresh interpreter."""
    cmd = [sys.executable, str(REPO / "tests/evaluation/hf_reference.py"), str(case["exported"]),
           str(case["tasks"]), str(out), ",".join(models.TASKS), str(models.LIMIT), "4", str(case["prompts"])]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(**OFFLINE), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def bpe_case(tmp_path_factory, data_cache):
    """The small Llama-style model."""
    return _case(tmp_path_factory.mktemp("bpe-case"), data_cache)


@pytest.fixture(scope="session")
def hf_reference(bpe_case, tmp_path_factory):
    return _hf_reference(bpe_case, tmp_path_factory.mktemp("hf-reference") / "hf.json")


@pytest.fixture(scope="session")
def moe_case(tmp_path_factory, data_cache):
    """The small Mixtral-family model (4 experts, top-2)."""
    return _case(tmp_path_factory.mktemp("moe-case"), data_cache, family="MixtralConfig", **models.MOE_CONFIG)


@pytest.fixture(scope="session")
def moe_hf_reference(moe_case, tmp_path_factory):
    return _hf_reference(moe_case, tmp_path_factory.mktemp("moe-hf-reference") / "hf.json")
