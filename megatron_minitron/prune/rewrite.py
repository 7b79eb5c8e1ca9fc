"""`prune_checkpoint`: stream a torch_dist checkpoint through a plan into a new, smaller one.

    prune_checkpoint("runs/teacher", plan, "runs/pruned", workers=4)

How it works, and why:

1. Validate everything before the first byte is written: the plan against the checkpoint's
   architecture, the DCP metadata (missing, truncated, corrupted), every shard file (present, long
   enough), every stored key (a rule exists for it, its shape matches the plan's source), the common
   state, the tokenizer, and the output path (new or --overwrite, not inside the source, not a
   parent of it).
2. Cut the work into units: one unit is one chunk of one target tensor, a row range of its first
   per-layer dim (a layer's rows for stacked tensors), sized so that the source rows it reads stay
   under `chunk_bytes`; stored objects (`_extra_state`) are units of their own. Units are split over
   the workers in key order into runs of about equal bytes.
3. Each worker reads exactly the source rows of its units (storage.SourceReader, one `readinto`
   per stored chunk), applies the slicing rule, and appends the result as a DCP chunk to its own
   `__{worker}_0.distcp`. Peak memory of a worker is about two chunks (source rows + target rows),
   whatever the model size.
4. While the workers run, the coordinator writes `common.pt` (Megatron-LM args of the target),
   `minitron.json` (target architecture, the plan, provenance) and the tokenizer; then it merges
   every worker's records into one DCP `.metadata`, writes megatron's `metadata.json`, the
   checksums and the tracker file, and renames the
   temporary directory `.NAME.partial` beside the output into place. A crash at any point leaves
   only that partial directory, which holds no tracker and never looks finished; the source is only
   ever opened for reading.

Why not `dcp.save`: it needs the whole state dict in memory at once and numbers its files by
process-group rank; writing DCP storage directly (the same `torch.save` archives, the same pickled
Metadata) keeps memory at a few chunks and lets N independent processes write one checkpoint.
The output loads with megatron's dist_checkpointing at any TP/PP, like any torch_dist checkpoint.

Workers are forked processes (`workers=N`; spawned where fork does not exist), or the ranks of a torchrun launch (`group=`): rank 0
validates and finalises, every rank rewrites its share.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_minitron.model import checkpoint as ckpt
from megatron_minitron.model import storage
from megatron_minitron.model.integrity import write_checksums
from megatron_minitron.plan.plan import Plan
from megatron_minitron.prune.slicing import AxisIndices, PruneError, is_dropped, rename_object, rule_for
from megatron_minitron.runtime.host_memory import peak_rss_mb

DEFAULT_CHUNK_BYTES = 64 << 20
GAP_ROW_BYTES = 1 << 20
"""Source rows this large (a whole expert per row) are never read only to be dropped: a chunk of work
stops at a pruned row. Smaller rows are read across gaps (fewer, larger reads)."""


@dataclass(frozen=True)
class Unit:
    """One piece of work: rows a:b of target layer `layer` of one tensor, or one stored object."""

    source_key: str
    target_key: str
    layer: Optional[int] = None
    """Target layer of a stacked tensor (None: an unstacked tensor, or an object)."""
    rows: tuple[int, int] = (0, 0)
    read_bytes: int = 0
    write_bytes: int = 0
    is_object: bool = False


@dataclass(frozen=True)
class Job:
    """What a worker needs (picklable: workers rebuild the rules from the plan)."""

    source: str
    partial: str
    plan: Plan
    head_scores: Optional[torch.Tensor]
    units: tuple[Unit, ...]
    worker: int
    fsync: bool = True
    metadata: object = None
    """The source's DCP Metadata as the caller read it (None: read it again). A forked worker inherits
    it: unpickling `.metadata` took 23 ms per worker inside the timed window of the 1.15 GB MoE model."""


# ------------------------------------------------------------------------------------ validation
def resolve_source(path: str | os.PathLike) -> ckpt.CheckpointInfo:
    """checkpoint.resolve, but a missing, truncated or corrupted DCP `.metadata` is reported as such
    (resolve reads it with torch, whose pickle errors name no file)."""
    root = Path(path)
    tracked = ckpt.latest_iteration(root) if root.is_dir() else None
    if tracked == "release":
        candidate = root / "release"
    elif tracked is not None and tracked.isdigit():
        candidate = ckpt.iteration_dir(root, int(tracked))
    else:
        candidate = root
    if (candidate / "metadata.json").is_file():
        storage.read_dcp_metadata(candidate)
    return ckpt.resolve(root)


def _check_paths(source_root: Path, out: Path, overwrite: bool) -> None:
    src, dst = source_root.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise PruneError(f"output {out} is inside the source checkpoint {source_root}; the pruner never writes "
                         f"into its source: choose a path outside it")
    if dst in src.parents:
        raise PruneError(f"output {out} contains the source checkpoint {source_root}; overwriting it would "
                         f"delete the source")
    ckpt.check_new_output(out, overwrite=overwrite)
    if out.exists() and not out.is_dir():
        raise PruneError(f"output {out} exists and is not a directory")


def _common_state(info: ckpt.CheckpointInfo, plan: Plan) -> dict:
    try:
        common = torch.load(info.path / "common.pt", map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise PruneError(f"{info.path} has no common.pt: the checkpoint is incomplete") from None
    except Exception as error:
        raise PruneError(f"{info.path / 'common.pt'} is truncated or corrupted ({type(error).__name__}: {error})"
                         ) from None
    from argparse import Namespace

    base = vars(common["args"]).copy() if isinstance(common.get("args"), Namespace) else {}
    base.pop("iteration", None)
    args = ckpt.megatron_args_from_arch(plan.target.explicit())
    merged = Namespace(**{**base, **vars(args)})
    return {"checkpoint_version": common.get("checkpoint_version", 3.0), "iteration": 0, "args": merged}


def _megatron_metadata(info: ckpt.CheckpointInfo) -> dict:
    path = info.path / "metadata.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PruneError(f"{path} is unreadable or corrupted: {error}") from None
    if meta.get("sharded_backend") != "torch_dist":
        raise PruneError(f"{path}: sharded backend {meta.get('sharded_backend')!r}; the pruner rewrites torch_dist "
                         f"checkpoints only")
    return meta


def plan_units(metadata, plan: Plan, head_scores: Optional[torch.Tensor], chunk_bytes: int) -> list[Unit]:
    """Every unit of work, in a fixed order (sorted keys), so any worker count writes the same chunks."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    axes = AxisIndices(plan, head_scores)
    units: list[Unit] = []
    for key in sorted(metadata.state_dict_metadata):
        meta = metadata.state_dict_metadata[key]
        if not isinstance(meta, TensorStorageMetadata):
            if is_dropped(key):
                continue
            target = rename_object(key, plan)
            if target is not None:
                units.append(Unit(key, target, is_object=True))
            continue
        rule = rule_for(key, tuple(meta.size), plan, axes)
        if rule is None:
            continue
        itemsize = torch.empty((), dtype=meta.properties.dtype).element_size()
        per_layer_src = rule.source_shape[1:] if rule.layered else rule.source_shape
        src_row = itemsize * math.prod(per_layer_src[1:])
        dst_row = itemsize * math.prod(rule.layer_shape[1:])
        rows_total = rule.layer_shape[0]
        max_src_rows = max(1, chunk_bytes // max(1, src_row))
        layers = range(plan.target.num_layers) if rule.layered else [None]
        for layer in layers:
            j = 0 if layer is None else layer
            idx = rule.index(j)[0]
            if rule.merge_dim == 0 and rule.merge(j):
                spans = [(0, rows_total)]  # the head merge reads rows of other heads: whole layer
            else:
                spans = _row_spans(idx, rows_total, max_src_rows, split_gaps=src_row >= GAP_ROW_BYTES)
            for a, b in spans:
                s0, s1 = (0, per_layer_src[0]) if rule.merge_dim == 0 and rule.merge(j) else rule.source_rows(j, a, b)
                units.append(Unit(key, rule.target_key, layer=layer, rows=(a, b), read_bytes=(s1 - s0) * src_row,
                                  write_bytes=(b - a) * dst_row))
    return units


def _row_spans(idx: Optional[torch.Tensor], rows: int, max_src_rows: int, *, split_gaps: bool = False
               ) -> list[tuple[int, int]]:
    """Target row ranges whose source rows (idx[a]..idx[b-1]) span at most max_src_rows; with split_gaps,
    also ranges of consecutive source rows only, so that no pruned row is read (rows of whole experts)."""
    if rows == 0:
        return [(0, 0)]
    if idx is None:
        return [(a, min(a + max_src_rows, rows)) for a in range(0, rows, max_src_rows)]
    spans, a = [], 0
    while a < rows:
        limit = int(idx[a]) + max_src_rows
        b = int(torch.searchsorted(idx, limit))
        b = max(b, a + 1)
        if split_gaps:
            run = a + 1
            while run < b and int(idx[run]) == int(idx[run - 1]) + 1:
                run += 1
            b = run
        spans.append((a, b))
        a = b
    return spans


def split_units(units: list[Unit], workers: int) -> list[list[Unit]]:
    """Contiguous runs of about equal bytes (keeps each worker's reads local to few shard files)."""
    total = sum(u.read_bytes + u.write_bytes + 1 for u in units)
    shares: list[list[Unit]] = [[] for _ in range(workers)]
    done = 0
    for unit in units:
        w = min(workers - 1, int(done * workers / max(1, total)))
        shares[w].append(unit)
        done += unit.read_bytes + unit.write_bytes + 1
    return shares


# --------------------------------------------------------------------------------------- workers
def _return_freed_memory() -> None:
    """Serve every allocation of 1 MiB or more with its own mmap (glibc), so a freed chunk goes back
    to the OS. glibc's default threshold adapts upwards to 32 MiB, after which chunk-sized tensors come
    from the heap and fragment it: measured, a worker's peak RSS then grew with the model size."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixing it also stops the adaptation)
    except (OSError, AttributeError):
        pass


def run_job(job: Job, report: Optional[Callable[[int, int, int], None]] = None
            ) -> tuple[list[storage.Record], dict[str, dict]]:
    """Rewrite one worker's units into `__{worker}_0.distcp`; returns the records of what it wrote and
    the file's checksums.json entry ({name: {"size", "blake3"}}, hashed as it was written)."""
    _return_freed_memory()
    plan = job.plan
    reader = storage.SourceReader(Path(job.source), metadata=job.metadata)
    axes = AxisIndices(plan, job.head_scores)
    writer = storage.ChunkWriter(Path(job.partial), f"__{job.worker}_0.distcp", fsync=job.fsync)
    parent = os.getppid()
    rules: dict = {}
    scratch = storage.Scratch()
    try:
        for n, unit in enumerate(job.units):
            if os.getppid() != parent:  # the coordinator died: stop writing
                os._exit(3)
            if unit.is_object:
                data, transforms = reader.read_bytes(unit.source_key)
                writer.object(unit.target_key, data, transforms)
            else:
                if unit.source_key not in rules:
                    meta = reader.tensor_meta(unit.source_key)
                    rules[unit.source_key] = rule_for(unit.source_key, tuple(meta.size), plan, axes)
                rule = rules[unit.source_key]
                _rewrite_unit(rule, unit, reader, writer, scratch)
            if report is not None:
                report(n + 1, reader.bytes_read, writer.bytes_written)
    finally:
        reader.close()
        writer.close()
    return writer.records, {writer.name: writer.checksum}


def _rewrite_unit(rule, unit: Unit, reader: storage.SourceReader, writer: storage.ChunkWriter,
                  scratch: Optional[storage.Scratch] = None) -> None:
    if rule.axes[0] == "experts" and len(rule.axes) == 3:
        return _rewrite_experts(rule, unit, reader, writer, scratch)
    j = 0 if unit.layer is None else unit.layer
    a, b = unit.rows
    source_layer = rule.source_layer(j) if rule.layered else None
    whole_layer = rule.merge_dim == 0 and rule.merge(j)
    if whole_layer:
        rows = (0, rule.source_shape[1 if rule.layered else 0])
    else:
        rows = rule.source_rows(j, a, b)
    if whole_layer:
        source = reader.read_rows(rule.source_key, source_layer, *rows)
        target = rule.apply(source, j)
    else:  # the reader picks the kept rows itself (from the mapped file, without copying the rest)
        source = reader.read_rows(rule.source_key, source_layer, *rows, index=rule.row_index(j, a, b),
                                  scratch=scratch)
        target = rule.apply(source, j, rows=(a, b), rows_selected=True, scratch=scratch)
    if whole_layer:
        target = target[a:b]
    lead = (unit.layer,) if rule.layered else () if rule.stack_at is None else (rule.stack_at,)
    if lead:
        target = target.unsqueeze(0)
    offsets = lead + (a,) + (0,) * (len(rule.layer_shape) - 1)
    writer.tensor(rule.target_key, target, offsets, rule.target_shape)


def _rewrite_experts(rule, unit: Unit, reader: storage.SourceReader, writer: storage.ChunkWriter,
                     scratch: Optional[storage.Scratch] = None) -> None:
    """Target experts a:b of an expert weight ([layer,] expert, rows, cols), one kept expert at a time.

    Each expert's rows are read at (layer, expert) with that expert's own row index, so the reader
    gathers them straight from its mapping of the stored chunks, across the GLU gate and up chunks
    megatron stores separately; the columns are then selected into the unit's output buffer. Reading
    the unit's experts as rows instead made the reader copy them whole first (their rows split across
    chunks), then select experts, then rows, then columns, stacking the experts at the end."""
    j = 0 if unit.layer is None else unit.layer
    a, b = unit.rows
    experts, row_index, col_index = rule.index(j)
    lead = (rule.source_layer(j),) if rule.layered else ()
    src_rows = rule.source_shape[-2]
    rows, cols = rule.layer_shape[1:]
    dtype = reader.tensor_meta(rule.source_key).properties.dtype
    shape = (b - a, rows, cols)
    out = scratch.take("experts", shape, dtype) if scratch is not None else torch.empty(shape, dtype=dtype)
    for k in range(a, b):
        source = k if experts is None else int(experts[k])
        index = row_index[k] if row_index is not None and row_index.dim() == 2 else row_index
        part = reader.read_rows(rule.source_key, lead + (source,), 0, src_rows, index=index, scratch=scratch)
        columns = col_index[k] if col_index is not None and col_index.dim() == 2 else col_index
        if columns is None:
            out[k - a].copy_(part)
        else:
            torch.index_select(part, 1, columns, out=out[k - a])
    prefix = (unit.layer,) if rule.layered else () if rule.stack_at is None else (rule.stack_at,)
    target = out.unsqueeze(0) if prefix else out
    writer.tensor(rule.target_key, target, prefix + (a, 0, 0), rule.target_shape)


def _worker_main(job: Job, queue) -> None:
    """Entry point of a spawned worker: progress and the result go back through the queue."""
    try:
        torch.set_num_threads(1)
        records, sums = run_job(job, lambda n, r, w: queue.put(("progress", job.worker, n, r, w)))
        queue.put(("done", job.worker, records, sums, peak_rss_mb()))
    except BaseException as error:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        queue.put(("error", job.worker, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))


# ----------------------------------------------------------------------------------------- driver
@dataclass
class _Progress:
    """Progress lines: tensors and bytes done, throughput, ETA (at most one line a second)."""

    units: int
    total_bytes: int
    print_fn: Callable[[str], None]
    start: float = 0.0
    last: float = 0.0

    def __post_init__(self):
        self.start = self.last = time.monotonic()
        self.state: dict[int, tuple[int, int, int]] = {}

    def update(self, worker: int, n: int, read: int, written: int, force: bool = False) -> None:
        self.state[worker] = (n, read, written)
        now = time.monotonic()
        if not force and now - self.last < 1.0:
            return
        self.last = now
        n, read, written = (sum(v[i] for v in self.state.values()) for i in range(3))
        elapsed = max(now - self.start, 1e-9)
        rate = (read + written) / elapsed
        left = max(0, self.total_bytes - read - written)
        eta = left / rate if rate > 0 else float("inf")
        self.print_fn(f"prune: {n}/{self.units} chunks, {read / 1e6:.1f} MB read, {written / 1e6:.1f} MB written, "
                      f"{rate / 1e6:.1f} MB/s, ETA {eta:.0f}s")


def _spawn(jobs: list[Job], progress: _Progress, peaks: dict, meanwhile: Callable[[], None]
           ) -> tuple[list[storage.Record], dict[str, dict]]:
    """Run the jobs in worker processes; `meanwhile` runs here once they have started."""
    import multiprocessing as mp

    # fork, as torch's DataLoader does: a spawned worker re-imports torch (~4 s each, measured on
    # 2 cores ~10 s for two), longer than rewriting a GB. Workers only read and write files and set
    # one intra-op thread before any torch op (the DataLoader rule that keeps OpenMP fork-safe).
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(job, queue), daemon=True) for job in jobs]
    for p in procs:
        p.start()
    records: list[storage.Record] = []
    sums: dict[str, dict] = {}
    pending = {job.worker for job in jobs}
    try:
        meanwhile()
        while pending:
            try:
                message = queue.get(timeout=1.0)
            except Exception:  # queue.Empty: check that nobody died silently
                dead = [j.worker for j, p in zip(jobs, procs) if j.worker in pending and p.exitcode not in (None, 0)]
                if dead:
                    raise PruneError(f"prune worker {dead[0]} died (exit code "
                                     f"{procs[dead[0]].exitcode}) before finishing its share") from None
                continue
            kind, worker = message[0], message[1]
            if kind == "progress":
                progress.update(worker, *message[2:])
            elif kind == "done":
                records += message[2]
                sums.update(message[3])
                peaks[worker] = message[4]
                pending.discard(worker)
            else:
                raise PruneError(f"prune worker {worker} failed: {message[2]}")
    finally:
        for p in procs:
            if p.is_alive() and pending:
                p.kill()
            p.join()
    return records, sums


def prune_checkpoint(source: str | os.PathLike, plan: Plan, out: str | os.PathLike, *, workers: int = 1,
                     overwrite: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                     head_scores: Optional[torch.Tensor] = None, group=None,
                     print_fn: Callable[[str], None] = print, stats: Optional[dict] = None,
                     fsync: bool = True) -> Path:
    """Write the pruned checkpoint of `source` under `out` (Megatron-LM layout, `release/`).

    workers: spawned processes (1: in this process). group: a torch.distributed process group whose
    ranks share the work instead (every rank calls this; rank 0 validates and finalises).
    head_scores: [layers, heads] importance of the source heads, needed when plan.head_merge.
    fsync: flush every written file to disk before the final rename (off only to measure).
    stats: filled (on rank 0) with seconds, bytes_read, bytes_written, units and each worker's peak RSS.
    Returns the torch_dist directory of the new checkpoint.
    """
    import torch.distributed as dist

    out = Path(out)
    rank = dist.get_rank(group) if group is not None else 0
    world = dist.get_world_size(group) if group is not None else 1
    partial = out.parent / f".{out.name}.partial"
    if workers < 1:
        raise PruneError(f"--workers must be >= 1, got {workers}")
    if chunk_bytes < 1:
        raise PruneError(f"chunk_bytes must be >= 1, got {chunk_bytes}")

    error, prepared = None, None
    if rank == 0:
        try:
            prepared = _prepare(Path(source), plan, out, overwrite, head_scores, chunk_bytes)
        except (PruneError, ckpt.CheckpointError, ValueError) as e:
            error = e
    if group is not None:
        box = [error is None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        if not box[0]:
            if error is not None:
                raise error
            raise PruneError("rank 0 refused the inputs (see its error)")
    elif error is not None:
        raise error

    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "release").mkdir(parents=True)
    if group is not None:
        dist.barrier(group=group)
    if prepared is not None:  # rank 0: what _prepare resolved, read and planned
        info, metadata, units = prepared.info, prepared.metadata, prepared.units
    else:
        info = ckpt.resolve(source)
        metadata = storage.read_dcp_metadata(info.path)
        units = plan_units(metadata, plan, head_scores, chunk_bytes)
    total = sum(u.read_bytes + u.write_bytes for u in units)
    progress = _Progress(units=len(units), total_bytes=total, print_fn=print_fn if rank == 0 else (lambda s: None))
    n_workers = world if group is not None else workers
    shares = split_units(units, n_workers)
    jobs = [Job(source=str(info.path), partial=str(partial / "release"), plan=plan,
                head_scores=head_scores, units=tuple(share), worker=w, fsync=fsync, metadata=metadata)
            for w, share in enumerate(shares)]
    peaks: dict = {}
    side_files = (lambda: _write_side_files(partial, prepared)) if rank == 0 else (lambda: None)
    try:
        if group is not None:
            side_files()
            mine = run_job(jobs[rank], lambda n, r, w: progress.update(rank, n, r, w))
            gathered = [None] * world
            dist.all_gather_object(gathered, mine, group=group)
            records = [r for part, _ in gathered for r in part]
            sums = {name: entry for _, part in gathered for name, entry in part.items()}
        elif workers == 1:
            side_files()
            records, sums = run_job(jobs[0], lambda n, r, w: progress.update(0, n, r, w))
        else:
            records, sums = _spawn(jobs, progress, peaks, meanwhile=side_files)
        progress.update(-1, 0, 0, 0, force=True)
        if workers == 1 or group is not None:
            peaks[rank] = peak_rss_mb()
        if rank == 0:
            _finalize(partial, out, prepared, records, sums, overwrite, fsync)
            if stats is not None:
                read, written = (sum(v[i] for v in progress.state.values()) for i in (1, 2))
                stats.update(seconds=time.monotonic() - progress.start, bytes_read=read, bytes_written=written,
                             units=len(units), workers=n_workers, peak_rss_mb=dict(sorted(peaks.items())))
            print_fn(f"prune: wrote {out} ({plan.target.num_parameters():,} parameters, "
                     f"{time.monotonic() - progress.start:.1f}s)")
    except BaseException as failure:
        full = isinstance(failure, (OSError, RuntimeError, PruneError)) and ckpt.disk_full(partial, failure)
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        if full:
            raise ckpt.disk_full_error(out, "could not write the pruned checkpoint") from None
        raise
    if group is not None:
        dist.barrier(group=group)
    return ckpt.iteration_dir(out, None)


@dataclass
class _Prepared:
    info: ckpt.CheckpointInfo
    plan: Plan
    common: dict
    megatron_meta: dict
    tokenizer: Optional[dict]
    metadata: object
    """The source's DCP Metadata, unpickled once for the checks, the units and every forked worker."""
    units: list
    """plan_units of the source: planned once, as the check that every key is known, and then run."""


def _prepare(source: Path, plan: Plan, out: Path, overwrite: bool, head_scores, chunk_bytes: int) -> _Prepared:
    """Every check that can fail, before anything is written."""
    info = resolve_source(source)
    plan.validate()
    ckpt.check_architecture(plan.source, info.arch, where=f"{info.path} (the plan's source)")
    _check_paths(info.root, out, overwrite)
    metadata = storage.read_dcp_metadata(info.path)  # (its shard files were checked by ckpt.resolve)
    units = plan_units(metadata, plan, head_scores, chunk_bytes)  # raises on unknown or mismatched keys
    common = _common_state(info, plan)
    megatron_meta = _megatron_metadata(info)
    tokenizer = info.tokenizer
    if tokenizer is not None and not Path(tokenizer["path"]).exists():
        if info.origin == "minitron":
            raise PruneError(f"the source's tokenizer {tokenizer['path']} is missing; the pruned checkpoint "
                             f"could not carry it")
        tokenizer = None  # a Megatron-LM checkpoint naming a tokenizer on another machine
    return _Prepared(info=info, plan=plan, common=common, megatron_meta=megatron_meta, tokenizer=tokenizer,
                     metadata=metadata, units=units)


def _write_side_files(partial: Path, prepared: _Prepared) -> None:
    """The files that do not depend on what the workers write: common state, minitron.json, tokenizer.
    Written while forked workers run (the coordinator only waits for them): measured on the 4x MoE model of
    benchmarks/prune_throughput.py, encoding the plan into minitron.json alone took 26 ms of thread CPU time."""
    release = partial / "release"
    torch.save(prepared.common, release / "common.pt")
    info, plan = prepared.info, prepared.plan
    meta = {"format": ckpt.FORMAT, "architecture": plan.target.explicit().to_json(), "iteration": 0,
            "num_parameters": plan.target.num_parameters(),
            "provenance": {"pruned_from": str(info.root.resolve()), "source_iteration": info.iteration,
                           "source_fingerprint": plan.source_fingerprint, "scores": plan.scores,
                           "head_merge": plan.head_merge},
            "plan": plan.to_json()}
    if prepared.tokenizer is not None:
        meta["tokenizer"] = ckpt.copy_tokenizer(partial, prepared.tokenizer)
    (release / ckpt.META).write_text(ckpt.meta_text(meta))


def _finalize(partial: Path, out: Path, prepared: _Prepared, records: list[storage.Record], shards: dict[str, dict],
              overwrite: bool, fsync: bool) -> None:
    """The DCP metadata of what the workers wrote, megatron's metadata.json, checksums, tracker; then the
    rename into place (the side files are written by then). shards: the checksums.json entries of the
    shard files, hashed by the workers as they wrote them."""
    release = partial / "release"
    storage.write_metadata(release, records, fsync=fsync)
    # megatron's marker of a finished torch_dist directory, then the tracker: both last.
    (release / "metadata.json").write_text(json.dumps(prepared.megatron_meta))
    write_checksums(release, known=shards)
    (partial / ckpt.TRACKER).write_text("release")
    ckpt.move_into_place(partial, out, overwrite=overwrite, error=PruneError)

