"""Learning-rate schedules: pure functions of the step."""

from __future__ import annotations

import math


def lr_at(step: int, *, base: float, warmup: int, total: int, kind: str = "constant",
          min_ratio: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then constant (published) or cosine to base*min_ratio."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if kind == "constant":
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
