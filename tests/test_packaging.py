"""What users install: the wheel, built from this tree and installed (not editable) into a fresh virtual
environment with its declared dependencies, holds every package and runs every subcommand.

The editable install the test suite runs from finds any folder of the source tree, so it cannot see a
package that the wheel leaves out (`search/` once had no `__init__.py` and was missing from every wheel,
plain `pip install .` and the Docker image)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from megatron_minitron.cli import SUBCOMMANDS
from tests.conftest import REPO, child_env

PACKAGE = REPO / "megatron_minitron"
TORCH = "torch==2.13.0"  # the CPU build on local disk; the same pin scripts/setup.sh installs
OPTIONAL = {"megatron_minitron.demo.plots": "matplotlib", "megatron_minitron.evaluation.lm": "lm_eval"}
"""Modules that need an optional extra (`plot`, `eval`): in a base install they must fail on that import alone."""


def _source_packages() -> set[str]:
    """Every folder under megatron_minitron/ that holds Python files, as a dotted package name."""
    folders = {p.parent for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    return {".".join(f.relative_to(REPO).parts) for f in folders}


def _source_modules() -> set[str]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out)], capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("megatron_minitron-*.whl")
    return path


@pytest.fixture(scope="module")
def fresh_env(wheel, tmp_path_factory) -> Path:
    """A new virtual environment with the wheel and its install_requires (torch pinned to the CPU build)."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", TORCH,
                           str(wheel)], capture_output=True, text=True, timeout=900, env=child_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return venv


def test_every_folder_is_a_package_and_the_wheel_holds_it(wheel):
    missing_init = sorted(p for p in _source_packages() if not (REPO / p.replace(".", "/") / "__init__.py").exists())
    assert not missing_init, f"folders without __init__.py (find_packages skips them): {missing_init}"
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {n.removesuffix(".py").replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}
    assert _source_modules() <= in_wheel, f"modules missing from the wheel: {sorted(_source_modules() - in_wheel)}"


def test_the_installed_wheel_imports_every_module_and_answers_every_subcommand(fresh_env, tmp_path):
    # run outside the source tree, so nothing can come from it
    python = fresh_env / "bin" / "python"
    script = ("import importlib, json, sys\n"
              "files = {}\n"
              "for m in json.loads(sys.argv[1]):\n"
              "    try:\n"
              "        files[m] = importlib.import_module(m).__file__\n"
              "    except ModuleNotFoundError as e:\n"
              "        files[m] = 'missing ' + e.name\n"
              "print(json.dumps(files))\n")
    proc = subprocess.run([str(python), "-c", script, json.dumps(sorted(_source_modules()))], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = json.loads(proc.stdout.splitlines()[-1])
    for module, extra in OPTIONAL.items():
        assert files.pop(module) == f"missing {extra}", f"{module} needs more than its extra's {extra}"
    outside = {m: f for m, f in files.items() if not f.startswith(str(fresh_env))}
    assert not outside, f"modules not imported from the installed wheel: {outside}"
    minitron = fresh_env / "bin" / "minitron"
    for name in SUBCOMMANDS:
        proc = subprocess.run([str(minitron), name, "--help"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env=child_env())
        assert proc.returncode == 0 and f"usage: minitron {name}" in proc.stdout, (name, proc.stderr[-2000:])


def test_the_installed_wheel_runs_a_tiny_search(fresh_env, tiny_teacher, tiny_scores, data_cache, tmp_path):
    """End to end from the wheel: search imports plan, prune, distill, training, model, data and runtime."""
    out = tmp_path / "search"
    cmd = [str(fresh_env / "bin" / "minitron"), "search", "--load", str(tiny_teacher), "--scores", str(tiny_scores),
           "--out", str(out), "--cache-dir", str(data_cache), "--hidden", "48", "--ffn", "96", "--budget", "950k",
           "--tolerance", "0.1", "--train-iters", "2", "--seq-length", "32", "--micro-batch-size", "2",
           "--global-batch-size", "2", "--lr-warmup-iters", "1", "--eval-interval", "2", "--eval-iters", "1",
           "--log-interval", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=child_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "search.json").read_text())
    assert result["winner"] == "L4-h48-f96-H4-G2"
    assert result["candidates"][0]["val_lm_loss"] > 0
