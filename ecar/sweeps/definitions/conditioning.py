"""How the AR condition enters the flow model, and what the AR sees of the previous stage."""

from ray import tune

from ecar.config import Config
from ecar.sweeps import Sweep


def space(base: Config) -> dict:
    return {
        "model.condition_injection": tune.grid_search(["spatial_adaln", "additive", "cross_attention"]),
        "model.ar_next_input": tune.grid_search(["clean_estimate", "noisy_end"]),
    }


SWEEP = Sweep(
    name="conditioning",
    preset="ecar-fmnist",
    space=space,
    description="spatial adaLN / additive / cross-attention; clean-estimate vs noisy next input",
)
