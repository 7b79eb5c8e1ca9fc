"""`minitron SUBCOMMAND ...`: one module per subcommand; each imports its heavy dependencies only
when it runs, so `minitron --help` and argument errors are instant."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

SUBCOMMANDS = {
    "pretrain": ("megatron_minitron.cli.pretrain", "train a model (from scratch or from a checkpoint) with megatron"),
    "preprocess": ("megatron_minitron.cli.preprocess", "tokenize text/jsonl into a Megatron indexed dataset"),
    "importance": ("megatron_minitron.cli.importance", "score heads, neurons, hidden channels and layers"),
    "prune": ("megatron_minitron.cli.prune", "rewrite a checkpoint into its pruned version (streaming, N workers)"),
    "distill": ("megatron_minitron.cli.distill", "retrain a pruned student by distillation from its teacher"),
    "cache-logits": ("megatron_minitron.cli.cache_logits", "store the teacher's top-k logits once for many students"),
    "search": ("megatron_minitron.cli.search", "find the best student shape within a parameter budget"),
    "inspect": ("megatron_minitron.cli.inspect", "print a checkpoint's architecture and parameter count"),
    "demo": ("megatron_minitron.cli.demo", "the whole method on the embedded corpus, with a report"),
    "evaluate": ("megatron_minitron.cli.evaluate", "validation loss or lm-eval task scores of a checkpoint"),
    "import-hf": ("megatron_minitron.cli.import_hf", "convert a local Hugging Face model directory to a checkpoint"),
    "export-hf": ("megatron_minitron.cli.export_hf", "convert a checkpoint to a Hugging Face model directory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minitron", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `minitron` console script and `python -m megatron_minitron`."""
    from megatron_minitron.config import ConfigError

    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        from megatron_minitron.cli._common import check_writable_dir

        # every subcommand writes its output (--save, --out) and its cache (--cache-dir) somewhere: a file there
        # or a directory it cannot write to (read-only filesystem, permissions) is refused before any work
        for flag in (*getattr(module, "OUTPUT_DIRS", ("save", "out")), "cache_dir"):
            if isinstance(getattr(args, flag, None), (str, os.PathLike)):
                check_writable_dir(getattr(args, flag), "--" + flag.replace("_", "-"))
        return int(module.run(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        # Bad input: one clear line, no traceback (every rank prints the same line).
        print(f"minitron {args.command}: error: {error}", file=sys.stderr)
        return 2
