"""Checkpoints carry checksums; `inspect` checks completeness (and, with --verify, content); scores
are refused for another checkpoint of the same architecture."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from megatron_minitron.cli import main
from megatron_minitron.model import checkpoint as ckpt
from megatron_minitron.model.integrity import CHECKSUMS, compute_checksums, fingerprint, write_checksums


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _flip_weight_byte(release: Path) -> Path:
    """Change the low mantissa byte of one float in the largest shard (a finite, different weight)."""
    shard = max(release.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    offset = (len(data) // 2) & ~63  # torch aligns tensor data to 64 bytes: a float's lowest byte
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))
    return shard


@pytest.fixture
def copy(tiny_teacher, tmp_path):
    shutil.copytree(tiny_teacher, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_written_checkpoint_records_checksums_that_inspect_verifies(copy, capsys):
    release = ckpt.resolve(copy).path
    recorded = json.loads((release / CHECKSUMS).read_text())
    assert recorded == compute_checksums(release)
    assert {"common.pt", ".metadata", "metadata.json"} <= set(recorded["files"])
    assert main(["inspect", str(copy), "--verify"]) == 0
    assert "every file matches its checksum" in capsys.readouterr().out
    shard = _flip_weight_byte(release)
    assert main(["inspect", str(copy)]) == 0  # complete: sizes are right, contents are not read
    capsys.readouterr()
    assert main(["inspect", str(copy), "--verify"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(shard) in err and "does not match its checksum" in err


@pytest.mark.parametrize("how,message", [
    ("no common.pt", "common.pt is missing"),
    ("no shard", r"shard file __0_0\.distcp is missing"),
    ("truncated shard", "is truncated"),
    ("garbage .metadata", r"\.metadata is truncated or corrupted"),
    ("garbage minitron.json", "minitron.json is not valid JSON"),
    ("no architecture", "minitron.json holds no 'architecture'"),
    ("garbage metadata.json", "metadata.json is not valid JSON"),
])
def test_inspect_reports_an_incomplete_or_damaged_checkpoint(copy, capsys, how, message):
    import re

    release = ckpt.resolve(copy).path
    shard = max(release.glob("*.distcp"), key=lambda p: p.stat().st_size)
    if how == "no common.pt":
        (release / "common.pt").unlink()
    elif how == "no shard":
        (release / "__0_0.distcp").unlink()
    elif how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:5000])
    elif how == "garbage .metadata":
        (release / ".metadata").write_bytes(b"\x80\x04garbage" * 20)
    elif how == "garbage minitron.json":
        (release / "minitron.json").write_text('{"format": "megatron-minitron/1", "architecture": {')
    elif how == "no architecture":
        (release / "minitron.json").write_text('{"format": "megatron-minitron/1"}')
    elif how == "garbage metadata.json":
        (release / "metadata.json").write_text("{not json")
    before = digest(copy)
    assert main(["inspect", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minitron inspect: error: "), err
    assert re.search(message, err), err
    assert digest(copy) == before


def test_fingerprint_is_content_not_the_recorded_file(copy):
    release = ckpt.resolve(copy).path
    recorded = fingerprint(release)
    (release / CHECKSUMS).unlink()  # a checkpoint without checksums (Megatron-LM's) is hashed on demand
    assert fingerprint(release) == recorded
    _flip_weight_byte(release)
    assert fingerprint(release) != recorded


def test_scores_of_another_checkpoint_are_refused(copy, tiny_scores, tmp_path, capsys):
    """Checkpoint B: tiny_teacher with one weight changed (same architecture, other weights)."""
    release = ckpt.resolve(copy).path
    _flip_weight_byte(release)
    write_checksums(release)
    before = digest(copy), digest(tiny_scores)
    out = tmp_path / "pruned"
    argv = ["prune", "--load", str(copy), "--scores", str(tiny_scores), "--target-ffn-hidden-size", "96",
            "--save", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--load {copy}" in err and "--allow-foreign-scores" in err, err
    assert not out.exists() and sorted(tmp_path.iterdir()) == [copy]
    assert (digest(copy), digest(tiny_scores)) == before
    assert main(argv + ["--allow-foreign-scores"]) == 0
    assert "warning: these scores were computed on checkpoint" in capsys.readouterr().err
    assert ckpt.resolve(out).arch.ffn_hidden_size == 96
    # search refuses them the same way, before any process starts
    assert main(["search", "--load", str(copy), "--scores", str(tiny_scores), "--budget", "1M",
                 "--out", str(tmp_path / "search")]) == 2
    assert "--allow-foreign-scores" in capsys.readouterr().err and not (tmp_path / "search").exists()


def test_every_reader_refuses_an_incomplete_checkpoint(copy, tmp_path, capsys):
    release = ckpt.resolve(copy).path
    (release / ".metadata").write_bytes((release / ".metadata").read_bytes()[:100])  # truncated
    before = digest(copy)
    c, out = str(copy), str(tmp_path / "out")
    for argv in (["importance", "--load", c, "--out", out], ["evaluate", "--load", c],
                 ["distill", "--teacher", c, "--student", c, "--save", out],
                 ["pretrain", "--init", c, "--save", out], ["export-hf", "--load", c, "--save", out]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{release / '.metadata'} is truncated or corrupted" in err, (argv, err)
        assert digest(copy) == before and not (tmp_path / "out").exists()
