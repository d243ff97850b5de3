import pytest
from ray import tune

from ecar.config import ConfigError
from ecar.presets import get_config
from ecar.sweeps import Sweep, available_sweeps, load_sweep, resolve, smoke_space, trial_overrides, validate_space

pytestmark = pytest.mark.unit

SHIPPED = ["stages", "windows", "conditioning", "lr", "steps", "guidance"]


def test_every_shipped_sweep_is_listed():
    assert sorted(SHIPPED) == available_sweeps()


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("smoke", [False, True])
def test_shipped_sweeps_validate_for_their_preset_and_the_smoke_preset(name, smoke):
    sweep = load_sweep(name)
    base, space, grid = resolve(sweep, smoke_test=smoke)
    assert grid >= 1
    assert base.preset == ("ecar-debug" if smoke else "ecar-fmnist")
    trimmed, samples = smoke_space(space)
    assert validate_space(base, trimmed) * samples == 2  # a smoke test runs two trials


def test_stage_sweep_covers_several_stage_counts_with_matching_step_lists():
    _, space, grid = resolve(load_sweep("stages"))
    schedules = space["@schedule"]["grid_search"]
    assert grid == len(schedules) >= 3
    assert sorted({len(s["stages.grids"]) for s in schedules}) == [2, 3, 4]
    for schedule in schedules:
        assert len(schedule["flow.steps_per_stage"]) == len(schedule["stages.grids"])


def test_unknown_keys_fail_before_anything_starts():
    base = get_config("ecar-debug")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        validate_space(base, {"train.learning_rate": tune.grid_search([1e-3, 1e-4])})


def test_invalid_grid_values_and_sampled_values_name_the_key():
    base = get_config("ecar-debug")
    with pytest.raises(ConfigError, match="flow.steps_per_stage"):
        validate_space(
            base, {"@schedule": tune.grid_search([{"stages.grids": [4, 8], "flow.steps_per_stage": [2, 2, 2]}])}
        )
    with pytest.raises(ConfigError, match="model.class_dropout"):
        validate_space(base, {"model.class_dropout": tune.uniform(1.0, 2.0)})


def test_bundles_expand_into_dotted_overrides():
    trial = {"@schedule": {"stages.grids": [4, 8], "flow.steps_per_stage": [3, 3]}, "train.lr": 0.1}
    assert trial_overrides(trial) == {"stages.grids": [4, 8], "flow.steps_per_stage": [3, 3], "train.lr": 0.1}


def test_unknown_sweep_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown sweep"):
        load_sweep("nope")


def test_sampling_sweeps_may_vary_only_sampling_keys():
    sweep = Sweep(
        name="bad", preset="ecar-debug", kind="sample", space=lambda base: {"train.lr": tune.grid_search([1e-3, 1e-4])}
    )
    with pytest.raises(ConfigError, match="train.lr: a sampling sweep may vary only"):
        resolve(sweep)


def test_steps_sweep_keeps_the_stage_count_of_the_checkpoint():
    base = get_config("ecar-fmnist")
    _, space, grid = resolve(load_sweep("steps"), base=base)
    schedules = space["flow.steps_per_stage"]["grid_search"]
    assert grid == len(schedules) >= 5
    assert all(len(s) == len(base.stages.grids) for s in schedules)
    assert [6, 4, 2] in schedules and [2, 4, 6] in schedules


def test_a_smoke_test_keeps_the_users_own_overrides():
    from ecar.sweeps.runner import SMOKE_OVERRIDES, _smoke_base

    base, _, _ = resolve(load_sweep("lr"), smoke_test=True)
    config, manifest = _smoke_base(load_sweep("lr"), base, "s3://bucket/latents", ["train.steps=12"])
    assert manifest == "s3://bucket/latents"
    assert config.train.steps == 12  # the user's, not the smoke test's 6
    assert config.train.checkpoint_every == SMOKE_OVERRIDES["train.checkpoint_every"]
