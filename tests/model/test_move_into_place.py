"""How every offline writer finishes: it writes beside the output, then renames the finished directory into place."""

from __future__ import annotations

import pytest

from megatron_minitron.hf.files import HFError
from megatron_minitron.model.checkpoint import move_into_place


def _partial(tmp_path, text="new"):
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "weights").write_text(text)
    return partial


def test_new_and_empty_outputs_are_filled(tmp_path):
    out = tmp_path / "out"
    move_into_place(_partial(tmp_path), out, overwrite=False)
    assert (out / "weights").read_text() == "new"
    second = tmp_path / "second"
    second.mkdir()  # an empty directory the user made for the output
    move_into_place(_partial(tmp_path, "again"), second, overwrite=False)
    assert (second / "weights").read_text() == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "second"]


def test_an_output_that_appeared_meanwhile_is_kept_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "theirs").write_text("keep me")
    partial = _partial(tmp_path)
    with pytest.raises(HFError, match=f"output {out} appeared while writing"):
        move_into_place(partial, out, overwrite=False, error=HFError)
    assert (out / "theirs").read_text() == "keep me" and not (out / "weights").exists()
    assert (partial / "weights").is_file()  # the caller decides what becomes of it


def test_overwrite_replaces_and_leaves_nothing_aside(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    move_into_place(_partial(tmp_path), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_writing_moves_on_success_and_removes_on_failure(tmp_path):
    from megatron_minitron.model.checkpoint import writing

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        with writing(out, overwrite=False) as partial:
            (partial / "weights").write_text("half")
            raise RuntimeError("disk full")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written left behind
    with writing(out, overwrite=False) as partial:
        (partial / "weights").write_text("whole")
    assert (out / "weights").read_text() == "whole" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
