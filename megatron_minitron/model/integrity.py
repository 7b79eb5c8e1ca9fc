"""What a torch_dist checkpoint directory must hold, checksums of its files, and its content fingerprint.

Every checkpoint this project writes (training, prune, import-hf) records `checksums.json` beside its
tensors: the size and BLAKE3 digest of each file of the torch_dist directory (`.metadata`, the `*.distcp`
shards, `common.pt`, `metadata.json`). It is computed once, when the files are written: the shards
that prune and import-hf write are hashed as their bytes go out (model/storage.py's HashingFile, on a
helper thread beside the write), and only the small files are read back; a training save, whose shards
megatron's dist-checkpointing writes, is read back whole (from the page cache).

BLAKE3 because it is a cryptographic hash (a digest names the content) that one core computes at about
the speed the page cache takes writes (4.4 GB/s against SHA-256's 1.8 GB/s on the 2-core VM the
benchmarks run on), so hashing a shard no longer holds its write back. Checkpoints written before it
record SHA-256 (`"algorithm": "sha256"`): they are verified with SHA-256 and keep their fingerprints.

`fingerprint()` names a checkpoint by its content: the hash of that list of file checksums. It is
free for our checkpoints (the list is read, not recomputed), and a streamed hash of every file for
others (Megatron-LM's), which is exact and costs one read of the files; those are hashed with SHA-256,
as before BLAKE3, so no checkpoint's fingerprint changed with the algorithm (the same files therefore
have one fingerprint with a BLAKE3 checksums.json and another without it). Scores, logits caches and search
state record the fingerprint of the checkpoint they were computed from, so prune/search can refuse another
model's scores even when its architecture is the same (another seed, another step). Metadata sizes and
modification times would not do: a copy changes the times, and a retrained checkpoint can have the
same sizes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import blake3

CHECKSUMS = "checksums.json"
"""Written in the torch_dist directory, after every other file but minitron.json."""
ALGORITHM = "blake3"
"""What new checksums.json files record; each file's entry holds its digest under this name."""
HASHES = {"blake3": blake3.blake3, "sha256": hashlib.sha256}
"""Every algorithm a checksums.json may name: a constructor of a hashlib-like object (update, hexdigest)."""
FOREIGN_FINGERPRINT = "sha256"
"""What fingerprint() hashes the files of a checkpoint without checksums.json (Megatron-LM's) with:
SHA-256, as before BLAKE3, so that the scores, logits caches and search state recorded for such a teacher
still match it."""
_BLOCK = 1 << 24
_NOT_HASHED = ("minitron.json", CHECKSUMS)  # minitron.json describes the files (and names this one)


class IntegrityError(ValueError):
    """A checkpoint that is incomplete or whose files do not match their recorded checksums."""


def _files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.iterdir() if p.is_file() and p.name not in _NOT_HASHED
                  and not p.name.endswith((".tmp", ".partial")))


def file_digest(path: Path, algorithm: str = ALGORITHM) -> str:
    """Hex digest of one file with one of HASHES, read in 16 MiB blocks."""
    digest = HASHES[algorithm]()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def compute_checksums(ckpt: Path, algorithm: str = ALGORITHM) -> dict:
    """{"algorithm", "files": {name: {"size", algorithm}}} of every file of a torch_dist directory."""
    ckpt = Path(ckpt)
    return {"algorithm": algorithm,
            "files": {p.name: {"size": p.stat().st_size, algorithm: file_digest(p, algorithm)}
                      for p in _files(ckpt)}}


def write_checksums(ckpt: Path, known: Optional[dict] = None) -> dict:
    """Record the checksums (ALGORITHM) of a torch_dist directory that has just been written.

    known: {file name: {"size", ALGORITHM}} of files hashed while they were written (model/storage.py's
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
        files[path.name] = entry if entry is not None else {"size": size, ALGORITHM: file_digest(path)}
    missing = sorted(set(known) - set(files))
    if missing:
        raise IntegrityError(f"{ckpt / missing[0]} was written but is gone")
    sums = {"algorithm": ALGORITHM, "files": files}
    tmp = ckpt / (CHECKSUMS + ".tmp")
    tmp.write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")
    tmp.rename(ckpt / CHECKSUMS)
    return sums


def recorded_checksums(ckpt: Path) -> Optional[dict]:
    """The recorded checksums, None when the checkpoint has none (not written by this version).
    Those of earlier versions (SHA-256) are returned as they are: their "algorithm" says how to check them."""
    path = Path(ckpt) / CHECKSUMS
    if not path.is_file():
        return None
    try:
        sums = json.loads(path.read_text())
        algorithm = sums.get("algorithm") if isinstance(sums, dict) else None
        if not isinstance(algorithm, str) or not isinstance(sums.get("files"), dict):
            raise ValueError("expected an algorithm name and a files table")
        if algorithm in HASHES and not all(isinstance(e, dict) and isinstance(e.get("size"), int)
                                           and isinstance(e.get(algorithm), str) for e in sums["files"].values()):
            raise ValueError(f"expected a size and a {algorithm} digest for every file")
    except ValueError as error:
        raise IntegrityError(f"{path} is damaged ({error}); verify the checkpoint against a copy") from None
    if algorithm not in HASHES:
        raise IntegrityError(f"{path} records checksums made with {algorithm!r}, which this version of "
                             f"megatron-minitron does not know (it knows {', '.join(sorted(HASHES))}); "
                             f"a newer version wrote it or the file is damaged")
    return sums


def fingerprint(ckpt: Path) -> str:
    """Content fingerprint of a torch_dist directory (see the module docstring): SHA-256 of the sorted
    (name, size, digest) list, whichever algorithm made the digests, so a checkpoint keeps the fingerprint
    it was given when it was written."""
    sums = recorded_checksums(ckpt) or compute_checksums(ckpt, FOREIGN_FINGERPRINT)
    algorithm = sums["algorithm"]
    table = sorted((name, entry["size"], entry[algorithm]) for name, entry in sums["files"].items())
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
        elif file_digest(path, sums["algorithm"]) != entry[sums["algorithm"]]:
            problems.append(f"{path} does not match its checksum: its contents changed since it was written")
    extra = [p.name for p in _files(ckpt) if p.name not in sums["files"]]
    problems += [f"{ckpt / name} was not part of the checkpoint when it was written" for name in extra]
    return problems
