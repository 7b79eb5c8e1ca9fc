"""Logits caches and distillation from them, in one 2-process torchrun launch (run by
tests/distill/test_logits_cache_multirank.py, which compares the results).

A random `tiny` teacher (vocabulary 1000, padded 1024) and its width-pruned student, synthetic samples.
0. The cached KL at TP2 with K = 16 (ids on both ranks, a rest term) against the same KL on the whole
   vocabulary in one process, forward and reverse, on random logits: values and gradients.
1. Caches of the training samples written at TP2 and at TP1 x DP2, with K = 16 and K = 1024 (everything).
2. At TP1 x DP2 and at TP2: online distillation (the teacher in memory) and distillation from the K = 1024
   cache written at the same layout, STEPS steps each from the same weights; forward KL + 0.5 LM loss, and
   reverse KL at TP2; and at TP1 x DP2 from the cache written at TP2. After the steps, each run is evaluated
   on the first global batch: the student's losses and the teacher's LM loss (online: the teacher's forward;
   cached: its label log-probabilities in the cache).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/multirank/cache_layouts.py OUT
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron.config import preset  # noqa: E402
from megatron_minitron.data.loader import batch_iterator  # noqa: E402
from megatron_minitron.distill import logits_cache as lc  # noqa: E402
from megatron_minitron.distill.cached import cached_task, cached_trainer  # noqa: E402
from megatron_minitron.distill.cached_kl import cached_kl, teacher_top_k  # noqa: E402
from megatron_minitron.distill.loop import DistillConfig, build, distill_task  # noqa: E402
from megatron_minitron.model import checkpoint as ckpt  # noqa: E402
from megatron_minitron.model.build import build_model, unwrap  # noqa: E402
from megatron_minitron.plan import Target, random_plan  # noqa: E402
from megatron_minitron.prune.rewrite import prune_checkpoint  # noqa: E402
from megatron_minitron.runtime import ParallelConfig, initialize, shutdown  # noqa: E402
from megatron_minitron.training.loop import TrainConfig, evaluate, init_from, train_step  # noqa: E402
from tests.multirank import synthetic  # noqa: E402

ARCH = preset("tiny")
SEQ, MBS, GBS, STEPS = 32, 2, 4, 6
LAYOUTS = {"tp1_dp2": ParallelConfig(), "tp2": ParallelConfig(tensor_parallel=2)}
LOSSES = {"forward": DistillConfig(lm_weight=0.5), "reverse": DistillConfig(kd_loss="reverse")}


class Samples:
    """Synthetic samples in megatron's GPTDataset form (sample i is the same on every rank and layout)."""

    def __len__(self) -> int:
        return STEPS * GBS

    def __getitem__(self, index: int) -> dict:
        return synthetic.example(index, SEQ, ARCH.vocab_size, seed=4)


def manifest(k: int) -> lc.CacheManifest:
    return lc.CacheManifest(teacher="t", teacher_fingerprint="f", teacher_arch=ARCH.to_json(), tokenizer_fingerprint="x",
                            vocab_size=ARCH.vocab_size, padded_vocab=ARCH.padded_vocab,
                            data={"blend": None, "valid_blend": None, "split": "1", "seed": 4, "seq_length": SEQ},
                            train_iters=STEPS, global_batch_size=GBS, eval_iters=0, top_k=k, temperature=1.0)


def vocab_parallel_kl(out: Path) -> None:
    """Largest relative differences of the TP2 cached KL (each rank its slice of the logits) from the
    whole-vocabulary one, and of the targets written at TP2 from those written on the whole vocabulary."""
    rt = initialize(LAYOUTS["tp2"], seed=5)
    g = torch.Generator().manual_seed(11)
    student, teacher = (torch.randn(3, 8, ARCH.padded_vocab, generator=g).mul_(3) for _ in range(2))
    upstream = torch.randn(3, 8, generator=g)
    width = ARCH.padded_vocab // 2
    mine = slice(rt.tp_rank * width, (rt.tp_rank + 1) * width)
    whole = teacher_top_k(teacher, k=16, temperature=2.0)
    split = teacher_top_k(teacher[..., mine].contiguous(), k=16, group=rt.tp_group, temperature=2.0)
    result = {"ids_equal": torch.equal(whole[0], split[0]),
              "targets": max(float((a - b).abs().max()) for a, b in zip(whole[1:], split[1:]))}
    for name, reverse in (("forward", False), ("reverse", True)):
        runs = []
        for logits, group in ((student, None), (student[..., mine], rt.tp_group)):
            x = logits.clone().requires_grad_(True)
            loss = cached_kl(x, *whole, group=group, temperature=2.0, reverse=reverse, chunk_size=5)
            (loss * upstream).sum().backward()
            runs.append((loss.detach(), x.grad[..., mine] if group is None else x.grad))
        (loss, grad), (tp_loss, tp_grad) = runs
        result[name] = {"loss": float(((tp_loss - loss).abs() / loss.abs()).max()),
                        "grad": float((tp_grad - grad).abs().max() / grad.abs().max()),
                        "ids_on_this_rank": int(((whole[0] >= mine.start) & (whole[0] < mine.stop)).sum())}
    results = [None] * rt.world_size
    torch.distributed.all_gather_object(results, result)
    if rt.rank == 0:
        (out / "vocab_parallel.json").write_text(json.dumps(results))


def write_caches(out: Path, teacher) -> None:
    for name, parallel in LAYOUTS.items():
        rt = initialize(parallel, seed=5)
        model = build_model(ARCH, rt)
        ckpt.load_checkpoint(teacher, model=model)
        for k in (16, ARCH.padded_vocab):
            root = out / f"cache_{name}_k{k}"
            m = manifest(k)
            if rt.rank == 0:
                root.mkdir(parents=True)
            torch.distributed.barrier()
            lc.write_split(model, rt, Samples(), split="train", manifest=m, out=root, micro_batch_size=MBS,
                           todo=list(range(m.num_shards("train"))))
            torch.distributed.barrier()
            if rt.rank == 0:
                lc.write_manifest(root, dataclasses.replace(m, complete=True))
            torch.distributed.barrier()


def batches(rt, dataset):
    return batch_iterator(dataset, micro_batch_size=MBS, dp_rank=rt.dp_rank, dp_size=rt.data_parallel)


def weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in unwrap(trainer.model[0]).state_dict().items()
            if torch.is_tensor(v) and v.is_floating_point()}


def compare_runs(out: Path, teacher, student) -> None:
    cfg = TrainConfig(train_iters=STEPS, micro_batch_size=MBS, global_batch_size=GBS, seq_length=SEQ,
                      lr_warmup_iters=1, lr=3e-3, log_interval=100, eval_interval=0, eval_iters=1)
    results = {}
    runs = [("tp1_dp2", "forward", "tp1_dp2"), ("tp2", "forward", "tp2"), ("tp2", "reverse", "tp2"),
            ("tp1_dp2", "forward", "tp2")]  # (student layout, loss, layout the cache was written at)
    for name, loss, cache_layout in runs:
        parallel, dcfg = LAYOUTS[name], LOSSES[loss]
        rt = initialize(parallel, seed=5)
        trainer, pairs = build(teacher, student, rt, cfg, dcfg)
        init_from(trainer, student.root)
        task, data = distill_task(rt, dcfg, trainer.chunks[0], pairs), batches(rt, Samples())
        online = [train_step(trainer, task, data) for _ in range(STEPS)]
        online_weights = weights(trainer)
        online_eval = evaluate(trainer, task, batches(rt, Samples()), 1)
        trainer.chunks[0].close()

        rt = initialize(parallel, seed=5)
        trainer = cached_trainer(student.arch, rt, cfg)
        init_from(trainer, student.root)
        cache = lc.LogitsCache(out / f"cache_{cache_layout}_k{ARCH.padded_vocab}")
        data = batches(rt, lc.WithTeacherTargets(Samples(), cache, "train"))
        task = cached_task(rt, dcfg)
        cached = [train_step(trainer, task, data) for _ in range(STEPS)]
        cached_eval = evaluate(trainer, task, batches(rt, lc.WithTeacherTargets(Samples(), cache, "train")), 1)
        diff = max(float((w - online_weights[k]).abs().max() / online_weights[k].abs().max().clamp(min=1e-12))
                   for k, w in weights(trainer).items())
        diffs = [None] * rt.world_size
        torch.distributed.all_gather_object(diffs, diff)
        keys = ("loss", "kd loss", "lm loss")
        results[f"{name}_{loss}_cache_{cache_layout}"] = {"online": [{k: r[k] for k in keys} for r in online],
                                     "cached": [{k: r[k] for k in keys} for r in cached], "weight_diff": max(diffs),
                                     "online_eval": online_eval, "cached_eval": cached_eval}
    if torch.distributed.get_rank() == 0:
        (out / "runs.json").write_text(json.dumps(results))


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    vocab_parallel_kl(out_dir)
    rt0 = initialize(ParallelConfig(tensor_parallel=2), seed=7)
    ckpt.save_checkpoint(out_dir / "teacher", model=build_model(ARCH, rt0), arch=ARCH, runtime=rt0, iteration=None)
    if rt0.rank == 0:
        plan = random_plan(ARCH.explicit(), Target(hidden_size=48, ffn_hidden_size=96), seed=3)
        prune_checkpoint(out_dir / "teacher", plan, out_dir / "student", print_fn=lambda _: None)
    torch.distributed.barrier()
    teacher_info, student_info = ckpt.resolve(out_dir / "teacher"), ckpt.resolve(out_dir / "student")
    write_caches(out_dir, teacher_info)
    compare_runs(out_dir, teacher_info, student_info)
    torch.distributed.barrier()
    shutdown()
