"""Reading and writing the storage of a torch_dist (DCP) checkpoint one region at a time.

A torch_dist directory is `.metadata` (a pickled `torch.distributed.checkpoint.Metadata`: global
shape, dtype and stored chunks of every tensor, and where each chunk lies: file, byte offset,
length) plus `__*.distcp` files in which every chunk is one `torch.save` archive (an uncompressed
zip) and every object one raw byte string. That is all a loader needs, so the pruner writes it
directly instead of going through `dcp.save`, which wants the whole state dict in memory at once
and numbers its files by process-group rank:

- reads: `SourceReader.read_rows` finds the tensor data inside each stored archive (zip local
  header + the pickled tensor description) and reads only the requested rows with one
  `readinto`, so a worker never holds more than the region it asked for, even when the source
  stored a whole embedding as one chunk. Archives it cannot parse (another torch format, transforms)
  are read whole with `torch.load`, as DCP itself does.
- writes: `ChunkWriter` appends `torch.save` archives to one file per worker, exactly as DCP's
  FileSystemWriter does (its `_write_item`), and returns where each went; `write_metadata` merges
  every worker's records into one `.metadata`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import math
import mmap
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_minitron.model.checkpoint import CheckpointError
from megatron_minitron.model.integrity import ALGORITHM, HASHES


# --------------------------------------------------------------------------------- scratch buffers
class Scratch:
    """Output buffers reused from one selection to the next (one set per worker).

    A fresh tensor per selection is a fresh mapping of zeroed pages (the pruner serves allocations
    over 1 MiB by mmap to keep its memory flat); in a perf profile of benchmarks/prune_throughput.py's
    Minitron plan, faulting in, zeroing and unmapping those pages was the largest kernel cost."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self.buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return buffer[:nbytes].view(dtype).view(shape)


def select(x: torch.Tensor, dim: int, index: torch.Tensor, scratch: Optional[Scratch], slot: str) -> torch.Tensor:
    """x.index_select(dim, index), into scratch's buffer `slot` when given."""
    if scratch is None:
        return x.index_select(dim, index)
    shape = x.shape[:dim] + (len(index),) + x.shape[dim + 1:]
    return torch.index_select(x, dim, index, out=scratch.take(slot, tuple(shape), x.dtype))


# --------------------------------------------------------------------------------------- metadata
def is_training_state(key: str) -> bool:
    """A stored key of a training checkpoint's optimizer or RNG state rather than of the model: `optimizer.*`,
    `rng_state*`, and `chained_{i}.optimizer.*` (megatron's ChainedOptimizer, which a MoE model's separate
    expert optimizer brings). Its shapes belong to the layout and model that saved it."""
    head, _, rest = key.partition(".")
    return key.startswith(("optimizer.", "rng_state")) or (
        head.startswith("chained_") and head[len("chained_"):].isdigit() and rest.startswith("optimizer."))


def read_dcp_metadata(ckpt: Path):
    """The DCP Metadata of a torch_dist directory, with a clear error for a missing, truncated or
    corrupted file (torch raises bare pickle/EOF errors that name no file)."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(ckpt) / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no DCP metadata file {path.name}: not a torch_dist checkpoint, or unfinished")
    try:
        with open(path, "rb") as f:
            metadata = pickle.load(f)
    except Exception as error:  # truncated: EOFError/UnpicklingError; garbage: anything pickle raises
        raise CheckpointError(f"{path} is truncated or corrupted ({type(error).__name__}: {error})") from None
    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "storage_data", None), dict):
        raise CheckpointError(f"{path} does not hold torch.distributed.checkpoint metadata (found {type(metadata).__name__})")
    return metadata


def check_storage_files(ckpt: Path, metadata) -> int:
    """Every file the metadata points into exists and is long enough; returns the bytes stored."""
    sizes: dict[str, int] = {}  # per file (a path is built once per file, not per item: 800 items took 7 ms)
    total = 0
    for index, info in metadata.storage_data.items():
        size = sizes.get(info.relative_path)
        if size is None:
            path = Path(ckpt) / info.relative_path
            if not path.is_file():
                raise CheckpointError(f"{ckpt}: shard file {info.relative_path} is missing (it holds {index.fqn!r})")
            size = sizes[info.relative_path] = path.stat().st_size
        if info.offset + info.length > size:
            raise CheckpointError(f"{Path(ckpt) / info.relative_path} is truncated: {index.fqn!r} needs bytes up to "
                                  f"{info.offset + info.length}, the file has {size}")
        total += info.length
    return total


# ------------------------------------------------------------------------------------------ reads
@dataclass(frozen=True)
class _Layout:
    """Where the raw elements of one stored tensor archive lie in its file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    data_offset: int

    def rows(self, local: tuple[int, ...], x0: int, x1: int) -> tuple[int, int]:
        """(file offset, byte count) of rows x0:x1 (of this archive) of its first dim after the leading
        dims, at indices `local` (of this archive) of those: row-major, one contiguous range."""
        lead = len(local)
        row_bytes = math.prod(self.shape[lead + 1:]) * self.dtype.itemsize
        flat = 0
        for size, i in zip(self.shape, local):
            flat = flat * size + i
        return self.data_offset + (flat * self.shape[lead] + x0) * row_bytes, (x1 - x0) * row_bytes


class _FileView(io.RawIOBase):
    """A read-only window [start, start + length) of an open file (what zipfile/torch.load see)."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _TensorMeta(pickle.Unpickler):
    """Unpickles a torch.save data.pkl into (storage key, dtype, offset, shape, stride) without data."""

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return lambda storage, offset, size, stride, *rest: (storage, offset, tuple(size), tuple(stride))
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    def persistent_load(self, pid):
        _kind, dtype, key, _location, _numel = pid
        return key, dtype


def _member_offset(f, start: int, info: zipfile.ZipInfo) -> int:
    """File offset of a stored zip member's data (after its local header)."""
    f.seek(start + info.header_offset)
    header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return start + info.header_offset + 30 + name_len + extra_len


def _parse_layout(f, start: int, length: int) -> Optional[_Layout]:
    """Element layout of a stored tensor archive, or None when it is not a plain contiguous tensor.

    Members are read through their local headers, not ZipFile.read: archives written without CRC32
    (ours, see ChunkWriter) would fail its check."""
    try:
        with zipfile.ZipFile(_FileView(f, start, length)) as archive:
            names = {info.filename: info for info in archive.infolist()}
        pkl = next(n for n in names if n.endswith("/data.pkl"))
        if names[pkl].compress_type != zipfile.ZIP_STORED:
            return None
        f.seek(_member_offset(f, start, names[pkl]))
        (key, dtype), offset, shape, stride = _TensorMeta(io.BytesIO(f.read(names[pkl].file_size))).load()
        record = names[f"{pkl[: -len('data.pkl')]}data/{key}"]
        expected = 1
        for size, st in zip(reversed(shape), reversed(stride)):
            if size != 1 and st != expected:
                return None
            expected *= size
        if record.compress_type != zipfile.ZIP_STORED:
            return None
        itemsize = torch.empty((), dtype=dtype).element_size()
        return _Layout(dtype=dtype, shape=shape, data_offset=_member_offset(f, start, record) + offset * itemsize)
    except Exception:  # anything unexpected: the caller falls back to torch.load
        return None


def _leading(at) -> tuple[int, ...]:
    """The indices of the dims before the row dim: none (None), a stacked tensor's layer (an int), or a
    tuple of them (a stacked expert tensor's (layer, expert))."""
    return () if at is None else (at,) if isinstance(at, int) else tuple(at)


def _local(at: tuple[int, ...], offs) -> tuple[int, ...]:
    """`at` relative to a stored chunk's offsets."""
    return tuple(i - o for i, o in zip(at, offs))


def _overlapping(chunks, lead: int, r0: int, r1: int):
    """(offsets, sizes, x0, x1) of each of `chunks` ((offsets, sizes) of stored chunks that hold the
    leading indices) that holds rows x0:x1 (global, nonempty) of r0:r1 of the row dim, dim `lead`."""
    for offs, sizes in chunks:
        x0, x1 = max(r0, offs[lead]), min(r1, offs[lead] + sizes[lead])
        if x0 < x1:
            yield offs, sizes, x0, x1


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def all_finite(t: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or infinity (other dtypes always do). One min/max
    pass: NaN propagates into both, an infinity is the min or the max. torch.isfinite(t).all() gives the
    same answer but allocates a boolean tensor of t's size first; on the fresh pages of a just-mapped
    file that was 10x slower here (0.79 s against 0.07 s for 302 MB of expert tensors)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return math.isfinite(low.item()) and math.isfinite(high.item())


def map_range(f, start: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """Bytes [start, start + nbytes) of open file f as a 1-d tensor of `dtype` over a private
    (copy-on-write) memory mapping: reading copies nothing, writing never reaches the file, and the
    mapping goes when the tensor does. start must be a multiple of dtype's size.

    The page tables are filled up front (MADV_POPULATE_READ, Linux 5.14+; skipped where refused):
    measured here, writing a 256 MB mapping to a new file ran at 1.3 GB/s faulting page by page and
    3.4 GB/s populated, against 1.1 GB/s for readinto into a fresh buffer then write."""
    base = start - start % mmap.ALLOCATIONGRANULARITY
    region = mmap.mmap(f.fileno(), start + nbytes - base, access=mmap.ACCESS_COPY, offset=base)
    page = (start - base) - (start - base) % mmap.PAGESIZE  # madvise wants a page-aligned start (else EINVAL)
    try:
        region.madvise(MADV_POPULATE_READ, page, start + nbytes - base - page)
    except (OSError, ValueError):
        pass
    return torch.frombuffer(region, dtype=dtype, offset=start - base, count=nbytes // dtype.itemsize)


class SourceReader:
    """Row regions of the global tensors of a torch_dist checkpoint (one per worker process)."""

    def __init__(self, ckpt: Path, metadata=None):
        self.ckpt = Path(ckpt)
        self.metadata = metadata if metadata is not None else read_dcp_metadata(self.ckpt)
        self._files: dict[str, io.BufferedReader] = {}
        self._layouts: dict = {}
        self._chunk_tables: dict = {}
        self._loaded: tuple = (None, None)  # the last archive torch.load had to read whole
        self.bytes_read = 0

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _file(self, rel: str):
        if rel not in self._files:
            self._files[rel] = open(self.ckpt / rel, "rb", buffering=0)
        return self._files[rel]

    def tensor_meta(self, key: str):
        return self.metadata.state_dict_metadata[key]

    def _chunks_at(self, key: str, at: tuple[int, ...]) -> list:
        """(offsets, sizes) of the stored chunks of `key` that hold the leading indices `at`, from a table
        built once per key: a MoE weight has a chunk per layer, expert and GLU half, and scanning all of
        them on every read grows with the square of the model (0.39 s of a 1.8 s export of 0.93 GB)."""
        lead = len(at)
        table = self._chunk_tables.get((key, lead))
        if table is None:
            exact: dict = collections.defaultdict(list)
            wide = []  # chunks spanning more than one index of a leading dim
            for chunk in self.tensor_meta(key).chunks:
                offs, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
                (exact[offs[:lead]] if all(n == 1 for n in sizes[:lead]) else wide).append((offs, sizes))
            table = self._chunk_tables[(key, lead)] = (dict(exact), wide)
        exact, wide = table
        return exact.get(at, []) + [(offs, sizes) for offs, sizes in wide
                                    if all(o <= i < o + n for i, o, n in zip(at, offs, sizes))]

    def read_rows(self, key: str, layer, r0: int, r1: int,
                  index: Optional[torch.Tensor] = None, scratch: Optional[Scratch] = None) -> torch.Tensor:
        """_read_rows, refused when a value read is NaN or infinite (checked on the rows as they pass,
        no extra read of the file), naming the tensor and its file. `layer`: None, a stacked tensor's
        layer, or the tuple of indices of every dim before the row dim (a stacked expert tensor's
        (layer, expert))."""
        rows = self._read_rows(key, layer, r0, r1, index, scratch)
        if not all_finite(rows):
            from torch.distributed.checkpoint.metadata import MetadataIndex

            at = _leading(layer)
            files = sorted({self.metadata.storage_data[MetadataIndex(key, offs)].relative_path
                            for offs, *_ in _overlapping(self._chunks_at(key, at), len(at), r0, r1)})
            where = f"rows {r0}:{r1}" + ("" if layer is None else f" of {'layer' if len(at) == 1 else 'index'} {layer}")
            raise CheckpointError(f"{self.ckpt / files[0] if files else self.ckpt}: tensor {key!r} holds NaN or infinite "
                             f"values ({where}); the checkpoint is corrupted or diverged: nothing was written from it")
        return rows

    def _read_rows(self, key: str, layer, r0: int, r1: int,
                   index: Optional[torch.Tensor] = None, scratch: Optional[Scratch] = None) -> torch.Tensor:
        """Rows r0:r1 of the first per-layer dim of tensor `key` (of layer `layer` of a stacked
        tensor, or of the tensor itself when layer is None), every other dim whole; with `index`
        (ascending, relative to r0), only those rows.

        The result may share memory with the file's pages (a private copy-on-write mapping: writing
        to it never reaches the file) or with scratch's buffer "rows" (until its next use)."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        meta = self.tensor_meta(key)
        size = tuple(meta.size)
        at = _leading(layer)
        lead = len(at)  # dims before the row dim
        if len(size) == lead:  # a stacked scalar per layer: treat it as one row
            raise CheckpointError(f"{key}: stacked scalars are not supported")
        mapped = self._mapped_rows(key, meta, at, r0, r1, index, scratch)
        if mapped is not None:
            return mapped
        out = torch.empty((r1 - r0,) + size[lead + 1:], dtype=meta.properties.dtype)
        covered = 0
        for offs, sizes, x0, x1 in _overlapping(self._chunks_at(key, at), lead, r0, r1):
            info = self.metadata.storage_data[MetadataIndex(key, offs)]
            rest = sizes[lead + 1:]
            dest = out[x0 - r0:x1 - r0]
            dest = dest[(slice(None),) + tuple(slice(o, o + s) for o, s in zip(offs[lead + 1:], rest))]
            self._read_chunk_rows(key, info, sizes, _local(at, offs), x0 - offs[lead], x1 - offs[lead], dest)
            covered += dest.numel()
        if covered != out.numel():
            raise CheckpointError(f"{self.ckpt}: the stored chunks of {key!r} do not cover rows {r0}:{r1}"
                             f"{'' if layer is None else f' of layer {layer}'}; the metadata is inconsistent")
        return out if index is None else out.index_select(0, index)

    def _mapped_rows(self, key: str, meta, at: tuple[int, ...], r0: int, r1: int,
                     index: Optional[torch.Tensor], scratch: Optional[Scratch]) -> Optional[torch.Tensor]:
        """read_rows through memory mappings of just those rows, when stored chunks with every other
        dim whole hold them (one chunk, or several, e.g. a GLU weight's gate and up halves, whose rows
        are gathered or copied together from their mappings); None otherwise (read_rows reads the
        pieces into a fresh tensor). Every row of a GLU expert weight used to take that fallback, a
        readinto into freshly mapped pages per expert: in the identity plan of
        benchmarks/prune_throughput.py --moe (one worker) read_rows took 0.36 s of thread CPU time,
        0.21 s copying from the mappings.

        Measured (32 MB fp32 matrix, half its rows and 3/4 of its columns kept, one thread): readinto
        into a fresh buffer then the two index_selects took 25 ms, the same selects from the mapping
        3.7 ms: the source bytes are not copied first, and no fresh pages are faulted in and zeroed.
        Archives inside a DCP file start at any byte, so the elements may be misaligned for their
        dtype; then the rows are gathered as bytes (alignment-free) into an aligned tensor, or copied
        whole when every row is kept. The mappings go when the returned tensor does, so a worker's
        memory stays at the region it asked for."""
        size = tuple(meta.size)
        lead = len(at)
        row_shape = size[lead + 1:]
        parts = sorted(_overlapping(self._chunks_at(key, at), lead, r0, r1), key=lambda part: part[2])  # row order
        if any(sizes[lead + 1:] != row_shape for _, sizes, _, _ in parts):
            return None  # the columns are split
        if not parts or sum(x1 - x0 for *_, x0, x1 in parts) != r1 - r0:
            return None
        views = []
        for offs, sizes, x0, x1 in parts:
            view = self._map_rows(key, offs, sizes, at, x0, x1)
            if view is None:
                return None
            views.append(view)
        dtype, row_bytes = views[0][1], views[0][0].shape[1]
        kept = len(index) if index is not None else r1 - r0
        self.bytes_read += (r1 - r0) * row_bytes  # the region asked for, as the copying path counts it
        if index is None and len(parts) == 1:  # the mapping itself, or an aligned copy of it
            raw, _, aligned = views[0]
            if not aligned:
                raw = select(raw, 0, torch.arange(r1 - r0), scratch, "rows")
            return raw.view(dtype).view((kept,) + row_shape)
        out = scratch.take("rows", (kept, row_bytes), torch.uint8) if scratch is not None else \
            torch.empty((kept, row_bytes), dtype=torch.uint8)
        done = 0
        for (raw, _, _), (_, _, x0, x1) in zip(views, parts):
            if index is None:  # every row of several chunks (a GLU weight's gate and up halves)
                out[done:done + x1 - x0].copy_(raw)
                done += x1 - x0
                continue
            lo, hi = (int(torch.searchsorted(index, x - r0)) for x in (x0, x1))
            torch.index_select(raw, 0, index[lo:hi] - (x0 - r0), out=out[done:done + hi - lo])
            done += hi - lo
        return out.view(dtype).view((kept,) + row_shape)

    def _map_rows(self, key: str, offs, sizes, at: tuple[int, ...], x0: int, x1: int):
        """Rows x0:x1 (global) of one stored chunk as a mapped [rows, row bytes] uint8 tensor, with the
        chunk's dtype and whether its elements are aligned; None when the archive cannot be parsed."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.metadata.storage_data[MetadataIndex(key, offs)]
        layout = self._layout(info, sizes)
        if layout is None:
            return None
        lead = len(at)
        start, nbytes = layout.rows(_local(at, offs), x0 - offs[lead], x1 - offs[lead])
        if nbytes == 0:
            return None
        f = self._file(info.relative_path)
        if os.fstat(f.fileno()).st_size < start + nbytes:
            raise CheckpointError(f"{self.ckpt / info.relative_path}: short read of {key!r} (it needs bytes up to "
                             f"{start + nbytes}); the file is truncated")
        raw = map_range(f, start, nbytes, torch.uint8).view(x1 - x0, nbytes // (x1 - x0))
        return raw, layout.dtype, start % layout.dtype.itemsize == 0

    def _layout(self, info, sizes) -> Optional[_Layout]:
        cache_key = (info.relative_path, info.offset)
        if cache_key not in self._layouts:
            f = self._file(info.relative_path)
            layout = None if info.transform_descriptors else _parse_layout(f, info.offset, info.length)
            if layout is not None and layout.shape != tuple(sizes):
                layout = None
            self._layouts[cache_key] = layout
        return self._layouts[cache_key]

    def _read_chunk_rows(self, key, info, sizes, local: tuple[int, ...], x0, x1, dest: torch.Tensor) -> None:
        f = self._file(info.relative_path)
        cache_key = (info.relative_path, info.offset)
        layout = self._layout(info, sizes)
        if layout is None:  # fall back to reading the whole archive, as DCP does
            if self._loaded[0] != cache_key:
                self._loaded = (None, None)
                view = _FileView(f, info.offset, info.length)
                self._loaded = (cache_key, torch.load(io.BufferedReader(view), map_location="cpu", weights_only=True))
                self.bytes_read += info.length
            chunk = self._loaded[1]
            chunk = chunk[local] if local else chunk
            dest.copy_(chunk[x0:x1])
            return
        start, nbytes = layout.rows(local, x0, x1)
        target = dest if dest.is_contiguous() else torch.empty(dest.shape, dtype=dest.dtype)
        buffer = target.view(-1).view(torch.uint8).numpy() if nbytes else None
        f.seek(start)
        got = f.readinto(buffer) if nbytes else 0
        if got != nbytes:
            raise CheckpointError(f"{self.ckpt / info.relative_path}: short read of {key!r} ({got} of {nbytes} bytes); "
                             f"the file is truncated")
        if target is not dest:
            dest.copy_(target)
        self.bytes_read += nbytes

    def read_bytes(self, key: str) -> tuple[bytes, Optional[list]]:
        """Raw bytes of a stored object and its transform descriptors (copied verbatim)."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.metadata.storage_data[MetadataIndex(key)]
        f = self._file(info.relative_path)
        f.seek(info.offset)
        data = f.read(info.length)
        self.bytes_read += len(data)
        return data, info.transform_descriptors


# ----------------------------------------------------------------------------------------- writes
@dataclass(frozen=True)
class Record:
    """One written item: a tensor chunk (offsets/sizes into the global tensor) or an object."""

    key: str
    relative_path: str
    offset: int
    length: int
    chunk_offsets: Optional[tuple[int, ...]] = None
    chunk_sizes: Optional[tuple[int, ...]] = None
    global_shape: Optional[tuple[int, ...]] = None
    dtype: Optional[torch.dtype] = None
    transform_descriptors: Optional[list] = None


ALIGN = 64
"""Start of every tensor archive ChunkWriter writes, in bytes."""


class ChunkWriter:
    """Appends items to one `.distcp` file, the way DCP's FileSystemWriter lays them out.

    Two measured choices (torch 2.13, see benchmarks/prune_throughput.py): the file is unbuffered,
    because torch.save through a BufferedWriter copies the data in small pieces (~0.5 GB/s against
    ~3 GB/s unbuffered); and the zip CRC32 of each archive is not computed (`compute_crc32=False`),
    because no loader checks it (torch.load reads a corrupted record silently either way) and it
    costs more than the write itself. With `fsync`, each file is flushed to disk before the
    checkpoint is finalised, as DCP's writer does by default. Each tensor archive starts at a
    multiple of 64 bytes (loaders go by the offsets in the metadata, so the gaps are never read):
    its elements are then aligned in the file, and a later prune reads them through a mapping
    without copying (SourceReader).
    """

    def __init__(self, directory: Path, name: str, *, fsync: bool = True):
        self.name = name
        self.path = Path(directory) / name
        self.f = HashingFile(self.path)
        self.fsync = fsync
        self.records: list[Record] = []
        self.bytes_written = 0

    def tensor(self, key: str, chunk: torch.Tensor, offsets: tuple[int, ...], global_shape: tuple[int, ...]) -> None:
        from torch.utils.serialization import config

        start = self.f.tell()
        if start % ALIGN:  # torch.save aligns its records to 64 bytes of the archive's own start
            self.f.write(bytes(ALIGN - start % ALIGN))
            start = self.f.tell()
        crc, config.save.compute_crc32 = config.save.compute_crc32, False
        try:
            torch.save(_own_bytes(chunk), self.f)
        finally:
            config.save.compute_crc32 = crc
        length = self.f.tell() - start
        self.bytes_written += length
        self.records.append(Record(key=key, relative_path=self.name, offset=start, length=length,
                                   chunk_offsets=tuple(offsets), chunk_sizes=tuple(chunk.shape),
                                   global_shape=tuple(global_shape), dtype=chunk.dtype))

    def object(self, key: str, data: bytes, transform_descriptors=None) -> None:
        start = self.f.tell()
        self.f.write(data)
        self.bytes_written += len(data)
        self.records.append(Record(key=key, relative_path=self.name, offset=start, length=len(data),
                                   transform_descriptors=transform_descriptors))

    def close(self) -> None:
        self.f.close(fsync=self.fsync)

    @property
    def checksum(self) -> dict:
        """{"size", ALGORITHM} of the file written (its checksums.json entry); valid after close()."""
        return self.f.checksum()


class HashingFile:
    """A file opened for writing (unbuffered) that hashes every byte (integrity.ALGORITHM: BLAKE3) as it is
    written, so a checkpoint's checksums.json needs no second read of what was just written.

    A write of 1 MiB or more (tensor data) is hashed on a helper thread while the write itself runs: both
    release the GIL, and they cost about the same CPU time (measured on the 2-core VM, per GB: BLAKE3
    0.25 s on one core, the write into the page cache 0.25-0.5 s), so where a core is free the hash adds
    no wall time; hashed inline it would add its whole cost. BLAKE3's own threads (max_threads) would only
    compete with the write for the second core. The write returns only when both are done, so the caller's
    buffer is never read after it is reused. Short writes are retried until every byte is written (one
    write(2) moves at most ~2 GiB)."""

    THREAD_BYTES = 1 << 20

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "wb", buffering=0)
        self._digest = HASHES[ALGORITHM]()
        self._position = 0
        self._pool = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        pending = None
        if view.nbytes >= self.THREAD_BYTES:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash")
            pending = self._pool.submit(self._digest.update, view)
        else:
            self._digest.update(view)
        done = 0
        try:
            while done < view.nbytes:
                done += self._f.write(view[done:])
        finally:
            if pending is not None:
                pending.result()
        self._position += done
        return done

    def flush(self) -> None:
        pass  # unbuffered

    def tell(self) -> int:
        return self._position

    def close(self, *, fsync: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._f.closed:
            return
        try:
            if fsync:
                os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def checksum(self) -> dict:
        """{"size", ALGORITHM} of everything written."""
        return {"size": self._position, ALGORITHM: self._digest.hexdigest()}


def _own_bytes(t: torch.Tensor) -> torch.Tensor:
    """`t` on a storage of exactly its own bytes (shared, not copied): torch.save writes a view's whole
    storage, and the selections land in reused scratch buffers larger than they are (a Llama-3.1-8B ->
    4.5B prune wrote 12.3 GB for 9.0 GB of tensors before this)."""
    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    storage = t.untyped_storage()
    if t.storage_offset() == 0 and storage.nbytes() == nbytes:
        return t
    start = t.storage_offset() * t.element_size()
    return torch.empty(0, dtype=t.dtype).set_(storage[start:start + nbytes], 0, t.shape)


def write_metadata(directory: Path, records: list[Record], *, fsync: bool = True) -> None:
    """Merge every worker's records into one `.metadata` (what DCP's FileSystemWriter.finish writes);
    with `fsync`, flushed to disk before the rename that makes it visible."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta, TensorProperties,
                                                       TensorStorageMetadata)

    state: dict = {}
    storage: dict = {}
    for r in sorted(records, key=lambda r: (r.key, r.chunk_offsets or ())):
        if r.chunk_offsets is None:
            state[r.key] = BytesStorageMetadata()
            storage[MetadataIndex(r.key)] = _StorageInfo(r.relative_path, r.offset, r.length, r.transform_descriptors)
            continue
        if r.key not in state:
            state[r.key] = TensorStorageMetadata(properties=TensorProperties(dtype=r.dtype),
                                                 size=torch.Size(r.global_shape), chunks=[])
        state[r.key].chunks.append(ChunkStorageMetadata(offsets=torch.Size(r.chunk_offsets),
                                                        sizes=torch.Size(r.chunk_sizes)))
        storage[MetadataIndex(r.key, r.chunk_offsets)] = _StorageInfo(r.relative_path, r.offset, r.length)
    for key, meta in state.items():
        if isinstance(meta, TensorStorageMetadata):
            _check_coverage(key, meta)
    metadata = Metadata(state_dict_metadata=state, planner_data=None, storage_data=storage,
                        storage_meta=StorageMeta(checkpoint_id=str(directory)))
    metadata.version = _dcp_version()
    tmp = Path(directory) / ".metadata.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(metadata, f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    tmp.rename(Path(directory) / ".metadata")


def _dcp_version() -> str:
    from torch.distributed.checkpoint import filesystem

    return getattr(filesystem, "CURRENT_DCP_VERSION", "1.0.0")


def _check_coverage(key: str, meta) -> None:
    total = 1
    for s in meta.size:
        total *= s
    stored = 0
    for chunk in meta.chunks:
        n = 1
        for s in chunk.sizes:
            n *= s
        stored += n
    if stored != total:
        raise CheckpointError(f"internal error: the chunks written for {key!r} hold {stored} elements, the tensor {total}")
