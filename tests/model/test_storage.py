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
