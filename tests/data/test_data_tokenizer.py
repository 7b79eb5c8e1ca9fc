"""Tests of the SentencePiece / Hugging Face tokenizers and tokenizer references."""

from __future__ import annotations

import json
import os

import pytest
from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

from megatron_minitron.data import tokenizer as tk
from megatron_minitron.data.corpus import embedded_documents

SAMPLE_TEXTS = [
    "Return the number of items in a container.",
    "  leading spaces,\ttabs\tand  double  spaces  ",
    "def f(x):\n    return x ** 2  # squared\n\n\nclass A:\n    pass\n",
    "Unicode: ünïcödé, ☃ snowman, 日本語, emoji 🐍, and a CRLF line\r\n",
    "digits 1234567890 and symbols {}[]()<>!?@#$%^&*~`|\\",
]


def _train_hf_tokenizer_json(path) -> str:
    """Train a tiny byte-level BPE tokenizer with an <|endoftext|> token; save it to path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(embedded_documents("valid"), trainer=trainer)
    hf.save(str(path))
    return str(path)


def test_sentencepiece_round_trips_exactly(sp_tokenizer) -> None:
    for text in SAMPLE_TEXTS + embedded_documents("valid")[:20]:
        ids = sp_tokenizer.tokenize(text)
        assert all(isinstance(i, int) for i in ids)
        assert sp_tokenizer.detokenize(ids) == text


def test_sentencepiece_batch_matches_single(sp_tokenizer) -> None:
    assert sp_tokenizer.tokenize_batch(SAMPLE_TEXTS) == [
        sp_tokenizer.tokenize(text) for text in SAMPLE_TEXTS
    ]


def test_sentencepiece_special_ids_and_megatron_interface(sp_tokenizer, sp_model_path) -> None:
    assert sp_tokenizer.vocab_size == 600
    assert (sp_tokenizer.eod, sp_tokenizer.pad, sp_tokenizer.bos) == (2, 3, 1)
    assert isinstance(sp_tokenizer, MegatronLegacyTokenizer)
    assert sp_tokenizer.unique_identifiers["class"] == "SentencePieceTokenizer"
    assert sp_tokenizer.unique_identifiers["tokenizer_path"] == [sp_model_path]
    assert sp_tokenizer.vocab["</s>"] == 2
    assert sp_tokenizer.inv_vocab[2] == "</s>"
    assert sp_tokenizer.eod not in sp_tokenizer.tokenize("</s> is plain text here")


def test_sentencepiece_training_is_deterministic(tmp_path) -> None:
    texts = embedded_documents("train")[:150]
    first = tk.train_sentencepiece(texts, 400, str(tmp_path / "a"), seed=3)
    second = tk.train_sentencepiece(texts, 400, str(tmp_path / "b"), seed=3)
    assert first == str(tmp_path / "a.model")
    with open(first, "rb") as a, open(second, "rb") as b:
        assert a.read() == b.read()
    assert sorted(os.listdir(tmp_path)) == ["a.model", "b.model"]


def test_sentencepiece_rejects_tiny_vocab_and_missing_model(tmp_path) -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        tk.train_sentencepiece(["some text"], 100, str(tmp_path / "tiny"))
    # 300 pieces pass the absolute minimum but not the ~50 distinct characters of real text
    with pytest.raises(ValueError, match="vocab_size=300 is too small for this text"):
        tk.train_sentencepiece(embedded_documents("train")[:50], 300, str(tmp_path / "small"))
    assert os.listdir(tmp_path) == []
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tk.SentencePieceTokenizer(missing)


def test_hf_tokenizer_round_trip_and_eod(tmp_path) -> None:
    path = _train_hf_tokenizer_json(tmp_path / "tokenizer.json")
    hf = tk.HFTokenizer(path)
    with open(path, encoding="utf-8") as stream:
        vocab = json.load(stream)["model"]["vocab"]
    assert hf.eod == vocab["<|endoftext|>"]
    assert hf.pad == vocab["<pad>"]
    assert hf.bos is None
    assert hf.vocab_size == 400
    for text in SAMPLE_TEXTS:
        assert hf.detokenize(hf.tokenize(text)) == text
    assert hf.tokenize_batch(SAMPLE_TEXTS) == [hf.tokenize(text) for text in SAMPLE_TEXTS]
    # a directory holding tokenizer.json works too, via a TokenizerRef
    ref = tk.tokenizer_ref_for(str(tmp_path))
    assert ref.kind == "huggingface"
    assert ref.load().eod == hf.eod


def test_hf_tokenizer_explicit_and_missing_eod(tmp_path) -> None:
    path = _train_hf_tokenizer_json(tmp_path / "tokenizer.json")
    explicit = tk.HFTokenizer(path, eod_token="<pad>")
    assert explicit.eod == tk.HFTokenizer(path).pad
    assert explicit.ref == tk.TokenizerRef(kind="huggingface", path=path, eod_token="<pad>")
    assert explicit.ref.load().eod == explicit.eod
    with pytest.raises(ValueError, match="tokenizer.json.*<nope>"):
        tk.HFTokenizer(path, eod_token="<nope>")


def test_hf_tokenizer_without_any_known_eod_names_the_file(tmp_path) -> None:
    from tokenizers import Tokenizer, models

    hf = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    path = tmp_path / "noeos.json"
    hf.save(str(path))
    with pytest.raises(ValueError, match="noeos.json"):
        tk.HFTokenizer(str(path))


def test_tokenizer_ref_json_round_trip_and_validation(sp_model_path) -> None:
    ref = tk.tokenizer_ref_for(sp_model_path)
    assert ref == tk.TokenizerRef(kind="sentencepiece", path=sp_model_path)
    assert ref.load().ref == ref
    assert tk.TokenizerRef.from_json(json.loads(json.dumps(ref.to_json()))) == ref
    assert ref.load().vocab_size == 600
    with pytest.raises(ValueError, match="'bpe'"):
        tk.TokenizerRef(kind="bpe", path=sp_model_path)
    with pytest.raises(ValueError, match="colour"):
        tk.TokenizerRef.from_json({"kind": "sentencepiece", "path": sp_model_path, "colour": 1})


def test_tokenizer_ref_for_rejects_unknown_and_missing_paths(tmp_path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nb\n")
    with pytest.raises(ValueError, match="vocab.txt"):
        tk.tokenizer_ref_for(str(vocab))
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tk.tokenizer_ref_for(str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="no tokenizer.json"):
        tk.tokenizer_ref_for(str(tmp_path))


def test_default_tokenizer_is_trained_once_and_cached(tmp_path, monkeypatch) -> None:
    ref = tk.default_tokenizer(str(tmp_path), vocab_size=1000)
    assert ref.kind == "sentencepiece"
    assert ref.path.startswith(str(tmp_path / "tokenizers"))
    tokenizer = ref.load()
    assert tokenizer.vocab_size == 1000
    text = embedded_documents("valid")[0]
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text

    def fail(*args, **kwargs):
        raise AssertionError("default_tokenizer retrained a cached model")

    monkeypatch.setattr(tk, "train_sentencepiece", fail)
    assert tk.default_tokenizer(str(tmp_path), vocab_size=1000) == ref
    assert os.listdir(tmp_path / "tokenizers") == [os.path.basename(ref.path)]


def test_fingerprint_follows_file_contents_not_path(tmp_path, sp_model_path) -> None:
    copy = tmp_path / "copy.model"
    with open(sp_model_path, "rb") as stream:
        copy.write_bytes(stream.read())
    original = tk.SentencePieceTokenizer(sp_model_path)
    assert tk.SentencePieceTokenizer(str(copy)).fingerprint == original.fingerprint
    # a small vocabulary: rare characters lose their own piece but still round-trip as bytes
    other = tk.SentencePieceTokenizer(
        tk.train_sentencepiece(embedded_documents("train")[:50], 320, str(tmp_path / "other"))
    )
    assert other.fingerprint != original.fingerprint
    for text in SAMPLE_TEXTS:
        assert other.detokenize(other.tokenize(text)) == text
