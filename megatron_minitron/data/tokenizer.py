"""Tokenizers usable both by this package and by megatron-core's GPT datasets.

``Tokenizer`` subclasses megatron-core's ``MegatronLegacyTokenizer`` so an instance can be
passed as ``GPTDatasetConfig(tokenizer=...)``. What GPTDataset actually uses is small:
``eod`` (loss/position masks), ``pad`` (padding of partial samples; megatron replaces it by
-1 when it collides with ``eod``), ``vocab_size`` (token dtype) and ``unique_identifiers``
(hashed into the names of its cached sample indices).

Two backends: ``SentencePieceTokenizer`` (a ``.model`` file) and ``HFTokenizer`` (a Hugging
Face ``tokenizer.json``, needs the optional ``tokenizers`` package). ``TokenizerRef`` is the
serialisable pointer to either, and ``default_tokenizer`` trains (once, cached) a
SentencePiece model on the embedded standard-library corpus.
"""

from __future__ import annotations

import abc
import dataclasses
import io
import json
import os
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

from megatron_minitron.data.files import atomic_path, file_sha1, text_sha1

SENTENCEPIECE = "sentencepiece"
"""``TokenizerRef.kind`` of a SentencePiece ``.model`` file."""

HUGGINGFACE = "huggingface"
"""``TokenizerRef.kind`` of a Hugging Face ``tokenizer.json`` file."""

TOKENIZER_KINDS = (SENTENCEPIECE, HUGGINGFACE)
"""All accepted ``TokenizerRef.kind`` values."""

HF_EOD_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
"""Token strings tried, in order, as the end-of-document token of a Hugging Face tokenizer."""

HF_PAD_TOKENS = ("<pad>", "<|pad|>", "[PAD]")
"""Token strings tried, in order, as the padding token of a Hugging Face tokenizer."""

HF_BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>")
"""Token strings tried, in order, as the beginning-of-sequence token of a Hugging Face tokenizer."""

SP_UNK_ID, SP_BOS_ID, SP_EOS_ID, SP_PAD_ID = 0, 1, 2, 3
"""Special-token ids of every model trained by ``train_sentencepiece``."""

_SP_META_PIECES = 4 + 256
"""Pieces every trained model spends on unk/bos/eos/pad and the 256 byte-fallback pieces."""

_SP_CHARACTER_COVERAGE = 0.9999
"""Share of the training text's characters that get their own piece when the vocab allows."""

_SP_MIN_CHARACTER_COVERAGE = 0.98
"""The lowest character_coverage SentencePiece accepts."""

MIN_SP_VOCAB_SIZE = 300
"""Smallest vocabulary ``train_sentencepiece`` accepts: 4 specials + 256 byte pieces + some."""


class Tokenizer(MegatronLegacyTokenizer):
    """Text <-> token ids, with the special ids megatron-core's GPT datasets need.

    Subclasses implement ``tokenize``, ``detokenize``, ``vocab_size``, ``eod``, ``vocab``
    and may override ``pad``/``bos`` and ``tokenize_batch``.
    """

    def __init__(self, path: str, **options: Any) -> None:
        # MegatronLegacyTokenizer.__init__ only fills these two attributes and logs a
        # deprecation warning on every construction; fill them ourselves, quietly. The
        # file's hash is included so a retrained model at the same path gets new
        # megatron index caches.
        self.path = path
        identifiers: OrderedDict[str, Any] = OrderedDict()
        identifiers["class"] = type(self).__name__
        identifiers["tokenizer_path"] = [path]
        identifiers["sha1"] = file_sha1(path)
        for name, value in options.items():
            identifiers[name] = str(value)
        self.unique_identifiers = identifiers
        self.unique_description = json.dumps(identifiers, indent=4)
        behaviour = {key: value for key, value in identifiers.items() if key != "tokenizer_path"}
        self._fingerprint = text_sha1(json.dumps(behaviour, sort_keys=True))

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Return the token ids of ``text`` (no BOS/EOS added)."""

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Return the token ids of each text; backends override this with a faster batch call."""
        return [self.tokenize(text) for text in texts]

    @abc.abstractmethod
    def detokenize(self, ids: Iterable[int]) -> str:
        """Return the text of the token ids ``ids``."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (largest id + 1)."""

    @property
    @abc.abstractmethod
    def eod(self) -> int:
        """The end-of-document id appended after every document."""

    @property
    def pad(self) -> int:
        """The padding id; ``eod`` when the tokenizer has no dedicated pad token."""
        return self.eod

    @property
    def bos(self) -> int | None:
        """The beginning-of-sequence id, or None when the tokenizer has none."""
        return None

    @property
    def eos(self) -> int:
        """Alias of ``eod`` (megatron-core checks both for pad collisions)."""
        return self.eod

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Mapping from token id to token string."""
        return {index: piece for piece, index in self.vocab.items()}

    @property
    def ref(self) -> TokenizerRef:
        """A TokenizerRef that reopens this tokenizer (for run configs and checkpoints)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be referenced by a TokenizerRef")

    @property
    def fingerprint(self) -> str:
        """A hex SHA-1 of the class, file contents and options (not the path), for cache keys."""
        return self._fingerprint


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (``.model``); EOD is the model's ``</s>`` (eos) id."""

    def __init__(self, model_path: str) -> None:
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"SentencePiece model {model_path!r} does not exist; train one with "
                "train_sentencepiece() or point to an existing .model file"
            )
        import sentencepiece

        super().__init__(model_path)
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as error:  # sentencepiece's parse failure is a RuntimeError
            raise ValueError(f"{model_path} is not a SentencePiece tokenizer model ({error})") from None
        if self._processor.eos_id() < 0:
            raise ValueError(
                f"SentencePiece model {model_path!r} has no eos token, which is needed as the "
                "end-of-document id; retrain it with eos_id set (train_sentencepiece does)"
            )

    def tokenize(self, text: str) -> list[int]:
        """Return the token ids of ``text``."""
        return self._processor.encode(text, out_type=int)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Return the token ids of each text, encoded in one native batch call."""
        return self._processor.encode(list(texts), out_type=int)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Return the text of ``ids``."""
        return self._processor.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the model."""
        return self._processor.get_piece_size()

    @property
    def vocab(self) -> dict[str, int]:
        """Mapping from piece string to id."""
        processor = self._processor
        return {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}

    @property
    def eod(self) -> int:
        """The model's eos id."""
        return self._processor.eos_id()

    @property
    def pad(self) -> int:
        """The model's pad id, or ``eod`` when the model has none."""
        pad_id = self._processor.pad_id()
        return pad_id if pad_id >= 0 else self.eod

    @property
    def bos(self) -> int | None:
        """The model's bos id, or None."""
        bos_id = self._processor.bos_id()
        return bos_id if bos_id >= 0 else None

    @property
    def ref(self) -> TokenizerRef:
        """A TokenizerRef to this model file (absolute path)."""
        return TokenizerRef(kind=SENTENCEPIECE, path=os.path.abspath(self.path))


def _import_tokenizers() -> Any:
    """Import the optional ``tokenizers`` package with an actionable error when missing."""
    try:
        import tokenizers
    except ImportError as error:
        raise ImportError(
            "HFTokenizer needs the Hugging Face 'tokenizers' package: pip install tokenizers"
        ) from error
    return tokenizers


def _resolve_tokenizer_json(path: str) -> str:
    """Return ``path`` itself, or ``path/tokenizer.json`` when ``path`` is a directory."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Hugging Face tokenizer file {path!r} does not exist; pass a tokenizer.json "
            "file or a directory containing one"
        )
    return path


def _first_known_token(tokenizer: Any, candidates: Sequence[str]) -> int | None:
    """Return the id of the first of ``candidates`` present in ``tokenizer``, else None."""
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` JSON file.

    The end-of-document id is ``eod_token`` when given, otherwise the first of
    ``HF_EOD_TOKENS`` the vocabulary contains.
    """

    def __init__(self, tokenizer_json_path: str, eod_token: str | None = None) -> None:
        tokenizers = _import_tokenizers()
        path = _resolve_tokenizer_json(os.fspath(tokenizer_json_path))
        super().__init__(path, eod_token=eod_token)
        self._eod_token = eod_token
        _check_tokenizer_json(path)
        self._tokenizer = tokenizers.Tokenizer.from_file(path)
        self._eod = self._find_eod(path, eod_token)
        self._pad = _first_known_token(self._tokenizer, HF_PAD_TOKENS)
        self._bos = _first_known_token(self._tokenizer, HF_BOS_TOKENS)

    def _find_eod(self, path: str, eod_token: str | None) -> int:
        """Return the end-of-document id, raising ValueError naming ``path`` if none exists."""
        candidates = (eod_token,) if eod_token is not None else HF_EOD_TOKENS
        eod = _first_known_token(self._tokenizer, candidates)
        if eod is None:
            raise ValueError(
                f"Hugging Face tokenizer {path!r} has none of the end-of-document tokens "
                f"{list(candidates)}; pass eod_token='<its eos token>'"
            )
        return eod

    def tokenize(self, text: str) -> list[int]:
        """Return the token ids of ``text`` without added special tokens."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Return the token ids of each text, encoded in one (parallel) batch call."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Return the text of ``ids``, special tokens included."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        """Mapping from token string to id, added tokens included."""
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def eod(self) -> int:
        """The end-of-document id."""
        return self._eod

    @property
    def pad(self) -> int:
        """The pad id, or ``eod`` when the vocabulary has no pad token."""
        return self._pad if self._pad is not None else self._eod

    @property
    def bos(self) -> int | None:
        """The beginning-of-sequence id, or None."""
        return self._bos

    @property
    def ref(self) -> TokenizerRef:
        """A TokenizerRef to this tokenizer.json (absolute path), keeping an explicit eod_token."""
        return TokenizerRef(
            kind=HUGGINGFACE, path=os.path.abspath(self.path), eod_token=self._eod_token
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerRef:
    """A serialisable reference to a tokenizer file."""

    kind: str
    """Backend: "sentencepiece" (a ``.model`` file) or "huggingface" (a ``tokenizer.json``)."""

    path: str
    """Path of the model file (or, for huggingface, of a directory holding tokenizer.json)."""

    eod_token: str | None = None
    """huggingface only: the end-of-document token string, when not one of HF_EOD_TOKENS."""

    def __post_init__(self) -> None:
        """Validate ``kind``, ``path`` and ``eod_token`` (ValueError names the bad value)."""
        if self.kind not in TOKENIZER_KINDS:
            raise ValueError(
                f"unknown tokenizer kind {self.kind!r}; use one of {', '.join(TOKENIZER_KINDS)}"
            )
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"tokenizer path must be a non-empty string, got {self.path!r}")
        if self.eod_token is not None and self.kind != HUGGINGFACE:
            raise ValueError(
                f"eod_token={self.eod_token!r} is only supported for kind 'huggingface'; "
                "a SentencePiece model's eos token is its end-of-document token"
            )

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict; ``from_json`` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenizerRef:
        """Build a TokenizerRef from ``to_json`` output, rejecting unknown keys."""
        from megatron_minitron.config import unknown_fields

        unknown = unknown_fields(cls, data)
        if unknown:
            known = {field.name for field in dataclasses.fields(cls)}
            raise ValueError(
                f"unknown TokenizerRef keys {unknown}; expected a subset of {sorted(known)}"
            )
        return cls(**data)

    def load(self) -> Tokenizer:
        """Open the referenced tokenizer."""
        if self.kind == SENTENCEPIECE:
            return SentencePieceTokenizer(self.path)
        return HFTokenizer(self.path, eod_token=self.eod_token)


def _check_tokenizer_json(path: str) -> None:
    """A clear error for a file that is not a Hugging Face tokenizer.json (the tokenizers library
    raises a bare Exception whose message names no file)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not a Hugging Face tokenizer file: not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{path} is not a Hugging Face tokenizer file: it has no 'model' object")


def tokenizer_ref_for(path: str, eod_token: str | None = None) -> TokenizerRef:
    """Guess a TokenizerRef from a file name.

    ``*.model`` is SentencePiece; a ``*.json`` file (normally ``tokenizer.json``) or a
    directory containing ``tokenizer.json`` is Hugging Face. The stored path is absolute.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return TokenizerRef(kind=HUGGINGFACE, path=path, eod_token=eod_token)
        raise ValueError(
            f"tokenizer directory {path!r} has no tokenizer.json; pass the model file itself"
        )
    if path.endswith(".model"):
        return TokenizerRef(kind=SENTENCEPIECE, path=path, eod_token=eod_token)
    if path.endswith(".json"):
        return TokenizerRef(kind=HUGGINGFACE, path=path, eod_token=eod_token)
    raise ValueError(
        f"cannot tell the tokenizer kind of {path!r}: expected a SentencePiece '.model' file, "
        "a Hugging Face 'tokenizer.json', or a directory containing tokenizer.json"
    )


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    """Yield the non-blank lines of ``texts`` in order: SentencePiece trains on lines."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def _characters_needed(ranked_counts: Sequence[int], coverage: float) -> int:
    """How many of the most frequent characters cover ``coverage`` of all characters."""
    total = sum(ranked_counts)
    accumulated = 0
    for needed, count in enumerate(ranked_counts, start=1):
        accumulated += count
        if accumulated / total >= coverage:
            return needed
    return len(ranked_counts)


def _character_coverage(lines: Sequence[str], vocab_size: int) -> float:
    """Pick SentencePiece's character_coverage so the kept characters fit the vocabulary.

    SentencePiece gives each character in the top ``character_coverage`` of the character
    mass its own piece and fails when those do not fit. Characters left out still encode
    through byte pieces, so for small vocabularies the coverage is lowered (SentencePiece
    allows down to 0.98) until the kept characters use at most half of the pieces left
    after the special and byte pieces. Raises ValueError naming ``vocab_size`` when even
    0.98 does not fit.
    """
    ranked = [count for _, count in Counter("".join(lines)).most_common()]
    budget = max(1, (vocab_size - _SP_META_PIECES) // 2)
    coverage = sum(ranked[:budget]) / sum(ranked)
    coverage = max(_SP_MIN_CHARACTER_COVERAGE, min(_SP_CHARACTER_COVERAGE, coverage))
    needed = _characters_needed(ranked, coverage) + _SP_META_PIECES
    if needed > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for this text: its common characters plus "
            f"the special and byte pieces need {needed} pieces; use vocab_size >= {needed}"
        )
    return coverage


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, out_prefix: str, seed: int = 0
) -> str:
    """Train a byte-fallback BPE SentencePiece model; return the path ``<out_prefix>.model``.

    The model encodes any text (unknown characters fall back to byte pieces) and decodes
    it back exactly: no normalisation, no whitespace collapsing, no dummy prefix. Special
    ids are fixed: unk=0, bos=1, eos=2 (the end-of-document id), pad=3. Training is
    deterministic -- one thread, input used in the given order without sampling -- so the
    same texts, vocab size and seed give byte-identical model files. The file is written
    under a temporary name and renamed into place.
    """
    if vocab_size < MIN_SP_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-fallback model; "
            f"use at least {MIN_SP_VOCAB_SIZE}"
        )
    lines = list(_training_lines(texts))
    if not lines:
        raise ValueError("train_sentencepiece got no non-blank text to train on")
    import sentencepiece

    sentencepiece.set_random_generator_seed(seed)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=_character_coverage(lines, vocab_size),
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16,
        unk_id=SP_UNK_ID,
        bos_id=SP_BOS_ID,
        eos_id=SP_EOS_ID,
        pad_id=SP_PAD_ID,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    model_path = f"{os.fspath(out_prefix)}.model"
    with atomic_path(model_path) as temp_path, open(temp_path, "wb") as stream:
        stream.write(model.getvalue())
    return model_path


def default_tokenizer_path(cache_dir: str, vocab_size: int = 8192) -> str:
    """Return where ``default_tokenizer`` keeps its model for this corpus and vocab size."""
    from megatron_minitron.data.corpus import corpus_fingerprint

    name = f"stdlib-bpe-v{vocab_size}-{corpus_fingerprint()[:12]}.model"
    return os.path.join(os.fspath(cache_dir), "tokenizers", name)


def default_tokenizer(cache_dir: str, vocab_size: int = 8192) -> TokenizerRef:
    """Return the default tokenizer: SentencePiece BPE trained on the embedded train corpus.

    The model is trained on first use and cached in ``cache_dir/tokenizers`` under a name
    holding the vocab size and a hash of the corpus sources, so later calls (and other
    processes) reuse it. Concurrent first calls are safe: each writes a complete file and
    renames it into place.
    """
    model_path = default_tokenizer_path(cache_dir, vocab_size)
    if not os.path.isfile(model_path):
        from megatron_minitron.data.corpus import embedded_documents

        train_sentencepiece(embedded_documents("train"), vocab_size, model_path[: -len(".model")])
    return TokenizerRef(kind=SENTENCEPIECE, path=os.path.abspath(model_path))
