"""Sweep definitions: a base preset plus a search space over dotted config keys.

A training sweep (kind "train") trains one model per trial; a sampling sweep (kind "sample")
varies only sampling-time keys (`sampling.*`, `flow.steps_per_stage`) of one trained checkpoint.
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ecar.config import Config, ConfigError
from ecar.presets import get_config

Space = dict[str, Any]


@dataclass(frozen=True)
class Sweep:
    name: str
    preset: str
    space: Callable[[Config], Space]  # built from the base config, so the smoke test can reuse it
    metric: str = "val_loss"  # what ranks the trials (the report's quality column)
    mode: str = "min"
    description: str = ""
    smoke_preset: str = "ecar-debug"
    kind: Literal["train", "sample"] = "train"
    # ASHA compares trials by their held-out loss: only meaningful when every trial's loss is
    # over the same time distribution (not across stage counts or window edges)
    early_stopping: bool = True


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


def validate_space(base: Config, space: Space, samples: int = 4, seed: int = 0, allowed: tuple[str, ...] = ()) -> int:
    """Apply every grid combination (with sampled random domains) to `base`; return the number
    of grid combinations. Raises ConfigError naming the first bad key or value, or a key outside
    the `allowed` prefixes (when given)."""
    rng = random.Random(seed)
    keys = list(space)
    options = [_candidates(space[key], samples, rng) for key in keys]
    for choice in itertools.product(*options):
        trial = dict(zip(keys, choice))
        try:
            overrides = trial_overrides(trial)
            for key in overrides:
                if allowed and not key.startswith(allowed):
                    raise ConfigError(f"{key}: a sampling sweep may vary only {', '.join(allowed)}")
            base.override(overrides)
        except ConfigError as error:
            raise ConfigError(f"sweep value {trial}: {error}") from None
    return math.prod(len(space[k]["grid_search"]) for k in keys if _is_grid(space[k]))


def smoke_space(space: Space) -> tuple[Space, int]:
    """(space, num_samples) for two trials: the first grid keeps its first two values, any
    other grid its first; without a grid, two samples of the random domains."""
    trimmed, grids = {}, 0
    for key, value in space.items():
        if _is_grid(value):
            values = list(value["grid_search"])
            trimmed[key] = {"grid_search": values[:2] if grids == 0 else values[:1]}
            grids += 1
        else:
            trimmed[key] = value
    return trimmed, 1 if grids else 2


def grid_size(space: Space) -> int:
    return math.prod(len(v["grid_search"]) for v in space.values() if _is_grid(v))


def available_sweeps() -> list[str]:
    """The names of the sweeps shipped in ecar/sweeps/definitions/."""
    from pathlib import Path

    from ecar.sweeps import definitions

    return sorted(p.stem for p in Path(definitions.__file__).parent.glob("*.py") if not p.stem.startswith("_"))


def load_sweep(name: str) -> Sweep:
    """The SWEEP defined in ecar/sweeps/definitions/NAME.py."""
    try:
        module = importlib.import_module(f"ecar.sweeps.definitions.{name}")
    except ModuleNotFoundError:
        raise ConfigError(
            f"unknown sweep {name!r}: no ecar/sweeps/definitions/{name}.py (sweeps: {', '.join(available_sweeps())})"
        ) from None
    sweep = getattr(module, "SWEEP", None)
    if not isinstance(sweep, Sweep):
        raise ConfigError(f"ecar/sweeps/definitions/{name}.py defines no SWEEP = Sweep(...)")
    return sweep


def resolve(
    sweep: Sweep, smoke_test: bool = False, overrides: list[str] | None = None, base: Config | None = None
) -> tuple[Config, Space, int]:
    """(base config, validated space, grid size) for a run or a smoke test. A sampling sweep
    passes its checkpoint's config as `base`."""
    if base is None:
        base = get_config(sweep.smoke_preset if smoke_test else sweep.preset, overrides)
    elif overrides:
        base = base.override(overrides)
    from ecar.sampler import SAMPLING_KEYS

    space = sweep.space(base)
    allowed = SAMPLING_KEYS if sweep.kind == "sample" else ()
    return base, space, validate_space(base, space, allowed=allowed)
