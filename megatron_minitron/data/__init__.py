"""Data layer of megatron-minitron.

Modules:

* ``corpus``     -- a default text corpus built from the CPython standard library's docstrings.
* ``tokenizer``  -- SentencePiece / Hugging Face tokenizers usable by megatron-core datasets.
* ``preprocess`` -- ``.jsonl`` / ``.txt`` files to Megatron indexed datasets (``.bin``/``.idx``).
* ``loader``     -- ``DataConfig``, GPT dataset construction and data-parallel micro-batches.

Import the submodules directly; this package imports nothing heavy on its own.
"""
