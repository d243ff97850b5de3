import pytest

from ecar.config import Config, ConfigError, gradient_accumulation_steps
from ecar.presets import PRESETS, get_config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json_and_yaml(name, tmp_path):
    config = get_config(name)
    assert Config.from_text(config.to_json()) == config
    assert Config.from_text(config.to_yaml()) == config
    config.save(tmp_path / "config.yaml")
    assert Config.load(tmp_path / "config.yaml") == config


def test_dotted_overrides_parse_lists_numbers_and_booleans():
    config = get_config(
        "ecar-fmnist",
        [
            "flow.steps_per_stage=[8,8,8]",
            "train.lr=3e-4",
            "stages.full_window=true",
            "model.condition_injection=additive",
        ],
    )
    assert config.flow.steps_per_stage == (8, 8, 8)
    assert config.train.lr == pytest.approx(3e-4)
    assert config.stages.full_window is True
    assert config.model.condition_injection == "additive"


def test_config_is_frozen():
    config = get_config("ecar-debug")
    with pytest.raises(AttributeError):
        config.train.lr = 1.0  # type: ignore[misc]


def test_flat_names_every_leaf():
    flat = get_config("ecar-debug").flat()
    assert flat["train.lr"] == 1e-3
    assert flat["stages.grids"] == [2, 4, 8]


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lrr=1", "train.lrr"),
        ("nosuch.key=1", "nosuch"),
        ("stages.grids=[4,4,16]", "stages.grids"),
        ("stages.grids=[8,4,16]", "stages.grids"),
        ("stages.grids=[3,6,12]", "stages.grids"),  # 12 is not the latent size
        ("stages.window_edges=[0,0.5,1.2,1]", "stages.window_edges"),
        ("stages.window_edges=[0,0.7,0.5,1]", "stages.window_edges"),
        ("stages.window_edges=[0,1]", "stages.window_edges"),
        ("flow.steps_per_stage=[8,8]", "flow.steps_per_stage"),
        ("flow.steps_per_stage=[8,0,8]", "flow.steps_per_stage"),
        ("model.condition_injection=concat", "model.condition_injection"),
        ("model.width=250", "model.width"),
        ("train.zero_stage=4", "train.zero_stage"),
        ("train.global_batch_size=100", "train.global_batch_size"),
        ("sampling.guidance_interval=[0.8,0.2]", "sampling.guidance_interval"),
        ("train.steps=ten", "train.steps"),
        ("stages.full_window=maybe", "stages.full_window"),
        ("stages.loss_weight_growth=0", "stages.loss_weight_growth"),
        ("stages.loss_weights=[1,2]", "stages.loss_weights"),
        ("train.lr", "train.lr"),
    ],
)
def test_invalid_values_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        get_config("ecar-fmnist", [override])


def test_a_grid_that_does_not_divide_the_latent_is_rejected():
    with pytest.raises(ConfigError, match=r"stages.grids\[0\].*does not divide"):
        get_config("ecar-fmnist", ["stages.grids=[3,16]", "flow.steps_per_stage=[4,4]"])


def test_unknown_keys_in_a_file_are_rejected(tmp_path):
    data = get_config("ecar-debug").to_dict()
    data["flow"]["stepsz"] = 3
    with pytest.raises(ConfigError, match="flow.stepsz"):
        Config.from_dict(data)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="ecar-fmnist"):
        get_config("ecar-huge")


def test_accumulation_steps_follow_global_batch():
    config = get_config(
        "ecar-fmnist", ["train.global_batch_size=512", "train.micro_batch_size=64", "train.num_workers=2"]
    )
    assert gradient_accumulation_steps(config.train) == 4


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=inf", "train.lr"),
        ("train.lr=.inf", "train.lr"),
        ("train.grad_clip=nan", "train.grad_clip"),
        ("sampling.cfg_scale=inf", "sampling.cfg_scale"),
        ("train.warmup_steps=-1", "train.warmup_steps"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("train.betas=[1.5,2]", "train.betas"),
        ("train.betas=[0.9,nan]", "train.betas[1]"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("train.torch_threads=-1", "train.torch_threads"),
        ("tokenizer.torch_threads=-2", "tokenizer.torch_threads"),
    ],
)
def test_non_finite_and_out_of_range_training_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        get_config("ecar-debug", [override])


@pytest.mark.parametrize("override", ["train={}", "train={lr: 0.1}", "model=null"])
def test_a_whole_section_cannot_be_replaced_by_one_override(override):
    with pytest.raises(ConfigError, match="is a section"):
        get_config("ecar-debug", [override])


def test_exponent_notation_is_a_number_inside_lists_too():
    config = get_config("ecar-debug", ["train.betas=[9e-1,999e-3]", "stages.window_edges=[0,3e-1,6e-1,1]"])
    assert config.train.betas == pytest.approx((0.9, 0.999))
    assert config.stages.window_edges == pytest.approx((0.0, 0.3, 0.6, 1.0))
