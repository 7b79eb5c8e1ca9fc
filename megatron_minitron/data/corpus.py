"""An embedded default text corpus: the CPython standard library's own documentation.

Every Python 3.11 installation ships two sources of real English prose that need no
download: the docstrings of the standard library's ``.py`` files, and the texts of
``pydoc_data.topics.topics`` (the language reference sections behind ``help("if")``).
This module turns them into a list of documents:

* files under ``sysconfig.get_paths()["stdlib"]`` are visited in sorted order, skipping
  test suites, IDLE, turtle demos and installed third-party packages (``_SKIPPED_DIRS``);
* module, class and function docstrings are read with ``ast`` (no module is imported);
* every text is cleaned with ``inspect.cleandoc``; texts shorter than ``MIN_CHARS`` are
  dropped and exact duplicates keep only their first occurrence.

The held-out validation split is chosen per document by a stable hash of its text
(SHA-1, never Python's salted ``hash()``), so it is the same on every run and machine
for the same Python build.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
import sysconfig
from collections.abc import Iterator

from megatron_minitron.data.files import atomic_path

CORPUS_FORMAT_VERSION = 1
"""Bumped whenever the extraction rules change, to invalidate caches keyed on the corpus."""

MIN_CHARS = 200
"""Documents shorter than this many characters (after cleaning) are dropped."""

VALID_PER_MILLE = 20
"""How many documents in a thousand go to the validation split (about 2%)."""

SPLITS = ("train", "valid")
"""The split names accepted by ``embedded_documents``."""

_SKIPPED_DIRS = frozenset(
    {
        "__pycache__",
        "dist-packages",
        "idlelib",
        "lib-dynload",
        "site-packages",
        "test",
        "tests",
        "turtledemo",
    }
)

_DOCUMENTED_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STATEMENT_LIST_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def stdlib_dir() -> str:
    """Return the directory of the running interpreter's standard library."""
    return sysconfig.get_paths()["stdlib"]


def _is_skipped_dir(name: str) -> bool:
    """Whether a directory below the stdlib root holds no documentation we want."""
    return name in _SKIPPED_DIRS or name.startswith("config-")


def _stdlib_python_files(root: str) -> Iterator[str]:
    """Yield the ``.py`` files below ``root`` in a deterministic (sorted) order."""
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(name for name in subdirs if not _is_skipped_dir(name))
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(directory, name)


def _docstrings_of_file(path: str) -> list[str]:
    """Return the raw module/class/function docstrings of one Python source file.

    Files that do not parse with this interpreter (a few stdlib files are deliberately
    invalid or Python-2 samples) contribute nothing.
    """
    with open(path, "rb") as stream:
        source = stream.read()
    try:
        tree = ast.parse(source, filename=path)
    except (SyntaxError, ValueError):
        return []
    docstrings = []
    for node in _documented_nodes(tree):
        text = ast.get_docstring(node, clean=False)
        if text:
            docstrings.append(text)
    return docstrings


def _documented_nodes(tree: ast.Module) -> Iterator[ast.AST]:
    """Yield the module, class and function nodes of ``tree`` in source (pre-)order.

    Only statement lists are descended into, which is several times faster than
    ``ast.walk`` and finds the same nodes: a docstring-bearing definition is always a
    statement.
    """
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOCUMENTED_NODES):
            yield node
        for field in _STATEMENT_LIST_FIELDS:
            children = getattr(node, field, None)
            if isinstance(children, list):
                stack.extend(reversed(children))


def _pydoc_topic_texts() -> list[str]:
    """Return the texts of ``pydoc_data.topics.topics`` sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _raw_texts() -> Iterator[str]:
    """Yield every candidate text, stdlib docstrings first, then pydoc topics."""
    for path in _stdlib_python_files(stdlib_dir()):
        yield from _docstrings_of_file(path)
    yield from _pydoc_topic_texts()


@functools.lru_cache(maxsize=1)
def _all_documents() -> tuple[str, ...]:
    """Parse, clean, filter and deduplicate the corpus once per process."""
    seen: set[str] = set()
    documents = []
    for raw in _raw_texts():
        text = inspect.cleandoc(raw)
        if len(text) >= MIN_CHARS and text not in seen:
            seen.add(text)
            documents.append(text)
    return tuple(documents)


def is_valid_document(text: str) -> bool:
    """Whether ``text`` belongs to the held-out validation split (stable SHA-1 bucket)."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < VALID_PER_MILLE


def _check_split(split: str) -> None:
    """Raise ValueError unless ``split`` is one of ``SPLITS``."""
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; use one of {', '.join(SPLITS)}")


def embedded_documents(split: str) -> list[str]:
    """Return the documents of the embedded corpus for ``split`` ("train" or "valid").

    The two splits are disjoint and their order is deterministic. The parse is cached
    in memory, so only the first call pays for it; each call returns a fresh list.
    """
    _check_split(split)
    want_valid = split == "valid"
    return [text for text in _all_documents() if is_valid_document(text) == want_valid]


@functools.lru_cache(maxsize=1)
def corpus_fingerprint() -> str:
    """Return a hex SHA-1 that changes whenever the embedded corpus could change.

    It hashes the inputs (every selected stdlib file's path and bytes, the pydoc topics)
    and this module's selection rules, not the parsed documents, so it costs a quick
    read of the files (tens of milliseconds) instead of a full parse. Use it as a cache
    key for anything derived from the corpus.
    """
    digest = hashlib.sha1()
    rules = [CORPUS_FORMAT_VERSION, MIN_CHARS, VALID_PER_MILLE, sorted(_SKIPPED_DIRS)]
    digest.update(json.dumps(rules).encode("utf-8"))
    root = stdlib_dir()
    for path in _stdlib_python_files(root):
        digest.update(os.path.relpath(path, root).encode("utf-8") + b"\0")
        with open(path, "rb") as stream:
            digest.update(stream.read())
    for text in _pydoc_topic_texts():
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def write_embedded_jsonl(path: str, split: str) -> int:
    """Write ``split`` to ``path`` as JSON lines ``{"text": ...}``; return the document count.

    The file is written under a temporary name and renamed, so it is either absent or
    complete.
    """
    documents = embedded_documents(split)
    with atomic_path(os.fspath(path)) as temp_path, open(temp_path, "w", encoding="utf-8") as out:
        for text in documents:
            out.write(json.dumps({"text": text}, ensure_ascii=False))
            out.write("\n")
    return len(documents)
