"""Checksums recorded while a shard is written equal a re-hash of the file; a shard changed behind the
writer's back is refused when the checksums are recorded."""

from __future__ import annotations

import blake3
import pytest
import torch

from megatron_minitron.model.integrity import IntegrityError, compute_checksums, write_checksums
from megatron_minitron.model.storage import ChunkWriter, HashingFile, write_metadata


def test_hashing_file_hashes_small_and_threaded_writes_in_order(tmp_path):
    pieces = [b"head", bytes(range(256)) * 5000, b"", memoryview(torch.arange(700_000, dtype=torch.float32).numpy()),
              b"tail"]  # 1.28 MB and 2.8 MB pieces go through the helper thread, the others inline
    f = HashingFile(tmp_path / "x")
    assert [f.write(p) for p in pieces] == [memoryview(p).nbytes for p in pieces]
    f.close()
    data = (tmp_path / "x").read_bytes()
    assert f.checksum() == {"size": len(data), "blake3": blake3.blake3(data).hexdigest()}
    assert data == b"".join(bytes(p) for p in pieces)


def test_chunk_writer_checksum_equals_a_rehash_and_a_wrong_one_is_refused(tmp_path):
    writer = ChunkWriter(tmp_path, "__0_0.distcp", fsync=False)
    big = torch.randn(600, 1024, generator=torch.Generator().manual_seed(0))  # 2.4 MB: hashed on the thread
    writer.tensor("a", big, (0, 0), (600, 1024))
    writer.tensor("b", torch.ones(3, 5)[1:], (0, 0), (2, 5))
    writer.object("c", b"object bytes")
    writer.close()
    write_metadata(tmp_path, writer.records, fsync=False)
    (tmp_path / "metadata.json").write_text("{}")
    shard = (tmp_path / "__0_0.distcp").read_bytes()
    assert writer.checksum == {"size": len(shard), "blake3": blake3.blake3(shard).hexdigest()}
    recorded = write_checksums(tmp_path, known={writer.name: writer.checksum})
    assert recorded == compute_checksums(tmp_path)
    with open(tmp_path / "__0_0.distcp", "ab") as f:
        f.write(b"x")  # written after the writer closed: its size no longer agrees
    with pytest.raises(IntegrityError, match=r"__0_0\.distcp has \d+ bytes, \d+ were written"):
        write_checksums(tmp_path, known={writer.name: writer.checksum})
