"""Steps per stage of a trained checkpoint (no training): uniform budgets, and one budget spread
toward the coarse or the fine stages. Scored by FID against FLOPs per image."""

from ray import tune

from ecar.config import Config
from ecar.sweeps import Sweep


def space(base: Config) -> dict:
    stages = len(base.flow.steps_per_stage)
    schedules = [[steps] * stages for steps in (2, 4, 6, 10, 16)]
    # the 4-per-stage budget, front- and back-loaded (for 3 stages: [6, 4, 2] and [2, 4, 6])
    ramp = [4 + 2 * (stages // 2 - s) for s in range(stages)] if stages > 1 else [4]
    schedules += [ramp, ramp[::-1]] if stages > 1 and ramp != ramp[::-1] else []
    return {"flow.steps_per_stage": tune.grid_search(schedules)}


SWEEP = Sweep(
    name="steps",
    preset="ecar-fmnist",
    space=space,
    metric="fid",
    kind="sample",
    description="Euler steps per stage at sampling time: quality against FLOPs per image",
)
