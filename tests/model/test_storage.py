"""The torch_dist writer of model/storage.py, read back by torch.distributed.checkpoint itself."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp

from megatron_minitron.model.storage import ChunkWriter, Scratch, write_metadata


def test_a_view_into_a_larger_scratch_buffer_writes_only_its_own_bytes(tmp_path):
    """torch.save writes a view's whole storage; the pruner's selections are views into reused scratch
    buffers larger than the selection, which once made a pruned 8B checkpoint 37% larger than its tensors."""
    scratch = Scratch()
    scratch.take("rows", (4096,), torch.float32)  # grow the buffer first, as an earlier larger selection does
    source = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([3, 1, 60, 7])
    chunk = torch.index_select(source, 0, index, out=scratch.take("rows", (4, 32), torch.float32))
    assert chunk.untyped_storage().nbytes() == 4096 * 4  # the view sits in the larger buffer
    offset = torch.arange(6, dtype=torch.float32).reshape(2, 3)[1:]  # a view with a storage offset
    writer = ChunkWriter(tmp_path, "__0_0.distcp", fsync=False)
    writer.tensor("a", chunk, (0, 0), (4, 32))
    writer.tensor("b", offset, (0, 0), (1, 3))
    writer.close()
    write_metadata(tmp_path, writer.records)
    own = chunk.numel() * 4 + offset.numel() * 4
    assert (tmp_path / "__0_0.distcp").stat().st_size < own + 2 * 2048  # archive headers, not 16 KB of buffer
    loaded = {"a": torch.empty(4, 32), "b": torch.empty(1, 3)}
    dcp.load(loaded, storage_reader=dcp.FileSystemReader(str(tmp_path)))
    assert torch.equal(loaded["a"], source[index]) and torch.equal(loaded["b"], torch.tensor([[3.0, 4.0, 5.0]]))


def test_rows_at_layer_and_expert_equal_slicing_in_every_chunk_layout(tmp_path):
    """read_rows at (layer, expert): per-expert GLU halves (megatron's layout), one chunk per layer holding every
    expert, and one chunk for the whole tensor; whole rows, rows across the halves, and selected rows."""
    from megatron_minitron.model.storage import SourceReader

    full = torch.randn(3, 4, 10, 6, generator=torch.Generator().manual_seed(1))  # [layer, expert, 2 x 5 rows, cols]
    layouts = {"halves": [(l, e, h) for l in range(3) for e in range(4) for h in range(2)],
               "layers": [(l, None, None) for l in range(3)], "whole": [(None, None, None)]}
    for name, chunks in layouts.items():
        directory = tmp_path / name
        directory.mkdir()
        writer = ChunkWriter(directory, "__0_0.distcp", fsync=False)
        for l, e, h in chunks:
            if l is None:
                writer.tensor("w", full, (0, 0, 0, 0), tuple(full.shape))
            elif e is None:
                writer.tensor("w", full[l:l + 1], (l, 0, 0, 0), tuple(full.shape))
            else:
                writer.tensor("w", full[l:l + 1, e:e + 1, 5 * h:5 * h + 5], (l, e, 5 * h, 0), tuple(full.shape))
        writer.close()
        write_metadata(directory, writer.records, fsync=False)
        reader = SourceReader(directory)
        for layer, expert in ((0, 0), (2, 3), (1, 2)):
            want = full[layer, expert]
            assert torch.equal(reader.read_rows("w", (layer, expert), 0, 10), want), name
            assert torch.equal(reader.read_rows("w", (layer, expert), 3, 8), want[3:8]), name
            scratch = Scratch()
            got = reader.read_rows("w", (layer, expert), 0, 10, scratch=scratch)
            assert torch.equal(got, want), name
            if name == "halves":  # both halves copied from their mappings into the scratch buffer (no fresh tensor)
                assert got.data_ptr() == scratch.buffers["rows"].data_ptr()
            index = torch.tensor([0, 2, 5, 9])
            for scratch in (None, Scratch()):
                got = reader.read_rows("w", (layer, expert), 0, 10, index=index, scratch=scratch)
                assert torch.equal(got, want[index]), name
        assert torch.equal(reader.read_rows("w", 1, 1, 3), full[1, 1:3]), name  # the expert axis as rows
        reader.close()
