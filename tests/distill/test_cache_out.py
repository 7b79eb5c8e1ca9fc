"""`cache-logits --out`: what it may replace. --overwrite deletes the directory, so it must only ever be a
logits cache; a damaged cache (unreadable manifest) is still replaceable."""

from __future__ import annotations

import pytest

from megatron_minitron.config import ConfigError, preset
from megatron_minitron.distill import logits_cache as lc

ARCH = preset("tiny")


def _manifest() -> lc.CacheManifest:
    return lc.CacheManifest(teacher="t", teacher_fingerprint="f", teacher_arch=ARCH.to_json(), tokenizer_fingerprint="x",
                            vocab_size=ARCH.vocab_size, padded_vocab=ARCH.padded_vocab,
                            data={"blend": None, "valid_blend": None, "split": "1", "seed": 4, "seq_length": 32},
                            train_iters=4, global_batch_size=8, eval_iters=0, top_k=16, temperature=1.0)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_that_is_not_a_cache_is_refused_even_with_overwrite(tmp_path, overwrite):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    with pytest.raises(ConfigError, match=f"--out {out} exists and is not a logits cache") as err:
        lc.plan_cache(out, _manifest(), overwrite=overwrite)
    assert ("--overwrite replaces only a logits cache" in str(err.value)) == overwrite
    assert (out / "notes.txt").read_text() == "a user's file"


def test_a_file_is_refused(tmp_path):
    out = tmp_path / "cache"
    out.write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        lc.plan_cache(out, _manifest(), overwrite=True)


def test_a_damaged_cache_is_refused_and_replaceable_with_overwrite(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / lc.MANIFEST).write_text("{not json")
    with pytest.raises(ConfigError, match="--overwrite"):
        lc.plan_cache(out, _manifest(), overwrite=False)
    todo = lc.plan_cache(out, _manifest(), overwrite=True)
    assert todo == {split: list(range(_manifest().num_shards(split))) for split in lc.SPLITS}
    assert todo["train"]  # the whole cache is to be written again


def test_an_empty_or_new_directory_gets_every_shard(tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new"):
        assert lc.plan_cache(out, _manifest(), overwrite=False) == {
            split: list(range(_manifest().num_shards(split))) for split in lc.SPLITS}
