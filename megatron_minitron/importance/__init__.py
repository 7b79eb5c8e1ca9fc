"""Activation importance: forward hooks on every TP/PP rank, reductions into global scores."""
