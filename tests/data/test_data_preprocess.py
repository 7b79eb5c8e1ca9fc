"""Tests of preprocess(): text files to Megatron indexed datasets."""

from __future__ import annotations

import json
import os

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_minitron.data.preprocess import preprocess

DOCUMENTS = [
    "The first document.\nIt has two lines.",
    "Second: ünïcödé ☃ and    spaces.",
    "def third():\n    return 3",
]


def _write_jsonl(path, texts, key="text") -> str:
    path.write_text("".join(json.dumps({key: text}) + "\n" for text in texts), encoding="utf-8")
    return str(path)


def _written(prefix: str) -> list[list[int]]:
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_jsonl_documents_are_stored_exactly_with_eod(tmp_path, sp_tokenizer) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", DOCUMENTS)
    stats = preprocess([source], sp_tokenizer, str(tmp_path / "out"))
    expected = [sp_tokenizer.tokenize(text) + [sp_tokenizer.eod] for text in DOCUMENTS]
    assert _written(str(tmp_path / "out")) == expected
    dataset = IndexedDataset(str(tmp_path / "out"))
    assert dataset.document_indices.tolist() == [0, 1, 2, 3]
    assert dataset.index.dtype == numpy.uint16
    assert stats["documents"] == 3
    assert stats["tokens"] == sum(map(len, expected))
    assert stats["dtype"] == "uint16"
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.bin", "out.idx"]


def test_txt_documents_are_separated_by_blank_lines(tmp_path, sp_tokenizer) -> None:
    source = tmp_path / "in.txt"
    source.write_text(
        "\n\n" + DOCUMENTS[0] + "\n\n  \n" + DOCUMENTS[1] + "\r\n\n" + DOCUMENTS[2],
        encoding="utf-8",
    )
    preprocess([str(source)], sp_tokenizer, str(tmp_path / "out"), append_eod=False)
    assert _written(str(tmp_path / "out")) == [sp_tokenizer.tokenize(text) for text in DOCUMENTS]


def test_several_inputs_concatenate_in_order_and_skip_blank_documents(
    tmp_path, sp_tokenizer
) -> None:
    first = _write_jsonl(tmp_path / "a.jsonl", [DOCUMENTS[0], "   ", ""], key="body")
    second = tmp_path / "b.txt"
    second.write_text(DOCUMENTS[2] + "\n", encoding="utf-8")
    stats = preprocess([first, str(second)], sp_tokenizer, str(tmp_path / "out"), json_key="body")
    assert stats["documents"] == 2
    assert _written(str(tmp_path / "out")) == [
        sp_tokenizer.tokenize(DOCUMENTS[0]) + [sp_tokenizer.eod],
        sp_tokenizer.tokenize(DOCUMENTS[2]) + [sp_tokenizer.eod],
    ]


def test_existing_output_needs_overwrite(tmp_path, sp_tokenizer) -> None:
    source = _write_jsonl(tmp_path / "in.jsonl", DOCUMENTS)
    prefix = str(tmp_path / "out")
    preprocess([source], sp_tokenizer, prefix)
    with pytest.raises(FileExistsError, match="out.bin.*overwrite=True"):
        preprocess([source], sp_tokenizer, prefix)
    _write_jsonl(tmp_path / "in.jsonl", DOCUMENTS[:1])
    stats = preprocess([source], sp_tokenizer, prefix, overwrite=True)
    assert stats["documents"] == 1
    assert len(_written(prefix)) == 1


def test_missing_input_is_named_and_nothing_is_written(tmp_path, sp_tokenizer) -> None:
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        preprocess([missing], sp_tokenizer, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_unknown_extension_is_named(tmp_path, sp_tokenizer) -> None:
    source = tmp_path / "data.csv"
    source.write_text("a,b\n")
    with pytest.raises(ValueError, match="data.csv"):
        preprocess([str(source)], sp_tokenizer, str(tmp_path / "out"))


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", r"bad.jsonl:3: not valid JSON"),
        ('{"title": "no text key"}', r"bad.jsonl:3: expected a JSON object with key 'text'"),
        ('["a list"]', r"bad.jsonl:3: expected a JSON object"),
        ('{"text": 42}', r"bad.jsonl:3: value of 'text' is int"),
    ],
)
def test_bad_jsonl_line_is_named_with_its_number(tmp_path, sp_tokenizer, bad_line, message) -> None:
    source = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "fine"})
    source.write_text(f"{good}\n{good}\n{bad_line}\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        preprocess([str(source)], sp_tokenizer, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_empty_input_is_rejected(tmp_path, sp_tokenizer) -> None:
    source = tmp_path / "empty.txt"
    source.write_text("\n   \n\n")
    with pytest.raises(ValueError, match="empty.txt.*no non-blank documents"):
        preprocess([str(source)], sp_tokenizer, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no input files"):
        preprocess([], sp_tokenizer, str(tmp_path / "out"))
    with pytest.raises(TypeError, match="single path"):
        preprocess(str(source), sp_tokenizer, str(tmp_path / "out"))


def test_progress_is_reported_on_stderr(tmp_path, sp_tokenizer, monkeypatch, capsys) -> None:
    from megatron_minitron.data import preprocess as module

    monkeypatch.setattr(module, "PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.setattr(module, "BATCH_DOCUMENTS", 2)
    source = _write_jsonl(tmp_path / "in.jsonl", DOCUMENTS * 2)
    preprocess([source], sp_tokenizer, str(tmp_path / "out"))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("preprocess: 2/6 documents")
    assert lines[-1].startswith("preprocess: 6/6 documents")
    assert "tokens/s" in lines[-1]
