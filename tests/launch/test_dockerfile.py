"""The Dockerfile, read as text (no Docker engine here): a pinned NVIDIA PyTorch base, megatron-core
pinned to the version the CPU runtime patches, only pinned installs, one install layer, the `minitron`
entrypoint, and a .dockerignore that keeps runs, caches and site settings out of the image."""

from __future__ import annotations

import re
import shlex

from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    text = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#"))
    text = re.sub(r"\\\n", " ", text)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def _pip_installs(run: str) -> list[list[str]]:
    """The arguments of each `pip install` in a RUN command."""
    installs, command = [], []
    for word in shlex.split(run) + ["&&"]:
        if word not in ("&&", "||", ";"):
            command.append(word)
            continue
        if "pip" in command and "install" in command:
            installs.append(command[command.index("install") + 1:])
        command = []
    return installs


def test_base_image_is_a_pinned_nvidia_pytorch_tag():
    froms = [args for name, args in _instructions() if name == "FROM"]
    assert len(froms) == 1
    match = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3", froms[0].strip())
    assert match, f"base image {froms[0]!r} is not a pinned nvcr.io/nvidia/pytorch:YY.MM-py3 tag"
    assert "latest" not in froms[0]
    comment = DOCKERFILE.read_text().split("FROM")[0]
    assert f"{match.group(1)}.{match.group(2)}-py3" in comment, "say in a comment which base and why"


def test_one_install_layer_with_pinned_requirements_only():
    runs = [args for name, args in _instructions() if name == "RUN"]
    installing = [run for run in runs if _pip_installs(run)]
    assert len(installing) == 1, "the package and its pins are installed in one layer"
    requirements = []
    for args in _pip_installs(installing[0]):
        assert "--no-deps" in args, f"pip install {' '.join(args)}: without --no-deps pip may pull unpinned packages"
        for word in args:
            if word.startswith("-"):
                continue
            assert not re.search(r"git\+|https?://|@", word), f"{word}: nothing from a git HEAD or a URL"
            if word == ".":
                continue
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][0-9A-Za-z.]*", word), f"{word} is not pinned with =="
            requirements.append(word)
    assert "megatron-core==0.16.1" in requirements
    assert not any(re.search(r"\b(apt-get|conda) install\b", run) for run in runs if run not in installing)


def test_megatron_pin_matches_setup_and_the_cpu_runtime():
    setup = (REPO / "setup.py").read_text()
    assert '"megatron-core==0.16.1"' in setup
    assert "0.16.1" in (REPO / "megatron_minitron" / "runtime" / "cpu.py").read_text()


def test_entrypoint_is_minitron():
    entrypoints = [args for name, args in _instructions() if name == "ENTRYPOINT"]
    assert entrypoints == ['["minitron"]']
    assert "minitron=megatron_minitron.cli:main" in (REPO / "setup.py").read_text()


def test_dockerignore_keeps_generated_and_site_files_out():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs", ".cache", "launch/site.env"} <= ignored
    needed = {"setup.py", "README.md", "megatron_minitron", "examples"}  # setup.py reads README.md
    assert not needed & ignored
