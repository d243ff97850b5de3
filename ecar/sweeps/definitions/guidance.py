"""Classifier-free guidance of a trained checkpoint (no training): scale x schedule."""

from ray import tune

from ecar.config import Config
from ecar.sweeps import Sweep


def space(base: Config) -> dict:
    return {
        "sampling.cfg_scale": tune.grid_search([1.0, 1.5, 2.5, 4.0]),
        "sampling.cfg_schedule": tune.grid_search(["constant", "linear"]),
    }


SWEEP = Sweep(
    name="guidance",
    preset="ecar-fmnist",
    space=space,
    metric="fid",
    kind="sample",
    description="CFG scale and schedule (constant, or a ramp over the stages)",
)
