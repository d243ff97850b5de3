"""Stage count and grid schedule: S = 2..5 stages, halving grids, equal step budgets per stage."""

from ray import tune

from ecar.config import Config
from ecar.sweeps import Sweep


def halving_grids(latent_size: int, stages: int, patch: int) -> list[int] | None:
    grids = [latent_size // 2 ** (stages - 1 - s) for s in range(stages)]
    return grids if grids[0] >= patch and all(g % patch == 0 for g in grids) else None


def space(base: Config) -> dict:
    schedules = []
    for stages in (2, 3, 4, 5):
        grids = halving_grids(base.model.latent_size, stages, base.model.patch_size)
        if grids is None:
            continue
        # the same total number of Euler steps, spread evenly: the schedule is what varies
        total = sum(base.flow.steps_per_stage)
        steps = [max(1, total // stages)] * stages
        schedules.append({"stages.grids": grids, "flow.steps_per_stage": steps})
    return {"@schedule": tune.grid_search(schedules)}


# Ranked by FID (pass --fid-images): each stage count splits time into other windows, so the
# held-out flow losses of two trials measure different things and early stopping is off.
SWEEP = Sweep(
    name="stages",
    preset="ecar-fmnist",
    space=space,
    metric="fid",
    early_stopping=False,
    description="stage counts 2-5 with halving grids at an equal Euler-step budget",
)
