"""Hugging Face model directories on disk: config, safetensors shards and their index, one tensor at a time.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (for every tensor its
dtype, shape and [begin, end) byte range after the header; "__metadata__" holds strings), then the
raw little-endian data. That is simple enough to read and write directly, which is what makes import
and export streaming:

- reads (`read_tensor`) allocate the tensor and `readinto` its bytes: nothing is memory-mapped, so
  resident memory is the tensors in flight, not the pages of every shard touched so far;
- writes (`ShardWriter`) put the header first, computed from the shapes the exporter plans, then
  append each tensor as it is produced.

Every check that can fail on a bad directory (no config, invalid JSON, no weights, an index naming a
file that is not there, a file shorter than its header says, a tensor the index places in the
wrong file) happens in `scan` before the caller writes anything, and names the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from megatron_minitron.config import ConfigError
from megatron_minitron.model.storage import all_finite, map_range

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
"""Files of a Hugging Face tokenizer that travel with the model (import keeps them, export copies them)."""

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class HFError(ConfigError):
    """A Hugging Face directory or option that cannot be imported or exported; names the file or field."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a safetensors file lies."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of the data in the file."""
    nbytes: int


@dataclass(frozen=True)
class HFDirectory:
    """A scanned Hugging Face model directory: its config and every stored tensor."""

    path: Path
    config: dict
    tensors: dict[str, TensorEntry]
    files: tuple[Path, ...]
    """The safetensors files holding the weights."""

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a file, with errors naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HFError(f"{path} does not exist ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HFError(f"{path} is not valid JSON ({what}): {error}") from None
    if not isinstance(data, dict):
        raise HFError(f"{path} holds a JSON {type(data).__name__}, expected an object ({what})")
    return data


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of one safetensors file; a missing, truncated or malformed file is an error naming it
    (safetensors' own message for a truncated file names no file)."""
    path = Path(path)
    if not path.is_file():
        raise HFError(f"weight file {path} is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HFError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise HFError(f"{path} is truncated or not a safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise HFError(f"{path} has a corrupted safetensors header: {error}") from None
    if not isinstance(header, dict):
        raise HFError(f"{path} has a corrupted safetensors header (not a JSON object)")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except KeyError as error:
            raise HFError(f"{path}: tensor {name!r} has an unsupported dtype or a malformed entry ({error})") from None
        except (TypeError, ValueError) as error:
            raise HFError(f"{path}: tensor {name!r} has a malformed entry ({error})") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * torch.empty((), dtype=dtype).element_size() or begin < 0:
            raise HFError(f"{path}: tensor {name!r} has byte range [{begin}, {end}) that does not match its "
                          f"shape {list(shape)} and dtype {info['dtype']}")
        if 8 + n + end > size:
            raise HFError(f"{path} is truncated: tensor {name!r} needs bytes up to {8 + n + end}, the file has {size}")
        entries[name] = TensorEntry(name=name, path=path, dtype=dtype, shape=shape, start=8 + n + begin,
                                    nbytes=end - begin)
    return entries


def scan(directory: str | os.PathLike) -> HFDirectory:
    """Config and tensor locations of a local Hugging Face model directory (no network, no tensor data read)."""
    root = Path(directory)
    if not root.is_dir():
        raise HFError(f"Hugging Face model directory {root} does not exist or is not a directory")
    if not (root / CONFIG).is_file():
        raise HFError(f"{root} has no {CONFIG}: not a Hugging Face model directory")
    config = read_json(root / CONFIG, "the model configuration")
    if (root / INDEX).is_file():
        index = read_json(root / INDEX, "the shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFError(f"{root / INDEX} has no 'weight_map' naming the shard of each tensor")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not isinstance(name, str) or Path(name).name != name:
                raise HFError(f"{root / INDEX} names {name!r}, which is not a file of this directory")
        missing = [name for name in files if not (root / name).is_file()]
        if missing:
            raise HFError(f"{root / INDEX} names shard file(s) {missing} that are not in {root}")
        headers = {name: read_header(root / name) for name in files}
        tensors = {}
        for tensor, name in weight_map.items():
            if tensor not in headers[name]:
                raise HFError(f"{root / INDEX} places tensor {tensor!r} in {name}, which does not hold it")
            tensors[tensor] = headers[name][tensor]
        for name, entries in headers.items():
            extra = sorted(set(entries) - set(weight_map))
            if extra:
                raise HFError(f"{root / name} holds tensor(s) {extra[:5]} that {INDEX} does not list")
        paths = tuple(root / name for name in files)
    elif (root / SINGLE).is_file():
        tensors = read_header(root / SINGLE)
        paths = (root / SINGLE,)
    else:
        others = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
        hint = f" (found {others}: convert them to safetensors first)" if others else ""
        raise HFError(f"{root} has neither {SINGLE} nor {INDEX}{hint}")
    return HFDirectory(path=root, config=config, tensors=tensors, files=paths)


class TensorReader:
    """Reads tensors, or row ranges of them, from open safetensors files (one handle per file).

    A range whose elements are aligned in the file comes back as a view of a private memory mapping
    (copy-on-write: writing to it never reaches the file), so a tensor written on unchanged costs one
    copy instead of two plus freshly zeroed pages; others are read with `readinto`."""

    def __init__(self) -> None:
        self._files: dict[Path, object] = {}
        self.bytes_read = 0

    def read(self, entry: TensorEntry, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """_read, refused when a value is NaN or infinite (checked as it passes), naming tensor and file."""
        out = self._read(entry, rows)
        if not all_finite(out):
            raise HFError(f"{entry.path}: tensor {entry.name!r} holds NaN or infinite values; the file is corrupted "
                          f"or the model diverged: nothing was written from it")
        return out

    def _read(self, entry: TensorEntry, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The whole tensor, or rows r0:r1 of its first dim (the data is row-major: one contiguous range)."""
        f = self._files.get(entry.path)
        if f is None:
            f = self._files[entry.path] = open(entry.path, "rb", buffering=0)
        r0, r1 = rows if rows is not None else (0, entry.shape[0] if entry.shape else 1)
        shape = (r1 - r0,) + entry.shape[1:] if entry.shape else ()
        itemsize = entry.dtype.itemsize
        nbytes = math.prod(shape) * itemsize
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape and entry.shape[0] else 0
        start = entry.start + r0 * row_bytes
        if nbytes and start % itemsize == 0:
            if os.fstat(f.fileno()).st_size < start + nbytes:
                raise HFError(f"{entry.path} is truncated: {entry.name!r} needs bytes up to {start + nbytes}")
            self.bytes_read += nbytes
            return map_range(f, start, nbytes, entry.dtype).view(shape)
        out = torch.empty(shape, dtype=entry.dtype)
        if nbytes:
            f.seek(start)
            got = f.readinto(out.view(-1).view(torch.uint8).numpy())
            if got != nbytes:
                raise HFError(f"{entry.path} is truncated: short read of {entry.name!r} ({got} of {nbytes} bytes)")
        self.bytes_read += nbytes
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# ----------------------------------------------------------------------------------------- writes
@dataclass(frozen=True)
class PlannedTensor:
    """A tensor the exporter will write: its name, dtype and shape are known before its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def plan_shards(tensors: Iterable[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive groups of at most max_shard_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_names(count: int) -> list[str]:
    """transformers' shard file names: model-00001-of-00003.safetensors, ..."""
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """Writes one safetensors file whose tensors are fixed up front, then filled in that order."""

    def __init__(self, path: Path, tensors: list[PlannedTensor], metadata: Optional[dict[str, str]] = None):
        self.path = Path(path)
        self.tensors = tensors
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for t in tensors:
            header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.f = open(self.path, "wb", buffering=0)
        self.f.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0
        self._filled = 0
        self.bytes_written = 0

    @property
    def full(self) -> bool:
        """Every planned tensor is written."""
        return self._next == len(self.tensors)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor, whole or as consecutive row blocks of it."""
        expected = self.tensors[self._next]
        if (name, tensor.dtype, tuple(tensor.shape[1:])) != (expected.name, expected.dtype, expected.shape[1:]) \
                or tensor.dim() != len(expected.shape):
            raise HFError(f"internal error: {self.path.name} expected {expected.name} {expected.dtype} "
                          f"{list(expected.shape)}, got {name} {tensor.dtype} {list(tensor.shape)}")
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
        self.f.write(memoryview(data))
        self._filled += data.nbytes
        self.bytes_written += data.nbytes
        if self._filled > expected.nbytes:
            raise HFError(f"internal error: {self.path.name} got too many rows of {name}")
        if self._filled == expected.nbytes:
            self._next += 1
            self._filled = 0

    def close(self, *, fsync: bool = True) -> None:
        if self._next != len(self.tensors):
            self.f.close()
            raise HFError(f"internal error: {self.path.name} closed after {self._next} of {len(self.tensors)} tensors")
        if fsync:
            os.fsync(self.f.fileno())
        self.f.close()
