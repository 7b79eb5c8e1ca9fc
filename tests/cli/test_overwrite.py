"""--overwrite replaces only a previous output of the same kind: a directory of user files given as the
output of any subcommand is refused, and nothing in it is deleted or changed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from megatron_minitron.cli import main


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_no_subcommand_deletes_a_directory_of_user_files(tiny_teacher, tiny_scores, tmp_path, capsys):
    from megatron_minitron.model.checkpoint import resolve

    user = tmp_path / "thesis"
    (user / "chapters").mkdir(parents=True)
    (user / "chapters" / "one.tex").write_text("\\chapter{One}")
    (user / "notes.txt").write_text("do not lose")
    before = digest(user), digest(tiny_teacher), digest(tiny_scores)
    budget = str(int(resolve(tiny_teacher).arch.num_parameters() * 0.8))
    t, s, u = str(tiny_teacher), str(tiny_scores), str(user)
    commands = {
        "pretrain": ["pretrain", "--arch", "tiny", "--save", u, "--overwrite"],
        "distill": ["distill", "--teacher", t, "--student", t, "--save", u, "--overwrite"],
        "importance": ["importance", "--load", t, "--out", u, "--overwrite"],
        "prune": ["prune", "--load", t, "--scores", s, "--target-ffn-hidden-size", "96", "--save", u, "--overwrite"],
        "search": ["search", "--load", t, "--scores", s, "--budget", budget, "--out", u, "--overwrite"],
        "export-hf": ["export-hf", "--load", t, "--save", u, "--overwrite"],
        "demo": ["demo", "--teacher", t, "--out", u, "--tp", "1"],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"minitron {name}: error: ") and u in err, (name, err)
        assert (digest(user), digest(tiny_teacher), digest(tiny_scores)) == before, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]  # no partial output beside it


@pytest.mark.parametrize("argv", [["pretrain", "--arch", "tiny", "--save", "{file}"],
                                  ["pretrain", "--arch", "tiny", "--save", "{tmp}/new", "--cache-dir", "{file}"]])
def test_a_file_where_a_directory_is_expected(tmp_path, capsys, argv):
    afile = tmp_path / "a-file"
    afile.write_text("not a directory")
    assert main([a.format(file=afile, tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(afile) in err and "not a directory" in err, err
    assert afile.read_text() == "not a directory" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_a_read_only_run_directory_is_refused_before_training(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["pretrain", "--arch", "tiny", "--save", str(locked / "run")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(locked) in err and "not writable" in err, err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
