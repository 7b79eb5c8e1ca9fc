"""A damaged or wrong file given to any subcommand: one line naming the file, exit status 2, before
any process starts, and nothing written or changed."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from megatron_minitron.cli import main


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _idx(sequences: int, documents: int, *, magic: bytes = b"MMIDIDX\x00\x00", code: int = 8) -> bytes:
    head = magic + struct.pack("<Q", 1) + struct.pack("<B", code) + struct.pack("<QQ", sequences, documents)
    sizes = struct.pack(f"<{sequences}i", *([4] * sequences))
    pointers = struct.pack(f"<{sequences}q", *(8 * i for i in range(sequences)))
    docs = struct.pack(f"<{documents}q", *range(documents))
    return head + sizes + pointers + docs


DATASETS = {  # name -> (.idx bytes, .bin bytes, what the message must say)
    "garbage idx": (b"\x13\x37" * 40, b"\x00" * 64, r"d\.idx is not a Megatron index file"),
    "truncated idx": (_idx(8, 9)[:-20], b"\x00" * 64, r"d\.idx is truncated"),
    "empty bin": (_idx(0, 1), b"", r"d\.bin holds no tokens"),
    "truncated bin": (_idx(8, 9), b"\x00" * 40, r"d\.bin has 40 bytes, its index needs 64"),
}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_a_damaged_indexed_dataset_is_named(tmp_path, capsys, name):
    import re

    idx, binary, message = DATASETS[name]
    (tmp_path / "d.idx").write_bytes(idx)
    (tmp_path / "d.bin").write_bytes(binary)
    before = digest(tmp_path)
    assert _pretrain(tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert digest(tmp_path) == before


def _pretrain(tmp_path: Path) -> int:
    return main(["pretrain", "--arch", "tiny", "--save", str(tmp_path / "run"), "--data-path", str(tmp_path / "d"),
                 "--cache-dir", str(tmp_path)])


def test_a_good_indexed_dataset_passes_the_check(tmp_path):
    from megatron_minitron.data.loader import check_indexed_dataset

    (tmp_path / "d.idx").write_bytes(_idx(8, 9))
    (tmp_path / "d.bin").write_bytes(b"\x00" * 64)
    assert check_indexed_dataset(str(tmp_path / "d")) == 32  # tokens


def test_invalid_architecture_json_is_named(tmp_path, capsys):
    arch = tmp_path / "arch.json"
    arch.write_text('{"num_layers": 2,')
    assert main(["pretrain", "--arch", str(arch), "--save", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--arch {arch}" in err and "not valid JSON" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arch.json"]


@pytest.mark.parametrize("name,content", [("tok.model", b"garbage, not a protobuf"),
                                          ("tokenizer.json", b'{"a": 1}'),
                                          ("bad.json", b"{not json")])
def test_a_file_that_is_not_a_tokenizer_is_named(tmp_path, capsys, name, content):
    tok = tmp_path / name
    tok.write_bytes(content)
    (tmp_path / "in.txt").write_text("hello world\n")
    assert main(["preprocess", "--input", str(tmp_path / "in.txt"), "--tokenizer", str(tok),
                 "--output-prefix", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tok) in err and "tokenizer" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "in.txt"])


def test_non_utf8_preprocess_input_is_named(tmp_path, capsys, data_cache):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert main(["preprocess", "--input", str(bad), "--cache-dir", str(data_cache),
                 "--output-prefix", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "UTF-8" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.txt"]
