"""Sweep definitions: a base preset plus a search space over dotted config keys.

A space maps either a dotted key (`train.lr`) to a Ray Tune domain, or a bundle name starting
with `@` to a domain over dicts of dotted overrides, for keys that must change together (a stage
count changes `stages.grids` and `flow.steps_per_stage`). Every value a grid can produce, and a
sample of every random domain, is applied to the base config before anything starts, so an
unknown key or an invalid value fails with the key's name, not in trial 17 an hour later.
"""

from __future__ import annotations

import importlib
import itertools
import math
import random
from dataclasses import dataclass
from typing import Any, Callable

from ecar.config import Config, ConfigError
from ecar.presets import get_config

Space = dict[str, Any]


@dataclass(frozen=True)
class Sweep:
    name: str
    preset: str
    space: Callable[[Config], Space]  # built from the base config, so the smoke test can reuse it
    metric: str = "val_loss"
    mode: str = "min"
    description: str = ""
    smoke_preset: str = "ecar-debug"


def _is_grid(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"grid_search"}


def _candidates(value: Any, samples: int, rng: random.Random) -> list[Any]:
    """Every grid value, or a few samples of a Tune domain, or the constant itself."""
    if _is_grid(value):
        return list(value["grid_search"])
    if hasattr(value, "sample"):  # a ray.tune search domain
        return [value.sample(random_state=rng.randrange(2**31)) for _ in range(samples)]
    return [value]


def trial_overrides(trial: dict[str, Any]) -> dict[str, Any]:
    """A trial's resolved space -> {dotted key: value}, bundles expanded."""
    overrides: dict[str, Any] = {}
    for key, value in trial.items():
        if key.startswith("@"):
            if not isinstance(value, dict):
                raise ConfigError(f"sweep bundle {key}: each value must be a dict of dotted overrides, got {value!r}")
            overrides.update(value)
        else:
            overrides[key] = value
    return overrides


def validate_space(base: Config, space: Space, samples: int = 4, seed: int = 0) -> int:
    """Apply every grid combination (with sampled random domains) to `base`; return the number
    of grid combinations. Raises ConfigError naming the first bad key or value."""
    rng = random.Random(seed)
    keys = list(space)
    options = [_candidates(space[key], samples, rng) for key in keys]
    for choice in itertools.product(*options):
        trial = dict(zip(keys, choice))
        try:
            base.override(trial_overrides(trial))
        except ConfigError as error:
            raise ConfigError(f"sweep value {trial}: {error}") from None
    return math.prod(len(space[k]["grid_search"]) for k in keys if _is_grid(space[k]))


def load_sweep(name: str) -> Sweep:
    """The SWEEP defined in tune/NAME.py."""
    try:
        module = importlib.import_module(f"tune.{name}")
    except ModuleNotFoundError:
        raise ConfigError(f"unknown sweep {name!r}: no tune/{name}.py") from None
    sweep = getattr(module, "SWEEP", None)
    if not isinstance(sweep, Sweep):
        raise ConfigError(f"tune/{name}.py defines no SWEEP = Sweep(...)")
    return sweep


def resolve(sweep: Sweep, smoke_test: bool = False, overrides: list[str] | None = None) -> tuple[Config, Space, int]:
    """(base config, validated space, grid size) for a run or a smoke test."""
    base = get_config(sweep.smoke_preset if smoke_test else sweep.preset, overrides)
    space = sweep.space(base)
    return base, space, validate_space(base, space)
