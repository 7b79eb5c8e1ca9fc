"""What a torch_dist checkpoint directory must hold, checksums of its files, and its content fingerprint.

Every checkpoint this project writes (training, prune, import-hf) records `checksums.json` beside its
tensors: the size and SHA-256 of each file of the torch_dist directory (`.metadata`, the `*.distcp`
shards, `common.pt`, `metadata.json`). It is computed once, when the files are written: the shards
that prune and import-hf write are hashed as their bytes go out (model/storage.py's HashingFile, on a
helper thread beside the write), and only the small files are read back; a training save, whose shards
megatron's dist-checkpointing writes, is read back whole (from the page cache; SHA-256 runs at
0.5-1 GB/s on one core).

`fingerprint()` names a checkpoint by its content: the hash of that list of file checksums. It is
free for our checkpoints (the list is read, not recomputed), and a streamed hash of every file for
others (Megatron-LM's), which is exact and costs one read of the files. Scores record the
fingerprint of the checkpoint they were computed from, so prune/search can refuse another model's
scores even when its architecture is the same (another seed, another step). Metadata sizes and
modification times would not do: a copy changes the times, and a retrained checkpoint can have the
same sizes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

CHECKSUMS = "checksums.json"
"""Written in the torch_dist directory, after every other file but minitron.json."""
ALGORITHM = "sha256"
_BLOCK = 1 << 24
_NOT_HASHED = ("minitron.json", CHECKSUMS)  # minitron.json describes the files (and names this one)


class IntegrityError(ValueError):
    """A checkpoint that is incomplete or whose files do not match their recorded checksums."""


def _files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.iterdir() if p.is_file() and p.name not in _NOT_HASHED
                  and not p.name.endswith((".tmp", ".partial")))


def file_sha256(path: Path) -> str:
    """SHA-256 of one file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def compute_checksums(ckpt: Path) -> dict:
    """{"algorithm", "files": {name: {"size", "sha256"}}} of every file of a torch_dist directory."""
    ckpt = Path(ckpt)
    return {"algorithm": ALGORITHM,
            "files": {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in _files(ckpt)}}


def write_checksums(ckpt: Path, known: Optional[dict] = None) -> dict:
    """Record the checksums of a torch_dist directory that has just been written.

    known: {file name: {"size", "sha256"}} of files hashed while they were written (model/storage.py's
    HashingFile: the tensor shards), taken as they are once the file's size agrees; every other file
    (`.metadata`, `common.pt`, `metadata.json`: small) is read back and hashed here. A checkpoint that
    megatron's dist-checkpointing wrote (training saves) has no such entries and is read back whole."""
    ckpt = Path(ckpt)
    known = known or {}
    files = {}
    for path in _files(ckpt):
        size = path.stat().st_size
        entry = known.get(path.name)
        if entry is not None and entry["size"] != size:
            raise IntegrityError(f"{path} has {size} bytes, {entry['size']} were written: another process "
                                 f"wrote to it")
        files[path.name] = entry if entry is not None else {"size": size, "sha256": file_sha256(path)}
    missing = sorted(set(known) - set(files))
    if missing:
        raise IntegrityError(f"{ckpt / missing[0]} was written but is gone")
    sums = {"algorithm": ALGORITHM, "files": files}
    tmp = ckpt / (CHECKSUMS + ".tmp")
    tmp.write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")
    tmp.rename(ckpt / CHECKSUMS)
    return sums


def recorded_checksums(ckpt: Path) -> Optional[dict]:
    """The recorded checksums, None when the checkpoint has none (not written by this version)."""
    path = Path(ckpt) / CHECKSUMS
    if not path.is_file():
        return None
    try:
        sums = json.loads(path.read_text())
        if sums.get("algorithm") != ALGORITHM or not isinstance(sums.get("files"), dict):
            raise ValueError(f"expected algorithm {ALGORITHM!r} and a files table")
    except ValueError as error:
        raise IntegrityError(f"{path} is damaged ({error}); verify the checkpoint against a copy") from None
    return sums


def fingerprint(ckpt: Path) -> str:
    """Content fingerprint of a torch_dist directory (see the module docstring)."""
    sums = recorded_checksums(ckpt) or compute_checksums(ckpt)
    table = sorted((name, entry["size"], entry["sha256"]) for name, entry in sums["files"].items())
    return hashlib.sha256(json.dumps(table).encode()).hexdigest()[:32]


def check_complete(ckpt: Path) -> int:
    """Raise IntegrityError (naming the file) unless the directory holds everything a torch_dist
    checkpoint needs: megatron's metadata.json (valid JSON), a readable `.metadata`, `common.pt`, and
    every shard file the metadata points into, long enough. Returns the bytes of tensor data."""
    from megatron_minitron.prune.slicing import PruneError
    from megatron_minitron.model.storage import check_storage_files, read_dcp_metadata

    ckpt = Path(ckpt)
    for name in ("metadata.json", "common.pt"):
        if not (ckpt / name).is_file():
            raise IntegrityError(f"{ckpt / name} is missing: the checkpoint is incomplete")
    try:
        json.loads((ckpt / "metadata.json").read_text())
    except ValueError as error:
        raise IntegrityError(f"{ckpt / 'metadata.json'} is not valid JSON ({error})") from None
    try:
        return check_storage_files(ckpt, read_dcp_metadata(ckpt))
    except PruneError as error:
        raise IntegrityError(str(error)) from None


def verify(ckpt: Path) -> list[str]:
    """Problems found by re-hashing every file against checksums.json (empty when all match).
    Raises IntegrityError when there are no checksums to verify against."""
    ckpt = Path(ckpt)
    sums = recorded_checksums(ckpt)
    if sums is None:
        raise IntegrityError(f"{ckpt} has no {CHECKSUMS} (not written by this version of megatron-minitron); "
                             f"only its completeness can be checked")
    problems = []
    for name, entry in sorted(sums["files"].items()):
        path = ckpt / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, {entry['size']} were written")
        elif file_sha256(path) != entry["sha256"]:
            problems.append(f"{path} does not match its checksum: its contents changed since it was written")
    extra = [p.name for p in _files(ckpt) if p.name not in sums["files"]]
    problems += [f"{ckpt / name} was not part of the checkpoint when it was written" for name in extra]
    return problems
