"""Window edges, with and without Pyramidal Flow's re-noise correction."""

from ray import tune

from ecar.config import Config
from ecar.sweeps import Sweep


def space(base: Config) -> dict:
    count = len(base.stages.grids)
    even = None  # the default: an even split
    late = [0.0] + [((s + 1) / count) ** 0.5 for s in range(count - 1)] + [1.0]  # more time at high noise
    early = [0.0] + [((s + 1) / count) ** 2 for s in range(count - 1)] + [1.0]  # more time near the data
    return {
        "stages.window_edges": tune.grid_search([even, late, early]),
        "stages.renoise_correction": tune.grid_search([True, False]),
    }


# like stages: other window edges weight the loss over other times, so no early stopping; rank by FID
SWEEP = Sweep(
    name="windows",
    preset="ecar-fmnist",
    space=space,
    metric="fid",
    early_stopping=False,
    description="where the stage windows split, with and without the re-noise correction",
)
