"""`minitron import-hf --hf DIR --save CKPT`: a local Hugging Face model directory (config.json,
safetensors with or without an index, tokenizer) -> a self-describing torch_dist checkpoint that every
other subcommand loads without architecture or tokenizer flags. One process, no network, streaming.

    minitron import-hf --hf models/Llama-3.1-8B --save runs/teacher --tp 2
"""

from __future__ import annotations

import argparse

from megatron_minitron.flags import positive


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, metavar="DIR", help="local Hugging Face model directory")
    parser.add_argument("--save", required=True, metavar="CKPT", help="new checkpoint directory")
    parser.add_argument("--tp", type=positive(), default=1,
                        help="tensor-parallel size the checkpoint is meant for: pads the vocabulary to a multiple of "
                             "128 x TP and checks it divides heads and MLP (it loads at any layout)")
    parser.add_argument("--pp", type=positive(), default=1, help="pipeline-parallel size to check the layer count against")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="convert every tensor (default: keep the stored dtypes)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save directory")


def run(args: argparse.Namespace) -> int:
    from megatron_minitron.hf.importer import import_hf

    import_hf(args.hf, args.save, tensor_parallel=args.tp, pipeline_parallel=args.pp, dtype=args.dtype,
              overwrite=args.overwrite)
    return 0
