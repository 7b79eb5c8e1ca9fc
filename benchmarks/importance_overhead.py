"""Calibration throughput with importance hooks vs the same forward passes without them
(target: ratio >= 0.95), and the size of the accumulators as the number of tokens grows (target: constant).

    torchrun --nproc-per-node 2 benchmarks/importance_overhead.py --tp 2
    torchrun --nproc-per-node 1 benchmarks/importance_overhead.py --arch small-moe   # Mixture of Experts
    torchrun --nproc-per-node 1 benchmarks/importance_overhead.py --arch small-moe --hook-threads 1 --out /tmp/x.json
    torchrun --nproc-per-node 1 benchmarks/importance_overhead.py --arch small-moe --set hidden_size=1024 \
        --set moe_ffn_hidden_size=1024 --samples 8 --repeats 6 --out /tmp/wide.json   # wider experts
    torchrun --nproc-per-node 1 benchmarks/importance_overhead.py --arch qwen3-30b-a3b --set num_layers=2 \
        --set vocab_size=32000 --set padded_vocab_size=32000 --seq-length 512 --samples 8 --repeats 8 \
        --out benchmarks/results/importance_overhead_moe_qwen3.json   # two layers of Qwen3-30B-A3B
    torchrun --nproc-per-node 1 benchmarks/importance_overhead.py --arch mixtral-8x7b --set num_layers=1 \
        --seq-length 512 --samples 4 --micro-batch-size 2 --repeats 4 \
        --out benchmarks/results/importance_overhead_moe_mixtral.json   # one layer of Mixtral-8x7B

Calibration is as `minitron importance` runs it by default (sequence length min(4096, max positions),
4 samples a micro-batch), on 16 samples. Both sides run the same model on the same micro-batches
through the same forward-only schedule; passes alternate, in pairs whose order swaps every repeat
(bare, hooked, hooked, bare, ...), so machine noise and drift hit both alike. Reported: the ratio of
median throughputs (the target's figure), the median of the ratios of adjacent pairs, the ratio of
this rank's median CPU seconds per pass, and the hooks' share: their main-thread CPU time over that
of the rest of the same pass (the steadiest figure here, since it needs no second pass: single
passes of the same work vary by +-15% in wall time on this VM). The main thread's share misses the
other intra-op threads' part of the hooks' operations: hook_process_cpu_share is the same ratio of
the process's CPU time (all threads), the figure to hold against cpu_ratio; hook_wall_share that of
wall time, to hold against throughput_ratio: where 1 / throughput_ratio - 1 exceeds it, the hooks slow
the rest of the pass down (wall figures hold only on an otherwise idle machine). Also the hooks' working memory
(scratch buffer and pending slots), which grows with a micro-batch's tokens up to a cap, not with
the number of samples. Writes JSON to --out (default benchmarks/results/importance_overhead.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_minitron.config import ArchConfig, load_arch, unknown_fields  # noqa: E402
from megatron_minitron.importance.calibration import micro_batch_sizes, micro_batches  # noqa: E402
from megatron_minitron.importance.hooks import Collector  # noqa: E402
from megatron_minitron.importance.run import forward_passes  # noqa: E402
from megatron_minitron.model.build import build_model  # noqa: E402
from megatron_minitron.runtime import ParallelConfig, initialize, shutdown  # noqa: E402


def samples(n: int, seq: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        t = torch.randint(0, vocab, (seq + 1,), generator=g)
        out.append({"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(seq), "position_ids": torch.arange(seq)})
    return out


def accumulator_bytes(collector: Collector) -> int:
    experts = collector.experts
    moe = [experts.stats, experts.mass, experts.tokens] if experts is not None else []
    return sum(t.numel() * t.element_size() for t in [*collector.acc.values(), collector.bi, *moe])


def working_bytes(collector: Collector) -> int:
    """The hooks' scratch buffer and pending slots (sized by a micro-batch's tokens, capped)."""
    buffers = [collector._work, *(pending.buffer for pending in collector._pending.values())]
    if collector.experts is not None:
        buffers.append(collector.experts._work)
    return sum(t.numel() * t.element_size() for t in buffers)


def _json_or_text(value: str):
    """A --set value: JSON (1024, true, null) where it parses, else the text itself (RMSNorm)."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE architectures)")
    parser.add_argument("--arch", default="small", help="a preset or an architecture JSON file; a MoE one "
                                                        "(small-moe) also scores its experts")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a field of the architecture (a JSON value), e.g. hidden_size=1024; repeatable")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=None,
                        help="tokens per sample; default as `minitron importance`: min(4096, max positions)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--hook-threads", type=int, default=None,
                        help="intra-op threads for the hooks' operations (default: the forward pass's)")
    parser.add_argument("--out", default=None, help="default benchmarks/results/importance_overhead[_moe].json")
    args = parser.parse_args()

    arch = load_arch(args.arch)
    changes = {}
    for item in args.set:
        field, equals, value = item.partition("=")
        if not equals or unknown_fields(ArchConfig, {field: value}):
            parser.error(f"--set {item!r}: give FIELD=VALUE with FIELD an architecture field")
        changes[field] = _json_or_text(value)
    if changes:
        arch = arch.replace(**changes)
    rt = initialize(ParallelConfig(tensor_parallel=args.tp, expert_parallel=args.ep,  # MoE at TP > 1 needs SP
                                   sequence_parallel=args.tp > 1 and arch.is_moe))
    args.out = args.out or f"benchmarks/results/importance_overhead{'_moe' if arch.is_moe else ''}.json"
    args.seq_length = args.seq_length or min(4096, arch.max_position_embeddings)
    model = build_model(arch, rt, moe_dispatcher="allgather")  # as `minitron importance` builds it
    data = samples(args.samples, args.seq_length, arch.vocab_size)
    sizes = micro_batch_sizes(args.samples, micro_batch_size=args.micro_batch_size, dp_rank=rt.dp_rank,
                              dp_size=rt.data_parallel)

    def batches():
        return micro_batches(data, args.samples, micro_batch_size=args.micro_batch_size, dp_rank=rt.dp_rank,
                             dp_size=rt.data_parallel)

    collector = Collector(model, rt, arch, seq_length=args.seq_length, hook_threads=args.hook_threads)
    forward_passes(model, rt, batches(), sizes, args.seq_length)  # warm-up
    times = {"bare": [], "hooked": []}
    cpu = {"bare": [], "hooked": []}  # this rank's CPU seconds per pass (less noisy than wall time)
    hook_share = []  # per hooked pass: main-thread CPU time in the hooks / in the rest of the pass
    process_share = []  # per hooked pass: the process's CPU time (all threads) in the hooks / in the rest
    wall_share = []  # per hooked pass: wall time in the hooks / in the rest of the pass
    hook_seconds, thread = [], {"bare": [], "hooked": []}  # main-thread CPU seconds
    for repeat in range(args.repeats):
        for name in ("bare", "hooked") if repeat % 2 == 0 else ("hooked", "bare"):
            rt.barrier()
            start, start_cpu, start_thread = time.perf_counter(), time.process_time(), time.thread_time()
            if name == "hooked":
                hooks_before, process_before = collector.hook_seconds, collector.hook_process_seconds
                wall_before = collector.hook_wall_seconds
                with collector.attached():
                    forward_passes(model, rt, batches(), sizes, args.seq_length)
                hooks = collector.hook_seconds - hooks_before
                hook_share.append(hooks / (time.thread_time() - start_thread - hooks))
                in_hooks = collector.hook_process_seconds - process_before
                process_share.append(in_hooks / (time.process_time() - start_cpu - in_hooks))
                in_hooks = collector.hook_wall_seconds - wall_before
                wall_share.append(in_hooks / (time.perf_counter() - start - in_hooks))
                hook_seconds.append(hooks)
            else:
                forward_passes(model, rt, batches(), sizes, args.seq_length)
            thread[name].append(time.thread_time() - start_thread)
            rt.barrier()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    tokens = args.samples * args.seq_length
    throughput = {name: tokens / statistics.median(t) for name, t in times.items()}
    # accumulator memory: the same collector after 1x and 4x the tokens
    small = Collector(model, rt, arch, seq_length=args.seq_length // 4)
    short = [{k: v[: args.seq_length // 4] for k, v in d.items()} for d in data[: args.micro_batch_size]]
    with small.attached():
        forward_passes(model, rt, micro_batches(short, len(short), micro_batch_size=args.micro_batch_size,
                                                dp_rank=0, dp_size=1), [len(short)], args.seq_length // 4)
    result = {
        "arch": args.arch, "changes": changes, "tp": args.tp, "ep": args.ep, "hook_threads": args.hook_threads,
        "samples": args.samples, "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
        "repeats": args.repeats,
        "tokens_per_s_bare": throughput["bare"], "tokens_per_s_hooked": throughput["hooked"],
        "throughput_ratio": throughput["hooked"] / throughput["bare"], "target_ratio": 0.95,
        "pair_ratio_median": statistics.median(b / h for b, h in zip(times["bare"], times["hooked"])),
        "cpu_ratio": statistics.median(cpu["bare"]) / statistics.median(cpu["hooked"]),
        "hook_cpu_share": statistics.median(hook_share),
        "hook_process_cpu_share": statistics.median(process_share),
        "hook_wall_share": statistics.median(wall_share),
        "seconds": times, "cpu_seconds": cpu, "thread_seconds": thread, "hook_seconds": hook_seconds,
        "accumulator_bytes": {"tokens": [len(short) * args.seq_length // 4, tokens],
                              "bytes": [accumulator_bytes(small), accumulator_bytes(collector)]},
        "working_bytes": {"micro_batch_tokens": [len(short) * args.seq_length // 4,
                                                 args.micro_batch_size * args.seq_length],
                          "bytes": [working_bytes(small), working_bytes(collector)]},
    }
    if rt.rank == 0:
        print(json.dumps(result, indent=2))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    shutdown()


if __name__ == "__main__":
    main()
