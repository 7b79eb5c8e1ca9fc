"""Shared fixtures for the data-layer tests: a small SentencePiece model and synthetic datasets."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import numpy
import pytest
import torch

SMALL_VOCAB = 600
"""Vocabulary size of the session's small SentencePiece model."""

SMALL_TRAIN_DOCS = 400
"""Number of embedded-corpus train documents the small model is trained on."""


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small byte-fallback SentencePiece model trained once per test session."""
    from megatron_minitron.data.corpus import embedded_documents
    from megatron_minitron.data.tokenizer import train_sentencepiece

    texts = embedded_documents("train")[:SMALL_TRAIN_DOCS]
    out_prefix = tmp_path_factory.mktemp("sp") / "small"
    return train_sentencepiece(texts, SMALL_VOCAB, str(out_prefix))


@pytest.fixture(scope="session")
def sp_tokenizer(sp_model_path: str):
    """The session's small SentencePiece model, opened."""
    from megatron_minitron.data.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(sp_model_path)


@pytest.fixture(scope="session")
def id_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A stand-in tokenizer for synthetic token ids: vocab 4096, eod 1, pad 4095."""
    from megatron_minitron.data.tokenizer import Tokenizer

    class IdTokenizer(Tokenizer):
        """Tokens are whitespace-separated integers; only the special ids matter here."""

        def tokenize(self, text: str) -> list[int]:
            return [int(word) for word in text.split()]

        def detokenize(self, ids: Iterable[int]) -> str:
            return " ".join(str(int(i)) for i in ids)

        @property
        def vocab_size(self) -> int:
            return 4096

        @property
        def vocab(self) -> dict[str, int]:
            return {str(i): i for i in range(4096)}

        @property
        def eod(self) -> int:
            return 1

        @property
        def pad(self) -> int:
            return 4095

    marker = tmp_path_factory.mktemp("idtok") / "id-tokenizer.txt"
    marker.write_text("synthetic id tokenizer\n")
    return IdTokenizer(str(marker))


@pytest.fixture
def write_indexed() -> Callable[[str, Sequence[Sequence[int]]], str]:
    """Return a function writing documents of token ids as an indexed dataset at a prefix."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    def write(prefix: str, documents: Sequence[Sequence[int]]) -> str:
        builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
        for document in documents:
            builder.add_item(torch.tensor(list(document), dtype=torch.int64))
            builder.end_document()
        builder.finalize(f"{prefix}.idx")
        return os.fspath(prefix)

    return write
