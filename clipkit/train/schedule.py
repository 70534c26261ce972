"""Learning-rate schedules, a pure function of the step: nothing to save, nothing to drift on resume."""
from __future__ import annotations

import math
from typing import Any


def learning_rate(optimization: Any, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """OpenCLIP's schedules: linear warmup over ``--warmup`` steps, then cosine, constant, or constant
    with a final ``--epochs-cooldown`` decay to ``--lr-cooldown-end`` shaped by ``--lr-cooldown-power``."""
    # resolved settings: lr and the cooldown are set by the time a schedule runs
    base: float = optimization.lr
    warmup: int = optimization.warmup
    if step < warmup:
        return base * (step + 1) / warmup
    if optimization.lr_scheduler == "cosine":
        span = max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span)) * base
    if optimization.lr_scheduler == "const":
        return base
    cooldown_start = total_steps - steps_per_epoch * optimization.epochs_cooldown
    if step < cooldown_start:
        return base
    span = max(1, total_steps - cooldown_start)
    decay: float = (1 - (step - cooldown_start) / span) ** optimization.lr_cooldown_power
    end: float = optimization.lr_cooldown_end
    return decay * (base - end) + end
