"""Data blends as Megatron-LM writes them on its command line (no megatron import: flag parsing uses it)."""

from __future__ import annotations

from typing import Optional, Sequence

from megatron_minitron.config import ConfigError

Blend = tuple[tuple[float, str], ...]
"""A data blend: (weight, indexed-dataset path prefix) pairs."""


def parse_blend(values: Optional[Sequence[str]]) -> Optional[Blend]:
    """Megatron-LM's --data-path: `P1 P2` (equal weights) or `W1 P1 W2 P2`; None when no value is given."""
    if not values:
        return None
    try:
        float(values[0])
    except ValueError:
        return tuple((1.0, prefix) for prefix in values)
    if len(values) % 2:
        raise ConfigError(f"--data-path {' '.join(values)}: expected WEIGHT PREFIX pairs")
    pairs = []
    for weight, prefix in zip(values[::2], values[1::2]):
        try:
            pairs.append((float(weight), prefix))
        except ValueError:
            raise ConfigError(f"--data-path: {weight!r} is not a weight; mix no bare prefixes with weighted ones") from None
    return tuple(pairs)
