"""`minitron export-hf --load CKPT --save DIR`: any checkpoint this project writes (imported, trained,
pruned, distilled) -> a Hugging Face model directory (config.json, safetensors shards with their index,
generation_config.json, tokenizer files) that transformers loads with no custom code. Streaming.

    minitron export-hf --load runs/student --save hf/student
"""

from __future__ import annotations

import argparse


FAMILY_CHOICES = ("gpt2", "llama", "mistral", "mixtral", "nemotron", "qwen2", "qwen3", "qwen3_moe")
"""hf.families.FAMILIES' names, spelled out so `minitron --help` imports nothing heavy (a test checks them)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, metavar="CKPT", help="checkpoint directory")
    parser.add_argument("--save", required=True, metavar="DIR", help="new Hugging Face model directory")
    parser.add_argument("--family", choices=FAMILY_CHOICES, default=None,
                        help="model_type to write (default: the imported source model's, else the family the "
                             "architecture fits: experts -> qwen3_moe with QK norm, else mixtral; learned positions "
                             "-> gpt2, QK norm -> qwen3, zero-centred norm or squared ReLU -> nemotron, QKV bias -> "
                             "qwen2, otherwise llama)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="convert every tensor (default: keep the stored dtypes)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save directory")


def run(args: argparse.Namespace) -> int:
    from megatron_minitron.hf.exporter import export_hf, parse_size

    export_hf(args.load, args.save, family=args.family, dtype=args.dtype,
              max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite)
    return 0
