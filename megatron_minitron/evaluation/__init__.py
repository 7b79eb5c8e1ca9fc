"""Downstream evaluation with EleutherAI's lm-evaluation-harness (`pip install .[eval]`).

engine.py runs scoring and greedy generation on a megatron model at any TP/PP/DP (no lm_eval import);
lm.py adapts it to lm-eval's model interface; builtin.py writes the offline tasks made from the embedded
corpus; run.py resolves tasks (clear errors for unknown names, missing offline data, too few few-shot
examples) and drives lm-eval from global rank 0 while the other ranks follow.
"""
