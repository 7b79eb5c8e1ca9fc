"""`minitron search`: find the student shape within a parameter budget the Minitron way — prune every
candidate from the same importance scores, distill each briefly, keep the best validation loss.

    torchrun --nproc-per-node 2 -m megatron_minitron search --load runs/teacher --scores runs/scores \
        --budget 5M --tp 2 --train-iters 400 --out runs/search

The space is the paper's style of grid by default (depth 100-75%, hidden and MLP 100-50% in eighths,
heads 100-50%; query groups frozen), or per-axis flags, or --space JSON. OUT receives one directory per
candidate, search.json, search.md, search.png and best_plan.json (ready for `minitron prune --plan`);
--winner-iters N also prunes and distills the winner for N steps into OUT/winner (its result joins
search.json and search.md; its data order is that of a separate `minitron distill` of N steps). A
killed search continues with --resume from its last finished candidate.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from megatron_minitron.cli._common import (add_data_arguments, add_parallel_arguments, add_training_arguments,
                                           check_data_files, parallel_config, parse_blend, run_batches, tokenizer_json,
                                           train_config)
from megatron_minitron.flags import non_negative, positive
from megatron_minitron.config import ConfigError

AXIS_FLAGS = {"num_layers": "--layers", "hidden_size": "--hidden", "ffn_hidden_size": "--ffn",
              "num_attention_heads": "--heads", "num_query_groups": "--groups"}


def parse_count(text: str) -> int:
    """"5.2M", "4B", "850k" or a plain integer."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}
    text = str(text).strip().lower().replace(",", "").replace("_", "")
    try:
        count = int(float(text[:-1]) * scale[text[-1]]) if text and text[-1] in scale else int(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a parameter count (e.g. 4B, 5.2M, 850k)") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be a positive parameter count, got {text}")
    return count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_minitron.cli.distill import add_loss_arguments

    parser.add_argument("--load", required=True, help="the unpruned model (the teacher of every candidate)")
    parser.add_argument("--scores", required=True, help="its scores directory (`minitron importance`)")
    parser.add_argument("--allow-foreign-scores", action="store_true",
                        help="use --scores computed on another checkpoint than --load (warns; by default refused)")
    parser.add_argument("--out", required=True, help="search directory")
    parser.add_argument("--resume", action="store_true", help="continue the search in --out")
    parser.add_argument("--overwrite", action="store_true", help="delete a previous search in --out first")
    s = parser.add_argument_group("search space")
    s.add_argument("--budget", type=parse_count, required=True, help="target parameter count (e.g. 4B, 5.2M)")
    s.add_argument("--tolerance", type=non_negative(float), default=0.05, help="keep candidates within ±this fraction (0.05)")
    s.add_argument("--space", default=None, help="JSON file: axis -> list of allowed sizes")
    for axis, flag in AXIS_FLAGS.items():
        s.add_argument(flag, type=positive(), nargs="+", default=None, metavar="N", help=f"allowed {axis} values")
    s.add_argument("--freeze", nargs="+", default=None, choices=list(AXIS_FLAGS.values()),
                   help="axes kept at the source's size in the default grid (default: --groups)")
    s.add_argument("--layer-metric", default=None, choices=["bi", "lm_loss", "block"],
                   help="how layers are dropped for shallower candidates (default bi)")
    s.add_argument("--winner-iters", type=non_negative(), default=0, help="then prune and distill the winner this many steps")
    s.add_argument("--keep-checkpoints", action="store_true", help="keep every candidate's checkpoints")
    add_parallel_arguments(parser)
    add_data_arguments(parser)
    add_training_arguments(parser)
    add_loss_arguments(parser)


def search_space(args, source):
    from megatron_minitron.search.space import SearchSpace, load_space

    flags = {axis: tuple(getattr(args, flag[2:])) for axis, flag in AXIS_FLAGS.items()
             if getattr(args, flag[2:]) is not None}
    if args.space and flags:
        raise ConfigError(f"give the space as --space or as axis flags ({', '.join(AXIS_FLAGS[a] for a in flags)}), "
                          f"not both")
    if args.space:
        return load_space(args.space)
    if flags:
        return SearchSpace(**flags)
    frozen = tuple(axis for axis, flag in AXIS_FLAGS.items() if flag in (args.freeze or ["--groups"]))
    return SearchSpace.default(source, frozen=frozen)


def run(args: argparse.Namespace) -> int:
    from megatron_minitron.cli.distill import distill_config, shared_tokenizer
    from megatron_minitron.data.loader import DataConfig
    from megatron_minitron.importance.scores import load_scores
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.runtime import LaunchEnv
    from megatron_minitron.search.space import enumerate_candidates, explain_empty

    # ---- every check that needs no process, before any pruning or training
    parallel = parallel_config(args)
    cfg, dcfg = train_config(args), distill_config(args)
    source = ckpt.resolve(args.load)
    scores = load_scores(args.scores)
    scores.check_belongs_to(source.arch, what=f"--load {args.load}")
    scores.check_computed_on(source.path, what=f"--load {args.load}", allow_foreign=args.allow_foreign_scores)
    space = search_space(args, source.arch)
    candidates, removed = enumerate_candidates(source.arch, space, budget=args.budget, tolerance=args.tolerance,
                                               tensor_parallel=parallel.tensor_parallel,
                                               pipeline_parallel=parallel.pipeline_parallel)
    if not candidates:
        raise ConfigError(explain_empty(removed, sum(removed.values())))
    if cfg.seq_length > source.arch.max_position_embeddings:
        raise ConfigError(f"--seq-length {cfg.seq_length} exceeds the model's max_position_embeddings="
                          f"{source.arch.max_position_embeddings}")
    out = Path(args.out)
    _check_out(out, resume=args.resume, overwrite=args.overwrite)
    if args.winner_iters < 0:
        raise ConfigError(f"--winner-iters must be >= 0, got {args.winner_iters}")
    _check_winner(out, args.winner_iters, overwrite=args.overwrite)
    env = LaunchEnv.from_environ()
    cfg.num_microbatches(parallel.data_parallel(env.world_size))
    tokenizer = shared_tokenizer(args.tokenizer, source, source)
    data_cfg = DataConfig(blend=parse_blend(args.data_path), valid_blend=parse_blend(args.valid_data_path),
                          split=args.split, seq_length=args.seq_length, seed=args.seed, cache_dir=args.cache_dir,
                          tokenizer=tokenizer)
    check_data_files(data_cfg)
    return _search(args, parallel, env, cfg, dcfg, source, scores, space, candidates, removed, data_cfg, out)


def _check_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise ConfigError(f"--resume: {out} holds no search to continue")
        return
    if not (out / "space.json").is_file():
        raise ConfigError(f"--out {out} exists and is not a search directory; choose a new path")
    if not (resume or overwrite):
        raise ConfigError(f"--out {out} already holds a search; pass --resume to continue it or --overwrite to "
                          f"start again")


def _check_winner(out: Path, iters: int, *, overwrite: bool) -> None:
    """A resumed search continues its winner's distillation only at the same length (its LR schedule)."""
    done = out / "winner" / "winner.json"
    if overwrite or not iters or not done.is_file():
        return
    before = json.loads(done.read_text())["winner_iters"]
    if before != iters:
        raise ConfigError(f"--winner-iters {iters}: {out / 'winner'} holds the winner distilled for {before} steps; "
                          f"pass --winner-iters {before} or move that directory away")


def _search(args, parallel, env, cfg, dcfg, source, scores, space, candidates, removed, data_cfg, out: Path) -> int:
    import dataclasses

    from megatron_minitron.data.loader import load_tokenizer
    from megatron_minitron.distill.loop import load_teacher
    from megatron_minitron.runtime import initialize, shutdown
    from megatron_minitron.search.run import SearchSetup, finished, rank, run_candidate, write_report

    runtime = initialize(parallel, seed=cfg.seed, env=env)
    try:
        def log(line: str) -> None:
            if runtime.is_logging_rank:
                print(line, flush=True)

        setup_json = {"source": str(source.root), "scores": str(args.scores), "budget": args.budget,
                      "tolerance": args.tolerance, "space": space.to_json(), "train": cfg.to_json(),
                      "distill": dcfg.to_json(), "removed": dict(removed)}
        setup_json = json.loads(json.dumps(setup_json))  # as stored (tuples become lists), to compare on resume
        if runtime.rank == 0:
            if args.overwrite and out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            previous = out / "space.json"
            if previous.is_file() and json.loads(previous.read_text()) != setup_json:
                raise ConfigError(f"--resume: {out} was searched with other settings; use a new --out")
            previous.write_text(json.dumps(setup_json, indent=2) + "\n")
        runtime.barrier()
        log(f"search: {len(candidates)} candidates within {args.tolerance:.0%} of {args.budget:,} parameters "
            f"({sum(removed.values())} combinations removed: {dict(removed)}); {cfg.train_iters} distillation "
            f"steps each")
        tokenizer = load_tokenizer(data_cfg)
        batches = run_batches(data_cfg, tokenizer, cfg, runtime, model_vocab_size=source.arch.vocab_size)
        import torch

        dtype = torch.bfloat16 if (cfg.bf16 if cfg.bf16 is not None else runtime.device.type == "cuda") else torch.float32
        teacher = load_teacher(source, runtime, dcfg, dtype=dtype, padded_vocab=source.arch.padded_vocab)
        setup = SearchSetup(source=source, scores=scores, out=out, layer_metric=args.layer_metric, seed=cfg.seed,
                            keep_checkpoints=args.keep_checkpoints)
        tok = tokenizer_json(data_cfg, tokenizer)
        results = []
        for i, candidate in enumerate(candidates):
            done = finished(out, candidate)
            if done is not None:
                log(f"[{i + 1}/{len(candidates)}] {candidate.name}: finished earlier (val LM loss "
                    f"{done['val_lm_loss']:.4f})")
                results.append(done)
                continue
            log(f"[{i + 1}/{len(candidates)}] {candidate.name}: {candidate.params:,} parameters")
            results.append(run_candidate(setup, candidate, runtime=runtime, train_cfg=cfg, distill_cfg=dcfg,
                                         teacher=teacher, tokenizer=tok, log=log, **batches))
        ranking = rank(results)
        if runtime.rank == 0:
            write_report(out, setup_json, results, ranking)
            (out / "best_plan.json").write_text((out / "candidates" / ranking["winner"] / "plan.json").read_text())
        runtime.barrier()
        log("\n".join((out / "search.md").read_text().splitlines()[:4 + len(results) + 3]))
        if args.winner_iters:
            winner = next(c for c in candidates if c.name == ranking["winner"])
            full = dataclasses.replace(cfg, train_iters=args.winner_iters)
            # data sized for the winner's run: the same order a separate `minitron distill` of that length sees
            batches = run_batches(data_cfg, tokenizer, full, runtime, model_vocab_size=source.arch.vocab_size)
            if runtime.rank == 0:
                (out / "winner").mkdir(exist_ok=True)
                (out / "winner" / "winner.json").write_text(json.dumps({"winner_iters": args.winner_iters}) + "\n")
            distilled = finished(out / "winner", winner) or run_candidate(
                dataclasses.replace(setup, out=out / "winner", keep_checkpoints=True), winner,
                runtime=runtime, train_cfg=full, distill_cfg=dcfg, teacher=teacher, tokenizer=tok, log=log, **batches)
            if runtime.rank == 0:
                write_report(out, setup_json, results, ranking, winner=distilled)
            runtime.barrier()
    finally:
        shutdown()
    return 0
