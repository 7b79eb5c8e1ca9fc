"""The teacher top-k logits cache, measured in one run (ratios against baselines of the same run):

- a distillation step from the cache vs the student's own training step (target: <= 1.05; reading the
  cache must hide behind compute), and vs an online distillation step (teacher in memory);
- a search of C candidates (each distilled S steps on the same samples) from one cache vs with the teacher
  online, for C = 3 and 6: (writing the cache + C cached runs) / (C online runs), from the per-step times
  of this run (writing the cache = one teacher forward + top-k + write per step);
- bytes per token on disk for each K (the files written, against the format's 12 + 8K).
Peak memory of each kind of run, each in its own process, is benchmarks/cache_memory.py.

    python benchmarks/cache_logits.py [--tp 1] [--steps 6] [--ks 16 64 256] [--out FILE]
    torchrun --nproc-per-node 2 benchmarks/cache_logits.py --tp 2

Teacher: the `small` preset (10.5M); student: its width-pruned shape (hidden 192, ffn 384), both random;
micro-batch 4 x 256 tokens. Steps alternate (student, cached, online, ...) and medians are compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_minitron.config import preset  # noqa: E402
from megatron_minitron.data.loader import batch_iterator, prefetched  # noqa: E402
from megatron_minitron.distill import logits_cache as lc  # noqa: E402
from megatron_minitron.distill.cached import cached_task, cached_trainer  # noqa: E402
from megatron_minitron.distill.loop import DistillConfig, build, distill_task  # noqa: E402
from megatron_minitron.model import checkpoint as ckpt  # noqa: E402
from megatron_minitron.model.build import build_model  # noqa: E402
from megatron_minitron.runtime import ParallelConfig, initialize, shutdown  # noqa: E402
from megatron_minitron.training.loop import TrainConfig, build_trainer, init_from, lm_task, train_step  # noqa: E402
from _results import write_results  # noqa: E402  (benchmarks/, the script's directory)

SEQ, MBS = 256, 4


def models():
    """(teacher, student) architectures: the `small` preset and its width-pruned shape."""
    teacher = preset("small")
    return teacher, teacher.replace(hidden_size=192, ffn_hidden_size=384, kv_channels=teacher.head_dim)


class Samples:
    """Random-token samples in GPTDataset form, the same on every rank."""

    def __init__(self, count: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, vocab, (count, SEQ + 1), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        t = self.tokens[i]
        return {"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(SEQ), "position_ids": torch.arange(SEQ)}


def write_cache(rt, teacher_model, samples, root: Path, k: int, steps: int, gbs: int, vocab: tuple) -> float:
    """Seconds per global batch to write a K cache of `steps` batches."""
    m = lc.CacheManifest(teacher="t", teacher_fingerprint="f", teacher_arch={}, tokenizer_fingerprint="x",
                         vocab_size=vocab[0], padded_vocab=vocab[1],
                         data={"blend": None, "valid_blend": None, "split": "1", "seed": 0, "seq_length": SEQ},
                         train_iters=steps, global_batch_size=gbs, eval_iters=0, top_k=k, temperature=1.0)
    if rt.rank == 0:
        root.mkdir(parents=True)
    rt.barrier()
    start = time.perf_counter()
    lc.write_split(teacher_model, rt, samples, split="train", manifest=m, out=root, micro_batch_size=MBS,
                   todo=list(range(steps)))
    rt.barrier()
    seconds = (time.perf_counter() - start) / steps
    if rt.rank == 0:
        lc.write_manifest(root, dataclasses.replace(m, complete=True))
    rt.barrier()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each kind (one more warms up)")
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--timed-k", type=int, default=64, help="the K whose cache the timed steps read")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rt = initialize(ParallelConfig(tensor_parallel=args.tp))
    teacher_arch, student_arch = models()
    gbs = MBS * rt.data_parallel
    cfg = TrainConfig(train_iters=100, micro_batch_size=MBS, global_batch_size=gbs, seq_length=SEQ, lr_warmup_iters=1)
    paths = [tempfile.mkdtemp(prefix="cache-bench-") if rt.rank == 0 else None]
    torch.distributed.broadcast_object_list(paths, src=0)
    root = Path(paths[0])
    for name, arch in (("teacher", teacher_arch), ("student", student_arch)):
        ckpt.save_checkpoint(root / name, model=build_model(arch, rt), arch=arch, runtime=rt, iteration=None)
    teacher, student = ckpt.resolve(root / "teacher"), ckpt.resolve(root / "student")
    steps = args.steps + 1
    samples = Samples(steps * gbs, teacher_arch.vocab_size)
    t_model = build_model(teacher_arch, rt)
    ckpt.load_checkpoint(teacher, model=t_model)
    vocab = (teacher_arch.vocab_size, teacher_arch.padded_vocab)
    write_s, bytes_per_token = {}, {}
    for k in sorted(set(args.ks) | {args.timed_k}):
        write_s[k] = write_cache(rt, t_model, samples, root / f"k{k}", k, steps, gbs, vocab)
        size = sum(p.stat().st_size for p in (root / f"k{k}").glob("*.bin"))
        bytes_per_token[k] = size / (steps * gbs * SEQ)
    del t_model

    dcfg = DistillConfig()
    online, pairs = build(teacher, student, rt, cfg, dcfg)
    init_from(online, student.root)
    online_task = distill_task(rt, dcfg, online.chunks[0], pairs)
    cached, own = cached_trainer(student_arch, rt, cfg), build_trainer(student_arch, rt, cfg)
    init_from(cached, student.root)
    init_from(own, student.root)
    cache = lc.LogitsCache(root / f"k{args.timed_k}")
    dp = dict(micro_batch_size=MBS, dp_rank=rt.dp_rank, dp_size=rt.data_parallel)
    data = {"student": batch_iterator(samples, **dp), "online": batch_iterator(samples, **dp),
            "cached": prefetched(batch_iterator(lc.WithTeacherTargets(samples, cache, "train"), **dp))}  # as a run
    runs = {"student": (own, lm_task(rt.device)), "cached": (cached, cached_task(rt, dcfg)),
            "online": (online, online_task)}
    times = {name: [] for name in runs}
    for step in range(steps):
        for name, (trainer, task) in runs.items():
            rt.barrier()
            start = time.perf_counter()
            train_step(trainer, task, data[name])
            rt.barrier()
            if step:  # the first round warms up every kind
                times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    write = write_s[args.timed_k]
    result = {
        "tp": args.tp, "world_size": rt.world_size, "teacher_params": teacher_arch.num_parameters(),
        "student_params": student_arch.num_parameters(), "tokens_per_step": gbs * SEQ, "timed_k": args.timed_k,
        "step_s": median, "cache_write_step_s": write_s,
        "cached_vs_student_step": median["cached"] / median["student"], "target_cached_vs_student": 1.05,
        "cached_vs_online_step": median["cached"] / median["online"],
        "search_cached_vs_online": {c: (write + c * median["cached"]) / (c * median["online"]) for c in (3, 6)},
        "bytes_per_token": bytes_per_token, "format_bytes_per_token": {k: 12 + 8 * k for k in bytes_per_token},
    }
    if rt.rank == 0:
        write_results(result, args.out)
    shutdown()


if __name__ == "__main__":
    main()
