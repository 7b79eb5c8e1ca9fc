"""Turn text files into a Megatron indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``).

The output is the format Megatron-LM's ``tools/preprocess_data.py`` writes and
``megatron.core.datasets.indexed_dataset.IndexedDataset`` reads: one sequence per document,
one document per sequence, tokens stored in the smallest dtype that fits the vocabulary.

Input formats, chosen by file extension:

* ``.jsonl`` -- one JSON object per line; the document is the string under ``json_key``.
  Blank lines are ignored.
* ``.txt``   -- plain UTF-8 text; documents are separated by one or more blank lines
  (lines holding only whitespace). A document's lines are kept verbatim, joined by "\\n".

Documents that are empty or whitespace-only are skipped (counted in the returned stats).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy
import torch
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megatron_minitron.data.files import atomic_path
from megatron_minitron.data.tokenizer import Tokenizer

SUPPORTED_EXTENSIONS = (".jsonl", ".txt")
"""Input file extensions ``preprocess`` understands."""

BATCH_DOCUMENTS = 256
"""Documents handed to the tokenizer per batch call."""

PROGRESS_INTERVAL_S = 5.0
"""Seconds between progress lines on stderr."""


def _jsonl_documents(path: str, json_key: str) -> Iterator[str]:
    """Yield the ``json_key`` string of each line of a JSON-lines file.

    Raises ValueError naming the file and 1-based line number for a line that is not a
    JSON object or whose ``json_key`` is missing or not a string.
    """
    with open(path, encoding="utf-8") as stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or json_key not in record:
                raise ValueError(
                    f"{path}:{line_number}: expected a JSON object with key {json_key!r}; "
                    "pass json_key=... to read another key"
                )
            text = record[json_key]
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}:{line_number}: value of {json_key!r} is "
                    f"{type(text).__name__}, expected a string"
                )
            yield text


def _txt_documents(path: str) -> Iterator[str]:
    """Yield the blank-line-separated documents of a plain text file."""
    lines: list[str] = []
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            line = line.rstrip("\r\n")
            if line.strip():
                lines.append(line)
            elif lines:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)


def iter_documents(path: str, json_key: str = "text") -> Iterator[str]:
    """Yield the documents of one input file according to its extension (see module doc); a file
    that is not UTF-8 is refused naming it."""
    documents = _jsonl_documents(path, json_key) if path.endswith(".jsonl") else _txt_documents(path)
    try:
        yield from documents
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); convert it to UTF-8, "
                         f"e.g. with iconv") from None


def _check_inputs(inputs: Sequence[str]) -> list[str]:
    """Validate the input file list; return it as a list of strings."""
    if isinstance(inputs, (str, bytes, os.PathLike)):
        raise TypeError(
            f"inputs must be a list of paths, got a single path {inputs!r}; wrap it in [...]"
        )
    paths = [os.fspath(path) for path in inputs]
    if not paths:
        raise ValueError("preprocess got no input files")
    for path in paths:
        if not path.endswith(SUPPORTED_EXTENSIONS):
            raise ValueError(
                f"input {path!r} has an unsupported extension; use one of "
                f"{', '.join(SUPPORTED_EXTENSIONS)}"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file {path!r} does not exist")
    return paths


def _check_output(out_prefix: str, overwrite: bool) -> None:
    """Refuse to replace an existing dataset unless ``overwrite`` is set."""
    for path in (get_bin_path(out_prefix), get_idx_path(out_prefix)):
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(
                f"output {path!r} already exists; pass overwrite=True to replace it"
            )


def _count_documents(paths: Sequence[str], json_key: str) -> int:
    """Read every input once to validate it; return the number of non-blank documents."""
    count = 0
    for path in paths:
        count += sum(1 for text in iter_documents(path, json_key) if text.strip())
    return count


def _all_documents(paths: Sequence[str], json_key: str) -> Iterator[str]:
    """Yield every non-blank document of every input, in order."""
    for path in paths:
        for text in iter_documents(path, json_key):
            if text.strip():
                yield text


def _batches(documents: Iterator[str], size: int) -> Iterator[list[str]]:
    """Group ``documents`` into lists of at most ``size``."""
    batch: list[str] = []
    for text in documents:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Progress:
    """Prints ``docs done/total, tokens, tokens/s`` to stderr at most every interval."""

    def __init__(self, total_documents: int, interval_s: float) -> None:
        self.total = total_documents
        self.interval_s = interval_s
        self.start = time.monotonic()
        self.last = self.start
        self.printed = False

    def update(self, documents: int, tokens: int, final: bool = False) -> None:
        """Print a line if the interval elapsed (or, when ``final``, if any line was printed)."""
        now = time.monotonic()
        if not (now - self.last >= self.interval_s or (final and self.printed)):
            return
        self.last = now
        self.printed = True
        rate = tokens / max(now - self.start, 1e-9)
        print(
            f"preprocess: {documents}/{self.total} documents, {tokens} tokens, "
            f"{rate:,.0f} tokens/s",
            file=sys.stderr,
            flush=True,
        )


def _write_dataset(
    paths: Sequence[str],
    tokenizer: Tokenizer,
    bin_path: str,
    idx_path: str,
    dtype: type[numpy.number],
    json_key: str,
    append_eod: bool,
    progress: _Progress,
) -> tuple[int, int]:
    """Tokenize every document into ``bin_path``/``idx_path``; return (documents, tokens)."""
    builder = IndexedDatasetBuilder(bin_path, dtype=dtype)
    documents = tokens = 0
    for batch in _batches(_all_documents(paths, json_key), BATCH_DOCUMENTS):
        for ids in tokenizer.tokenize_batch(batch):
            if append_eod:
                ids = [*ids, tokenizer.eod]
            builder.add_item(torch.as_tensor(numpy.asarray(ids, dtype=numpy.int64)))
            builder.end_document()
            documents += 1
            tokens += len(ids)
        progress.update(documents, tokens)
    builder.finalize(idx_path)
    return documents, tokens


def preprocess(
    inputs: Sequence[str],
    tokenizer: Tokenizer,
    out_prefix: str,
    *,
    json_key: str = "text",
    append_eod: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into the indexed dataset ``<out_prefix>.bin`` / ``<out_prefix>.idx``.

    Every non-blank document becomes one sequence (followed by ``tokenizer.eod`` when
    ``append_eod``) and one document boundary. All inputs are read and validated before any
    tokenization; errors name the offending file (and line, for JSON lines). Both files are
    written under temporary names and renamed at the end -- ``.idx`` last, after removing a
    stale one -- so an interrupted run never leaves a pair that looks complete.

    Returns a dict: ``documents`` and ``tokens`` written (EODs included), ``dtype`` (numpy
    dtype name of the stored tokens), ``bin_path`` and ``idx_path``.
    Progress is printed to stderr every few seconds for long runs.
    """
    paths = _check_inputs(inputs)
    out_prefix = os.fspath(out_prefix)
    _check_output(out_prefix, overwrite)
    total_documents = _count_documents(paths, json_key)
    if total_documents == 0:
        raise ValueError(f"inputs {paths} contain no non-blank documents")
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    bin_path, idx_path = get_bin_path(out_prefix), get_idx_path(out_prefix)
    progress = _Progress(total_documents, PROGRESS_INTERVAL_S)
    # Exiting the inner context renames the .bin, then the outer one renames the .idx.
    with atomic_path(idx_path) as temp_idx, atomic_path(bin_path) as temp_bin:
        documents, tokens = _write_dataset(
            paths, tokenizer, temp_bin, temp_idx, dtype, json_key, append_eod, progress
        )
        if os.path.exists(idx_path):
            os.remove(idx_path)
    progress.update(documents, tokens, final=True)
    return {
        "documents": documents,
        "tokens": tokens,
        "dtype": numpy.dtype(dtype).name,
        "bin_path": bin_path,
        "idx_path": idx_path,
    }
