"""Small file helpers shared by the data modules: atomic writes and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(final_path: str) -> Iterator[str]:
    """Yield a temporary path next to ``final_path``; rename it into place on success.

    The temporary file lives in the same directory, so the final ``os.replace`` is atomic:
    readers see either the old file, no file, or the complete new one -- never a partial one.
    On any exception the temporary file is removed and the exception propagates.
    """
    directory = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(directory, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(final_path)}.", suffix=".tmp"
    )
    os.close(handle)
    try:
        yield temp_path
        os.replace(temp_path, final_path)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)


def file_sha1(path: str) -> str:
    """Return the hex SHA-1 of the bytes of the file at ``path``."""
    digest = hashlib.sha1()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def text_sha1(*parts: str) -> str:
    """Return the hex SHA-1 of the given strings, each UTF-8 encoded and NUL-separated."""
    digest = hashlib.sha1()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()
