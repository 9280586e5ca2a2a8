"""Learning-rate schedules as multipliers of the peak rate (for ``LambdaLR``)."""

from __future__ import annotations

import math
from typing import Callable

from .config import TrainConfig


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine to ``min_lr_ratio``, or WSD: stable, then a linear decay over
    the last ``decay_fraction`` of the steps."""
    o, total = cfg.optim, cfg.steps
    floor = o.min_lr_ratio

    def cosine(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        frac = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    def wsd(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        decay_start = total - int(o.decay_fraction * total)
        if step < decay_start:
            return 1.0
        return floor + (1 - floor) * max(0.0, (total - step) / max(1, total - decay_start))

    return cosine if o.schedule == "cosine" else wsd
