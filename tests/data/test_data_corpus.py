"""Tests of the embedded standard-library corpus."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import subprocess
import sys
from pydoc_data.topics import topics

import pytest

from megatron_minitron.data import corpus

_DIGEST_SCRIPT = """
import hashlib
from megatron_minitron.data.corpus import embedded_documents
for split in ("train", "valid"):
    digest = hashlib.sha1()
    for text in embedded_documents(split):
        digest.update(text.encode("utf-8") + b"\\0")
    print(split, digest.hexdigest())
"""


def _digest(documents: list[str]) -> str:
    digest = hashlib.sha1()
    for text in documents:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def test_splits_are_nonempty_disjoint_and_cover_the_corpus() -> None:
    train = corpus.embedded_documents("train")
    valid = corpus.embedded_documents("valid")
    assert len(train) > 1000
    assert len(valid) > 10
    assert not set(train) & set(valid)
    assert len(train) + len(valid) == len(corpus._all_documents())
    assert 0.005 < len(valid) / (len(train) + len(valid)) < 0.05


def test_documents_are_cleaned_long_and_unique() -> None:
    documents = corpus.embedded_documents("train") + corpus.embedded_documents("valid")
    assert len(set(documents)) == len(documents)
    assert min(map(len, documents)) >= corpus.MIN_CHARS
    # inspect.cleandoc output: no common indentation and no leading/trailing blank lines
    assert all(text == text.strip("\n") for text in documents)
    assert all(not text[0].isspace() for text in documents)


def test_corpus_contains_known_stdlib_docstring_and_pydoc_topic() -> None:
    documents = corpus.embedded_documents("train") + corpus.embedded_documents("valid")
    assert inspect.cleandoc(topics["assert"]) in documents
    assert inspect.cleandoc(json.__doc__) in documents  # the json package's module docstring


def test_split_membership_is_a_function_of_the_text() -> None:
    for text in corpus.embedded_documents("valid"):
        assert corpus.is_valid_document(text)
    for text in corpus.embedded_documents("train")[:200]:
        assert not corpus.is_valid_document(text)


def test_documents_are_identical_in_a_fresh_process_with_another_hash_seed() -> None:
    env = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run(
        [sys.executable, "-c", _DIGEST_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    expected = "".join(
        f"{split} {_digest(corpus.embedded_documents(split))}\n" for split in ("train", "valid")
    )
    assert result.stdout == expected


def test_embedded_documents_returns_a_fresh_list() -> None:
    first = corpus.embedded_documents("valid")
    first.clear()
    assert corpus.embedded_documents("valid")


def test_bad_split_is_named() -> None:
    with pytest.raises(ValueError, match="'test'"):
        corpus.embedded_documents("test")


def test_write_embedded_jsonl_round_trips(tmp_path) -> None:
    path = tmp_path / "valid.jsonl"
    count = corpus.write_embedded_jsonl(str(path), "valid")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert count == len(lines) == len(corpus.embedded_documents("valid"))
    assert [json.loads(line)["text"] for line in lines] == corpus.embedded_documents("valid")
    assert os.listdir(tmp_path) == ["valid.jsonl"]


def test_fingerprint_is_stable_hex() -> None:
    fingerprint = corpus.corpus_fingerprint()
    assert len(fingerprint) == 40 and int(fingerprint, 16) >= 0
    corpus.corpus_fingerprint.cache_clear()
    assert corpus.corpus_fingerprint() == fingerprint
