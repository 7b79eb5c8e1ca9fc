"""Offline, sharded, streaming rewrite of torch_dist checkpoints by a pruning plan.

`slicing` holds the per-tensor rules (pure functions of a Plan); `rewrite` streams a source
checkpoint through them into a new checkpoint with N worker processes.
"""

from megatron_minitron.prune.slicing import PruneError, rule_for, slice_full

__all__ = ["PruneError", "rule_for", "slice_full"]
