"""`minitron inspect CKPT`: architecture, parameter count and provenance of a checkpoint, read from
its metadata only (no process group, no weights loaded).

    minitron inspect runs/teacher
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory (ours or Megatron-LM's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--tensors", action="store_true", help="also list every stored tensor and its global shape")
    parser.add_argument("--verify", action="store_true",
                        help="re-read every file and compare it with the checksums recorded when it was written")


def run(args: argparse.Namespace) -> int:
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.model.integrity import IntegrityError, check_complete, verify
    from megatron_minitron.prune.rewrite import resolve_source

    info = resolve_source(args.checkpoint)  # names a damaged .metadata or minitron.json
    data_bytes = check_complete(info.path)  # every file present, .metadata readable, shards long enough
    health = f"complete ({data_bytes:,} bytes of tensors)"
    if args.verify:
        problems = verify(info.path)
        if problems:
            raise IntegrityError(f"{info.path} is damaged: " + "; ".join(problems))
        health += ", every file matches its checksum"
    arch = info.arch
    report = {"path": str(info.path), "origin": info.origin, "iteration": info.iteration,
              "architecture": arch.explicit().to_json(), "num_parameters": arch.num_parameters(),
              "num_parameters_without_embeddings": arch.num_parameters(include_embeddings=False),
              "num_active_parameters": arch.num_active_parameters(),
              "tokenizer": info.tokenizer, "saved_with": info.metadata.get("saved_with"),
              "provenance": info.metadata.get("provenance"), "plan": info.metadata.get("plan"), "health": health}
    if args.tensors:
        report["tensors"] = {k: list(v) for k, v in sorted(ckpt.tensor_shapes(info.path).items())}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{info.path}  ({info.origin} checkpoint, iteration {info.iteration}): {health}")
    print(f"parameters: {report['num_parameters']:,} ({report['num_parameters_without_embeddings']:,} without "
          f"embeddings)")
    if arch.is_moe:
        print(f"active per token: {report['num_active_parameters']:,} ({arch.num_experts} experts, "
              f"top-{arch.moe_router_topk})")
    for key, value in report["architecture"].items():
        print(f"  {key:36s} {value}")
    for key in ("tokenizer", "saved_with", "provenance"):
        if report[key]:
            print(f"{key}: {json.dumps(report[key])}")
    if report["plan"]:  # a pruned checkpoint: what was kept, readable (the indices are in --json)
        from megatron_minitron.plan.plan import Plan

        print(Plan.from_json(report["plan"]).summary())
    for key, shape in report.get("tensors", {}).items():
        print(f"  {key:70s} {shape}")
    return 0
