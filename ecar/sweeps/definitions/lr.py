"""Learning rate and warm-up."""

from ray import tune

from ecar.config import Config
from ecar.sweeps import Sweep


def space(base: Config) -> dict:
    return {
        "train.lr": tune.loguniform(base.train.lr / 10, base.train.lr * 10),
        "train.warmup_steps": tune.choice([0, max(1, base.train.steps // 50), max(1, base.train.steps // 10)]),
    }


SWEEP = Sweep(name="lr", preset="ecar-fmnist", space=space, description="learning rate and warm-up")
