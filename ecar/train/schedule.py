"""The learning-rate schedule: a pure function of the optimizer step."""

from __future__ import annotations

import math

from ecar.config import TrainConfig


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr
    over `warmup_steps`, then constant, or cosine down to `min_lr` at `steps`."""
    if train.lr_schedule == "constant":
        return cosine_lr(step, train.lr, train.lr, train.warmup_steps, train.steps)
    return cosine_lr(step, train.lr, train.min_lr, train.warmup_steps, train.steps)


def cosine_lr(step: int, peak: float, floor: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from peak/warmup to `peak` over `warmup_steps`, then cosine from `peak` to
    `floor` at `total_steps` (floor = peak: constant). E-CAR and tokenizer training both use it."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
