"""`minitron prune` end to end in one process: targets from flags, export config and plan files, the
inspect printout, every bad input refused before anything is written, and a SIGKILL mid-way."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_minitron.cli import main
from megatron_minitron.config import preset
from megatron_minitron.importance.scores import save_scores
from megatron_minitron.model import checkpoint as ckpt
from megatron_minitron.model.integrity import fingerprint
from megatron_minitron.prune.slicing import slice_full
from tests.conftest import REPO
from tests.plan.conftest import scores_for

ARCH = preset("tiny", num_layers=4)


@pytest.fixture(scope="module")
def source(tmp_path_factory, single_rank_runtime):
    from megatron_minitron.model.build import build_model

    root = tmp_path_factory.mktemp("prune-cli")
    model = build_model(ARCH, single_rank_runtime)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tok = root / "tok.model"
    tok.write_bytes(b"tokenizer")
    ckpt.save_checkpoint(root / "src", model=model, arch=ARCH, runtime=single_rank_runtime, iteration=2,
                         tokenizer={"kind": "sentencepiece", "path": str(tok)})
    scores = scores_for(ARCH, seed=3)
    save_scores(dataclasses.replace(scores, manifest=dataclasses.replace(  # scores of this very checkpoint
        scores.manifest, checkpoint_fingerprint=fingerprint(ckpt.resolve(root / "src").path))), root / "scores")
    save_scores(scores_for(ARCH.replace(hidden_size=128), seed=3), root / "other_scores")
    return root


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def prune(source, out, *extra) -> int:
    return main(["prune", "--load", str(source / "src"), "--save", str(out), *map(str, extra)])


def test_target_flags_then_plan_file_give_the_same_checkpoint(source, tmp_path, capsys):
    before = digest(source / "src")
    assert prune(source, tmp_path / "a", "--scores", source / "scores", "--target-ffn-hidden-size", 96,
                 "--target-num-layers", 2, "--target-hidden-size", 48, "--save-plan", tmp_path / "plan.json",
                 "--tp", 2) == 0
    out = capsys.readouterr().out
    assert "prune: wrote" in out and "MB/s" in out and "ffn_hidden_size" in out
    info = ckpt.resolve(tmp_path / "a")
    assert (info.arch.num_layers, info.arch.hidden_size, info.arch.ffn_hidden_size) == (2, 48, 96)
    assert info.metadata["provenance"]["scores"]["scores_dir"] == str(source / "scores")
    assert prune(source, tmp_path / "b", "--plan", tmp_path / "plan.json", "--workers", 2) == 0
    a, b = (ckpt.read_tensors(ckpt.resolve(tmp_path / x).path) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from megatron_minitron.plan import load_plan

    expected = slice_full(ckpt.read_tensors(ckpt.resolve(source / "src").path), load_plan(tmp_path / "plan.json"))
    assert expected.keys() == a.keys() and all(torch.equal(a[k], expected[k]) for k in a)
    assert digest(source / "src") == before
    assert main(["inspect", str(tmp_path / "a")]) == 0
    assert "pruning plan: source" in capsys.readouterr().out


def test_export_config_and_head_merge(source, tmp_path):
    config = tmp_path / "export.json"
    config.write_text(json.dumps({"num_attention_heads": 2, "num_query_groups": 2}))
    assert prune(source, tmp_path / "m", "--scores", source / "scores", "--export-config", config,
                 "--head-merge") == 0
    info = ckpt.resolve(tmp_path / "m")
    assert info.arch.num_attention_heads == 2 and info.metadata["plan"]["head_merge"]
    from megatron_minitron.plan.plan import Plan

    plan = Plan.from_json(info.metadata["plan"])
    heads = scores_for(ARCH, seed=3)["heads"]
    expected = slice_full(ckpt.read_tensors(ckpt.resolve(source / "src").path), plan, heads)
    got = ckpt.read_tensors(info.path)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def _corrupt(source: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(source / "src", copy / "src")
    release = ckpt.resolve(copy / "src").path
    if how == "missing shard":
        next(release.glob("*.distcp")).unlink()
    elif how == "truncated shard":
        shard = max(release.glob("*.distcp"), key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[:1000])
    elif how == "truncated metadata":
        meta = release / ".metadata"
        meta.write_bytes(meta.read_bytes()[:200])
    elif how == "corrupted metadata":
        (release / ".metadata").write_bytes(b"\x80\x04not a pickle at all" * 10)
    elif how == "no metadata":
        (release / ".metadata").unlink()
    return copy


BAD = {
    "missing shard": (None, "shard file __0_.\\.distcp is missing"),
    "truncated shard": (None, "__0_.\\.distcp is truncated"),
    "truncated metadata": (None, "\\.metadata is truncated or corrupted"),
    "corrupted metadata": (None, "\\.metadata is truncated or corrupted"),
    "no metadata": (None, "has no DCP metadata file"),
}


@pytest.mark.parametrize("how", sorted(BAD))
def test_damaged_source_is_refused_before_writing(source, tmp_path, capsys, how):
    copy = _corrupt(source, tmp_path, how)
    out = tmp_path / "out"
    assert prune(copy, out, "--scores", source / "scores", "--target-ffn-hidden-size", 96) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minitron prune: error: ")
    import re

    assert re.search(BAD[how][1], err), err
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_bad_arguments_are_refused_before_writing(source, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "f").write_text("x")
    other = tmp_path / "other_plan.json"
    from megatron_minitron.plan import make_plan
    from megatron_minitron.plan.target import Target

    other_arch = ARCH.replace(ffn_hidden_size=256)
    make_plan(scores_for(other_arch), Target(ffn_hidden_size=128)).save(other)
    good = tmp_path / "good_plan.json"
    make_plan(scores_for(ARCH), Target(ffn_hidden_size=96)).save(good)
    cases = [
        (["--plan", good, "--save", tmp_path / "exists"], "already exists, is not empty and is not a checkpoint"),
        (["--plan", good, "--save", source / "src" / "inside"], "inside the source checkpoint"),
        (["--plan", good, "--save", source], "contains the source checkpoint"),
        (["--plan", good, "--workers", 0], "argument --workers: must be >= 1"),
        (["--plan", good, "--head-merge"], "--head-merge needs --scores"),
        (["--plan", other], "differen"),
        (["--scores", source / "other_scores", "--target-ffn-hidden-size", 96], "computed on architecture"),
        (["--scores", source / "scores", "--target-ffn-hidden-size", 0], "argument --target-ffn-hidden-size: must be"),
        (["--scores", source / "scores", "--target-hidden-size", 128], "hidden_size"),
        (["--scores", source / "scores", "--target-num-attention-heads", 2, "--tp", 4], "tensor-parallel|divid"),
        (["--target-ffn-hidden-size", 96], "--scores DIR is needed"),
        (["--scores", source / "scores"], "nothing to prune"),
    ]
    for extra, message in cases:
        args = ["prune", "--load", str(source / "src")]
        if "--save" not in extra:
            args += ["--save", str(tmp_path / "new")]
        try:
            status = main(args + [str(x) for x in extra])
        except SystemExit as parse_error:  # refused while the flags are parsed
            status = parse_error.code
        assert status == 2, extra
        err = capsys.readouterr().err
        import re

        assert re.search(message, err), (extra, err)
        assert not (tmp_path / "new").exists() and not (source / "src" / "inside").exists()
    assert (tmp_path / "exists" / "f").read_text() == "x"
    assert sorted(p.name for p in source.iterdir()) == ["other_scores", "scores", "src", "tok.model"]


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
from megatron_minitron.model import storage
from megatron_minitron.plan.plan import identity_plan
from megatron_minitron.model.checkpoint import resolve
from megatron_minitron.prune.rewrite import prune_checkpoint

write = storage.ChunkWriter.tensor
def slow(self, *a, **k):  # make the rewrite last long enough to be killed in the middle
    write(self, *a, **k)
    print("WROTE", flush=True)
    time.sleep(0.2)
storage.ChunkWriter.tensor = slow
prune_checkpoint({src!r}, identity_plan(resolve({src!r}).arch), {out!r}, chunk_bytes=1024)
"""


def test_sigkill_mid_way_leaves_source_intact_and_nothing_finished(source, tmp_path):
    src, out = source / "src", tmp_path / "killed"
    before = digest(src)
    script = KILL_SCRIPT.format(repo=str(REPO), src=str(src), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seen = 0
    deadline = time.monotonic() + 120
    while seen < 3 and time.monotonic() < deadline:
        if proc.stdout.readline().startswith("WROTE"):
            seen += 1
    assert seen == 3, "the pruner never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert digest(src) == before
    assert not out.exists()
    partial = tmp_path / ".killed.partial"
    assert partial.exists()  # what was left is the partial directory, which is no checkpoint
    with pytest.raises(ckpt.CheckpointError):
        ckpt.resolve(partial)
    # a rerun replaces the leftover and finishes
    from megatron_minitron.plan.plan import identity_plan
    from megatron_minitron.prune.rewrite import prune_checkpoint

    prune_checkpoint(src, identity_plan(ARCH), out, print_fn=lambda s: None)
    assert not partial.exists() and ckpt.resolve(out).arch == ARCH.explicit()


def test_reader_finds_rows_inside_stored_archives(source, tmp_path):
    """Both megatron's archives and ours (no CRC) are read by row ranges, never whole (the fast path)."""
    from megatron_minitron.plan.plan import identity_plan
    from megatron_minitron.prune.rewrite import prune_checkpoint
    from megatron_minitron.model.storage import SourceReader

    out = prune_checkpoint(source / "src", identity_plan(ARCH), tmp_path / "o", print_fn=lambda s: None)
    for path in (ckpt.resolve(source / "src").path, out):
        full = ckpt.read_tensors(path)
        reader = SourceReader(path)
        rows = reader.read_rows("decoder.layers.mlp.linear_fc1.weight", 2, 150, 250)  # spans the gate/up chunks
        assert torch.equal(rows, full["decoder.layers.mlp.linear_fc1.weight"][2, 150:250])
        assert torch.equal(reader.read_rows("embedding.word_embeddings.weight", None, 7, 9),
                           full["embedding.word_embeddings.weight"][7:9])
        assert reader._layouts and all(layout is not None for layout in reader._layouts.values())
        reader.close()


def test_reader_selects_rows_from_the_mapped_file_without_writing_to_it(source, tmp_path):
    """read_rows(index=...) equals slicing the loaded tensor, through each path: a mapped view
    (aligned), a byte-row gather (any alignment), a copy (rows across the GLU halves' chunks), and
    with reused scratch buffers; writing into a result leaves the file unchanged."""
    from megatron_minitron.plan.plan import identity_plan
    from megatron_minitron.prune.rewrite import prune_checkpoint
    from megatron_minitron.model.storage import Scratch
    from megatron_minitron.model.storage import SourceReader

    out = prune_checkpoint(source / "src", identity_plan(ARCH), tmp_path / "o", print_fn=lambda s: None)
    index = torch.tensor([0, 3, 4, 40, 99])
    for path in (ckpt.resolve(source / "src").path, out):
        full = ckpt.read_tensors(path)
        before = {p.name: p.read_bytes() for p in path.glob("*.distcp")}
        reader = SourceReader(path)
        fc1 = full["decoder.layers.mlp.linear_fc1.weight"][1]
        for scratch in (None, Scratch()):
            for r0 in (0, 150):  # inside the gate half; across the gate and up halves
                got = reader.read_rows("decoder.layers.mlp.linear_fc1.weight", 1, r0, r0 + 100, index=index,
                                       scratch=scratch)
                assert torch.equal(got, fc1[r0:r0 + 100][index])
                got.fill_(7.0)
            rows = reader.read_rows("embedding.word_embeddings.weight", None, 5, 105)
            assert torch.equal(rows, full["embedding.word_embeddings.weight"][5:105])
            rows.fill_(7.0)  # a copy-on-write page, never the file
        misaligned = [layout for layout in reader._layouts.values() if layout.data_offset % 4]
        assert misaligned if path != out else not misaligned  # DCP's archives start anywhere, ours aligned
        reader.close()
        assert {p.name: p.read_bytes() for p in path.glob("*.distcp")} == before


def test_non_finite_weights_are_refused_naming_tensor_and_file(tmp_path, single_rank_runtime, capsys):
    """A NaN in a stored weight: prune and export-hf stop with the tensor's name and file, write nothing."""
    from megatron_minitron.model.build import build_model
    from megatron_minitron.plan import make_plan
    from megatron_minitron.plan.target import Target

    model = build_model(ARCH, single_rank_runtime)
    with torch.no_grad():
        model.embedding.word_embeddings.weight[3, 5] = float("nan")
    ckpt.save_checkpoint(tmp_path / "src", model=model, arch=ARCH, runtime=single_rank_runtime, iteration=1)
    make_plan(scores_for(ARCH), Target(ffn_hidden_size=96)).save(tmp_path / "plan.json")
    before = digest(tmp_path / "src")
    for argv in (["prune", "--load", str(tmp_path / "src"), "--plan", str(tmp_path / "plan.json"),
                  "--save", str(tmp_path / "out")],
                 ["export-hf", "--load", str(tmp_path / "src"), "--save", str(tmp_path / "out")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert "'embedding.word_embeddings.weight' holds NaN or infinite values" in err and "__0_0.distcp" in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "src"]
    assert digest(tmp_path / "src") == before
