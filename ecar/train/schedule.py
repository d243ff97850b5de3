"""The learning-rate schedule: a pure function of the optimizer step."""

from __future__ import annotations

import math

from ecar.config import TrainConfig


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr
    over `warmup_steps`, then constant, or cosine down to `min_lr` at `steps`."""
    if train.warmup_steps > 0 and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return train.lr
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1.0 + math.cos(math.pi * progress))
