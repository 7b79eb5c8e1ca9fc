"""`minitron preprocess`: text/jsonl files -> Megatron indexed dataset (.bin/.idx).

    minitron preprocess --input corpus.jsonl --tokenizer tokenizer.model --output-prefix data/corpus

The output is what Megatron-LM's tools/preprocess_data.py writes (one sequence per document, EOD
appended), so it feeds `minitron pretrain --data-path data/corpus` and Megatron-LM alike.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True,
                        help=".jsonl (one JSON object per line) or .txt (documents separated by blank lines) files")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", default=None,
                        help="SentencePiece .model or HF tokenizer.json (default: the embedded-corpus tokenizer)")
    parser.add_argument("--cache-dir", default=".cache/minitron-data", help="where the default tokenizer lives")
    parser.add_argument("--json-key", default="text", help="field of each JSON line holding the text")
    parser.add_argument("--no-append-eod", action="store_true", help="do not end each document with EOD")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")


def run(args: argparse.Namespace) -> int:
    from megatron_minitron.data.preprocess import preprocess
    from megatron_minitron.data.tokenizer import default_tokenizer, tokenizer_ref_for

    ref = tokenizer_ref_for(args.tokenizer) if args.tokenizer else default_tokenizer(args.cache_dir)
    stats = preprocess(args.input, ref.load(), args.output_prefix, json_key=args.json_key,
                       append_eod=not args.no_append_eod, overwrite=args.overwrite)
    print(json.dumps({**stats, "tokenizer": ref.to_json()}, indent=2))
    return 0
