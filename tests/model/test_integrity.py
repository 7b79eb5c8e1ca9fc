"""Checkpoints carry checksums; `inspect` checks completeness (and, with --verify, content); scores
are refused for another checkpoint of the same architecture."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import blake3
import pytest

from megatron_minitron.cli import main
from megatron_minitron.model import checkpoint as ckpt
from megatron_minitron.model.integrity import (CHECKSUMS, IntegrityError, compute_checksums, fingerprint, verify,
                                               write_checksums)


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


def _hashed_files(release: Path) -> list[Path]:
    return sorted(p for p in release.iterdir() if p.name not in ("minitron.json", CHECKSUMS))


def _old_fingerprint(table: list) -> str:
    """fingerprint() as every version computed it: SHA-256 of the sorted (name, size, digest) list."""
    return hashlib.sha256(json.dumps(sorted(table)).encode()).hexdigest()[:32]


def test_written_checkpoint_records_checksums_that_inspect_verifies(copy, capsys):
    release = ckpt.resolve(copy).path
    recorded = json.loads((release / CHECKSUMS).read_text())
    assert recorded == {"algorithm": "blake3",
                        "files": {p.name: {"size": p.stat().st_size, "blake3": blake3.blake3(p.read_bytes()).hexdigest()}
                                  for p in _hashed_files(release)}}
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


def test_fingerprint_is_content_and_without_checksums_is_the_sha256_one(copy):
    """A checkpoint without checksums.json (Megatron-LM's) is hashed on demand with SHA-256, as before
    BLAKE3, so the fingerprints that logits caches and scores recorded for such a teacher still match."""
    release = ckpt.resolve(copy).path
    recorded = fingerprint(release)
    assert recorded == _old_fingerprint([(name, e["size"], e["blake3"]) for name, e in
                                         json.loads((release / CHECKSUMS).read_text())["files"].items()])
    (release / CHECKSUMS).unlink()
    foreign = fingerprint(release)
    assert foreign == _old_fingerprint([(p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
                                        for p in _hashed_files(release)])
    _flip_weight_byte(release)
    assert fingerprint(release) != foreign
    write_checksums(release)
    assert fingerprint(release) != recorded


def test_a_checkpoint_with_sha256_checksums_verifies_and_keeps_its_fingerprint(copy, capsys):
    """checksums.json as earlier versions wrote it, made here with hashlib."""
    release = ckpt.resolve(copy).path
    files = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in _hashed_files(release)}
    (release / CHECKSUMS).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1, sort_keys=True))
    assert fingerprint(release) == _old_fingerprint([(name, e["size"], e["sha256"]) for name, e in files.items()])
    assert verify(release) == []
    assert main(["inspect", str(copy), "--verify"]) == 0
    assert "every file matches its checksum" in capsys.readouterr().out
    shard = _flip_weight_byte(release)
    assert verify(release) == [f"{shard} does not match its checksum: its contents changed since it was written"]
    assert main(["inspect", str(copy), "--verify"]) == 2
    assert str(shard) in capsys.readouterr().err


def test_checksums_of_an_unknown_algorithm_are_refused_naming_it(copy, capsys):
    release = ckpt.resolve(copy).path
    recorded = json.loads((release / CHECKSUMS).read_text())
    files = {name: {"size": e["size"], "md5": "0" * 32} for name, e in recorded["files"].items()}
    (release / CHECKSUMS).write_text(json.dumps({"algorithm": "md5", "files": files}))
    for check in (verify, fingerprint):
        with pytest.raises(IntegrityError, match=f"{release / CHECKSUMS} records checksums made with 'md5'"):
            check(release)
    assert main(["inspect", str(copy), "--verify"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(release / CHECKSUMS) in err and "'md5'" in err, err


def test_checksums_without_a_digest_for_a_file_are_called_damaged(copy):
    release = ckpt.resolve(copy).path
    recorded = json.loads((release / CHECKSUMS).read_text())
    recorded["files"]["common.pt"] = {"size": recorded["files"]["common.pt"]["size"]}
    (release / CHECKSUMS).write_text(json.dumps(recorded))
    with pytest.raises(IntegrityError, match=f"{release / CHECKSUMS} is damaged \\(expected a size and a blake3 "
                                             f"digest for every file\\)"):
        verify(release)


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
