import pytest
from ray import tune

from ecar.config import ConfigError
from ecar.presets import get_config
from ecar.sweeps import load_sweep, resolve, trial_overrides, validate_space

pytestmark = pytest.mark.unit

SHIPPED = ["stages", "windows", "conditioning", "lr"]


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("smoke", [False, True])
def test_shipped_sweeps_validate_for_their_preset_and_the_smoke_preset(name, smoke):
    base, space, grid = resolve(load_sweep(name), smoke_test=smoke)
    assert grid >= 1
    assert base.preset == ("ecar-debug" if smoke else "ecar-fmnist")


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
        validate_space(base, {"@schedule": tune.grid_search([{"stages.grids": [4, 8], "flow.steps_per_stage": [2, 2, 2]}])})
    with pytest.raises(ConfigError, match="model.class_dropout"):
        validate_space(base, {"model.class_dropout": tune.uniform(1.0, 2.0)})


def test_bundles_expand_into_dotted_overrides():
    trial = {"@schedule": {"stages.grids": [4, 8], "flow.steps_per_stage": [3, 3]}, "train.lr": 0.1}
    assert trial_overrides(trial) == {"stages.grids": [4, 8], "flow.steps_per_stage": [3, 3], "train.lr": 0.1}


def test_unknown_sweep_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown sweep"):
        load_sweep("nope")
