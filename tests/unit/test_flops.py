import json
from dataclasses import replace

import pytest

from ecar.cli import main
from ecar.flops import _meta_model, count, generation_flops, stage_costs
from ecar.presets import get_config

pytestmark = pytest.mark.unit

DIT_XL_2_PUBLISHED_GFLOPS = 118.6  # DiT paper, Table 4 (multiply-add counted once)


def test_dit_xl_2_forward_matches_the_published_count(capsys):
    assert main(["flops", "dit-xl-2", "--json", "--forward-only"]) == 0
    report = json.loads(capsys.readouterr().out)
    gflops = report["forward"]["flow"] / 1e9
    assert abs(gflops / DIT_XL_2_PUBLISHED_GFLOPS - 1) < 0.02
    assert abs(report["parameters"] / 675e6 - 1) < 0.01  # DiT-XL/2: 675M


def test_generation_is_split_by_stage_and_part_and_adds_up():
    report = count(get_config("ecar-debug"))
    assert [s.grid for s in report.generation_stages] == [2, 4, 8]
    for stage in report.generation_stages:
        assert stage.ar > 0 and stage.flow > 0
        assert stage.ar + stage.flow == pytest.approx(stage.total)
    assert report.generation_total == pytest.approx(sum(s.total for s in report.generation_stages))
    assert report.generation_total == pytest.approx(2 * report.generation_unguided)  # CFG doubles


def test_flow_cost_grows_linearly_with_steps_and_the_ar_runs_once_per_stage():
    def stage2(steps):
        report = count(get_config("ecar-debug", [f"flow.steps_per_stage=[1,1,{steps}]", "sampling.cfg_scale=1.0"]))
        return report.generation_stages[2]

    one, two, four = stage2(1), stage2(2), stage2(4)
    per_step = two.flow - one.flow
    assert per_step > 0
    assert four.flow - two.flow == pytest.approx(2 * per_step)  # the condition is prepared once
    assert one.ar == two.ar == four.ar


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("ecar-debug", []),
        # stage 0 unguided (linear ramp, before the interval), stage 1 mixed, stage 2 guided
        (
            "ecar-debug",
            ["flow.steps_per_stage=[2,3,2]", "sampling.guidance_interval=[0.3,1.0]", "sampling.cfg_schedule=linear"],
        ),
        ("ecar-fmnist", ["flow.steps_per_stage=[3,2,1]", "sampling.guidance_interval=[0.3,1.0]"]),
        ("dit-fmnist", ["flow.steps_per_stage=[7]", "sampling.guidance_interval=[0.3,1.0]"]),
    ],
)
def test_counting_each_kind_of_step_once_equals_counting_every_step(preset, overrides):
    config = get_config(preset, overrides)
    model = _meta_model(config)
    guided, unguided = generation_flops(model)
    for stages, sampling in [(guided, config.sampling), (unguided, replace(config.sampling, cfg_scale=1.0))]:
        every_step = stage_costs(model, sampling, config.flow.steps_per_stage)
        assert [{"ar": s.ar, "flow": s.flow, "total": s.total} for s in stages] == every_step  # to the MAC
    assert sum(s.total for s in unguided) < sum(s.total for s in guided) <= 2 * sum(s.total for s in unguided)


def test_dit_generation_is_steps_times_forward():
    report = count(get_config("dit-fmnist", ["flow.steps_per_stage=[5]"]))
    assert report.generation_total == pytest.approx(2 * 5 * report.forward["flow"], rel=1e-3)


def test_text_output_states_the_convention(capsys):
    assert main(["flops", "ecar-debug"]) == 0
    out = capsys.readouterr().out
    assert "multiply-add once" in out and "total" in out


def test_vae_decode_is_counted_for_the_configured_kl_vae_only():
    report = count(get_config("ecar-fmnist"))
    assert report.decode > 0
    wider = count(get_config("ecar-fmnist", ["tokenizer.width=64"]), generation=False)
    assert wider.decode > report.decode
    assert count(get_config("ecar-debug", ["tokenizer.kind=diffusers"]), generation=False).decode is None
