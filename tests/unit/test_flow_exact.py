"""Exact values of the flow math, the Euler/CFG loop, the layout and E-CAR's stage plumbing.

The other unit tests check these mostly through statistics (Monte Carlo noise correlations) and
end-to-end equalities (an oracle sampler landing on the data point). Both are blind to a few
changes that keep a distribution or a final state but not the computed values: a sign flip of a
symmetric noise term, a dropped generator or dtype, a time handed to the network that the loss
never checks, a keyword argument silently ignored. These tests pin such values.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ecar import flow
from ecar.config import SamplingConfig
from ecar.euler import step_scales
from ecar.layout import StageLayout
from ecar.models import build_model
from ecar.presets import get_config

pytestmark = pytest.mark.unit


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- noise: devices, dtypes, generators, validation --------------------------------------------
def test_noise_follows_the_requested_device_and_dtype_not_the_default_device():
    with torch.device("meta"):
        assert flow.gaussian((2, 3), device="cpu").device.type == "cpu"
        assert flow.gaussian((2, 3), [seeded(1), seeded(2)], device="cpu").device.type == "cpu"
        assert flow.block_noise((1, 1, 4, 4), 2, -1 / 3, device="cpu").device.type == "cpu"
        for kind in ("uniform", "logit_normal"):
            assert flow.sample_tau(4, kind, device="cpu").device.type == "cpu"
    assert flow.gaussian((2, 3), [seeded(1), seeded(2)], dtype=torch.float64).dtype == torch.float64
    assert flow.block_noise((1, 1, 4, 4), 2, -1 / 3, seeded(0), dtype=torch.float64).dtype == torch.float64


def test_a_generator_count_that_is_not_the_batch_is_refused():
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        flow.gaussian((3, 4), [seeded(1), seeded(2)])


def test_block_noise_at_correlation_zero_one_and_block_one():
    """rho = 0: the draw itself; rho = 1: every tile is one value, 2 x (its tile mean of the draw)
    (unit variance); a 1 x 1 block: the draw itself."""
    shape = (3, 2, 4, 4)
    draw = flow.gaussian(shape, seeded(5), dtype=torch.float64)
    torch.testing.assert_close(flow.block_noise(shape, 2, 0.0, seeded(5), dtype=torch.float64), draw)
    assert torch.equal(flow.block_noise(shape, 1, 0.0, seeded(5), dtype=torch.float64), draw)
    tile_mean = torch.nn.functional.avg_pool2d(draw, 2)
    torch.testing.assert_close(
        flow.block_noise(shape, 2, 1.0, seeded(5), dtype=torch.float64), flow.upsample(2 * tile_mean, 4)
    )


def test_block_noise_with_positive_correlation():
    noise = flow.block_noise((4000, 1, 8, 8), 2, 0.5, seeded(0))
    tiles = noise.view(4000, 1, 4, 2, 4, 2)
    first, second = tiles[:, :, :, 0, :, 0].flatten(), tiles[:, :, :, 1, :, 1].flatten()
    assert noise.std().item() == pytest.approx(1.0, abs=0.01)
    assert torch.corrcoef(torch.stack([first, second]))[0, 1].item() == pytest.approx(0.5, abs=0.01)


def test_block_noise_accepts_exactly_its_correlation_range():
    for correlation in (-1 / 3, 1.0):
        flow.block_noise((1, 1, 2, 2), 2, correlation, seeded(0))
    for correlation in (-0.34, 1.01):
        with pytest.raises(ValueError, match=r"outside \[-0.3333, 1\] for 2x2 blocks"):
            flow.block_noise((1, 1, 2, 2), 2, correlation, seeded(0))


# ----- re-noising ---------------------------------------------------------------------------------
def test_renoise_coefficients_beyond_the_design_case():
    # without the correction: nothing added, and nothing to correlate
    assert flow.renoise_coefficients(0.5, 0.5, 2) == (1.0, 0.0, 0.0)
    # a previous stage that ended on the data: all of the next start's noise is added, i.i.d.
    assert flow.renoise_coefficients(1.0, 0.25, 2) == pytest.approx((0.25, 0.75, 0.0))
    # a start later than the correction allows: the closest feasible noise, at the floor -1/3
    k, sigma, rho = flow.renoise_coefficients(0.5, 0.4, 2)
    assert (k, sigma, rho) == pytest.approx((0.8, math.sqrt(0.36 - 0.16), -1 / 3))
    # factor 3: floor -1/8; the correction a = b / (3 - 2b) meets it exactly
    b = 0.5
    k, sigma, rho = flow.renoise_coefficients(b, b / (3 - 2 * b), 3)
    assert rho == pytest.approx(-1 / 8)
    # no up-sampling (factor 1): added noise is independent
    assert flow.renoise_coefficients(0.5, 0.25, 1) == pytest.approx((0.5, math.sqrt(0.5), 0.0))


@pytest.mark.parametrize("previous_end", [0.0, -0.1, 1.5])
def test_renoise_refuses_a_previous_end_outside_the_unit_interval(previous_end):
    with pytest.raises(ValueError, match=f"previous stage end {previous_end} must lie in"):
        flow.renoise_coefficients(previous_end, 0.2, 2)


def test_up_and_renoise_is_scaled_up_state_plus_the_seeded_block_noise():
    end_state = torch.randn(2, 3, 4, 4, generator=seeded(0), dtype=torch.float64)
    k, sigma, rho = flow.renoise_coefficients(1 / 3, 0.2, 2)
    expected = k * flow.upsample(end_state, 8) + sigma * flow.block_noise(
        (2, 3, 8, 8), 2, rho, seeded(9), dtype=torch.float64
    )
    out = flow.upsample_and_renoise(end_state, 8, 1 / 3, 0.2, seeded(9))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_start_noise_inverts_the_start_state():
    generator = seeded(3)
    previous, noise = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    start_state = 0.2 * flow.upsample(previous, 8) + 0.8 * noise
    torch.testing.assert_close(flow.start_noise(start_state, previous, 0.2), noise)


# ----- time ---------------------------------------------------------------------------------------
def test_global_time_and_interpolation_in_the_states_precision():
    tau = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(flow.global_time(tau, 0.2, 0.6), torch.tensor([0.2, 0.3, 0.6]))
    start, end = torch.zeros(3, 1, 2, 2, dtype=torch.bfloat16), torch.ones(3, 1, 2, 2, dtype=torch.bfloat16)
    x = flow.interpolate(start, end, tau)
    assert x.dtype == torch.bfloat16
    assert x[:, 0, 0, 0].tolist() == [0.0, 0.25, 1.0]


def test_training_times_are_reproducible_from_their_generator():
    for kind in ("uniform", "logit_normal"):
        assert torch.equal(flow.sample_tau(64, kind, seeded(4)), flow.sample_tau(64, kind, seeded(4)))
    # the default logit-normal is the standard one: logit(tau) ~ N(0, 1)
    logits = torch.logit(flow.sample_tau(20000, "logit_normal", seeded(0)))
    assert logits.mean().item() == pytest.approx(0.0, abs=0.03)
    assert logits.std().item() == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError, match="unknown time sampling 'beta'"):
        flow.sample_tau(4, "beta")


# ----- guidance -----------------------------------------------------------------------------------
def test_guidance_interval_is_closed_and_the_linear_ramp_spans_the_stages():
    assert flow.guidance_scale(4.0, "constant", 0, 3, 0.5, (0.5, 1.0)) == 4.0
    assert flow.guidance_scale(4.0, "constant", 2, 3, 1.0, (0.5, 1.0)) == 4.0
    assert flow.guidance_scale(4.0, "linear", 0, 2, 0.5, (0.0, 1.0)) == 1.0
    assert flow.guidance_scale(4.0, "linear", 1, 2, 0.5, (0.0, 1.0)) == 4.0
    assert flow.guidance_scale(4.0, "linear", 0, 1, 0.5, (0.0, 1.0)) == 4.0  # one stage: the full scale
    with pytest.raises(ValueError, match="unknown guidance schedule 'cosine'"):
        flow.guidance_scale(4.0, "cosine", 0, 3, 0.5, (0.0, 1.0))


def test_step_scales_follow_the_euler_time_grid():
    sampling = SamplingConfig(cfg_scale=3.0, guidance_interval=(0.3, 0.6))
    # t_k = 0.2 + k / 4 * 0.6 = 0.2, 0.35, 0.5, 0.65
    assert step_scales(sampling, 0, 3, 0.2, 0.8, 4) == [1.0, 3.0, 3.0, 1.0]
    linear = dataclasses.replace(sampling, cfg_schedule="linear", guidance_interval=(0.0, 1.0))
    assert step_scales(linear, 1, 3, 0.2, 0.8, 2) == [2.0, 2.0]


# ----- layout -------------------------------------------------------------------------------------
def test_layout_from_config_takes_every_stage_setting():
    edges = get_config("ecar-debug", ["stages.window_edges=[0.0,0.5,0.8,1.0]", "stages.renoise_correction=false"])
    assert StageLayout.from_config(edges).windows == ((0.0, 0.5), (0.5, 0.8), (0.8, 1.0))
    full = get_config("ecar-debug", ["stages.full_window=true"])
    assert StageLayout.from_config(full).windows == ((0.0, 1.0),) * 3


def test_the_mask_is_built_on_the_cpu_under_another_default_device():
    with torch.device("meta"):
        mask = StageLayout(grids=(1, 2)).block_causal_mask
    assert mask.device.type == "cpu"
    assert mask.tolist() == [[True, False, False, False, False]] + [[True] * 5] * 4


# ----- E-CAR: what the loss hands the flow --------------------------------------------------------
class ZeroAR(torch.nn.Module):
    """Stands in for the AR in training: records its labels and maps, returns a zero condition."""

    def __init__(self, layout: StageLayout, width: int) -> None:
        super().__init__()
        self.layout, self.width = layout, width

    def forward(self, labels_B, maps, num_stages=None):
        self.labels, self.maps = labels_B.clone(), [m.clone() for m in maps]
        return torch.zeros(labels_B.shape[0], self.layout.total_tokens, self.width, dtype=maps[0].dtype)


def loss_inputs(model, latents, labels, tau):
    """(flow inputs {stage: (x, t)}, the AR's maps, the losses) with every tau fixed, zero velocity."""
    seen = {}

    def velocity(stage, x_BCHW, t_B, condition):
        seen[stage] = (x_BCHW.clone(), t_B.clone())
        return torch.zeros_like(x_BCHW)

    model.ar = ZeroAR(model.layout, model.config.model.width)
    model.stage_velocity = velocity
    model.sample_tau = lambda n, device, generator: torch.full((n,), tau, dtype=torch.float64)
    losses = model.loss(latents, labels, seeded(0))  # the same draws for every tau
    assert torch.equal(model.ar.labels, labels)
    return seen, model.ar.maps, losses


@pytest.mark.parametrize("next_input", ["clean_estimate", "noisy_end"])
def test_loss_hands_the_flow_the_interpolant_its_time_and_the_straight_path_target(next_input):
    """Start (tau = 0) and end (tau = 1) of every stage share their noise n: start = a Up(M_{s-1})
    + (1 - a) n, end = b M_s + (1 - b) n; at tau the flow sees (1 - tau) start + tau end at
    t = a + tau (b - a); with zero velocity each stage's loss is mean((end - start)^2)."""
    torch.manual_seed(0)
    model = (
        build_model(get_config("ecar-debug", [f"model.ar_next_input={next_input}", "stages.loss_weights=[1,2,3]"]))
        .double()
        .eval()
    )
    latents, labels = torch.randn(4, 4, 8, 8, generator=seeded(1), dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    starts, _, _ = loss_inputs(model, latents, labels, 0.0)
    ends, ar_maps, _ = loss_inputs(model, latents, labels, 1.0)
    middles, _, losses = loss_inputs(model, latents, labels, 0.25)
    maps = flow.token_maps(latents, model.layout.grids)
    stage_losses = []
    for s, (a, b) in enumerate(model.layout.windows):
        start, end = starts[s][0], ends[s][0]
        start_noise = start if s == 0 else (start - a * flow.upsample(maps[s - 1], start.shape[-1])) / (1 - a)
        if b < 1:
            torch.testing.assert_close((end - b * maps[s]) / (1 - b), start_noise)
        else:
            torch.testing.assert_close(end, maps[s], rtol=0, atol=0)
        torch.testing.assert_close(middles[s][0], 0.75 * start + 0.25 * end)
        for tau, seen in ((0.0, starts), (1.0, ends), (0.25, middles)):
            torch.testing.assert_close(seen[s][1], torch.full((4,), a + tau * (b - a), dtype=torch.float64))
        stage_losses.append(((end - start) ** 2).mean())
        torch.testing.assert_close(losses[f"loss_stage{s}"], stage_losses[-1])
    torch.testing.assert_close(losses["loss"], (stage_losses[0] + 2 * stage_losses[1] + 3 * stage_losses[2]) / 6)
    # the AR sees the clean maps (teacher forcing) or the stages' noisy end states
    expected = maps if next_input == "clean_estimate" else [ends[s][0] for s in range(3)]
    for given, wanted in zip(ar_maps, expected):
        torch.testing.assert_close(given, wanted, rtol=0, atol=0)


@pytest.mark.parametrize("next_input", ["clean_estimate", "noisy_end"])
def test_only_the_noisy_end_chain_carries_a_stage_s_noise_into_the_next_start(next_input):
    """Teacher forcing draws every stage's noise afresh; the noisy-end chain starts stage s + 1
    from stage s's end state, so their noises correlate."""
    torch.manual_seed(0)
    model = build_model(get_config("ecar-debug", [f"model.ar_next_input={next_input}"])).double().eval()
    latents, labels = torch.randn(256, 4, 8, 8, generator=seeded(2), dtype=torch.float64), torch.zeros(256).long()
    starts, _, _ = loss_inputs(model, latents, labels, 0.0)
    ends, _, _ = loss_inputs(model, latents, labels, 1.0)
    maps = flow.token_maps(latents, model.layout.grids)
    (_, b0), (a1, _) = model.layout.windows[:2]
    previous_noise = (ends[0][0] - b0 * maps[0]) / (1 - b0)
    grid = model.layout.grids[1]
    next_noise = (starts[1][0] - a1 * flow.upsample(maps[0], grid)) / (1 - a1)
    pair = torch.stack([flow.upsample(previous_noise, grid).flatten(), next_noise.flatten()])
    correlation = torch.corrcoef(pair)[0, 1].item()
    if next_input == "clean_estimate":
        assert abs(correlation) < 0.02
    else:
        assert correlation > 0.3


@pytest.mark.parametrize("next_input", ["clean_estimate", "noisy_end"])
def test_a_bfloat16_model_samples_and_trains_on_bfloat16_states(next_input):
    """Noise is drawn in the model's (sampling) or the latents' (training) dtype: float32 noise
    would hand a bfloat16 flow float32 inputs."""
    torch.manual_seed(0)
    model = build_model(get_config("ecar-debug", [f"model.ar_next_input={next_input}"])).to(torch.bfloat16).eval()
    latents = torch.randn(2, 4, 8, 8, generator=seeded(1)).to(torch.bfloat16)
    sampled = model.generate(torch.tensor([1, 2]), generator=seeded(0), steps_per_stage=(1, 1, 1))
    assert sampled.dtype == torch.bfloat16
    seen, _, _ = loss_inputs(model, latents, torch.tensor([1, 2]), 0.5)
    assert [(x.dtype, t.dtype) for x, t in seen.values()] == [(torch.bfloat16, torch.bfloat16)] * 3


def test_model_training_switches_reach_the_flow_math():
    torch.manual_seed(0)
    model = build_model(get_config("ecar-debug", ["flow.time_sampling=logit_normal", "flow.logit_normal_std=0.5"]))
    logits = torch.logit(model.sample_tau(20000, torch.device("cpu"), seeded(0)))
    assert logits.std().item() == pytest.approx(0.5, abs=0.01)
    model.train()
    labels = torch.arange(64) % 10
    assert torch.equal(model.drop_labels(labels, seeded(3)), model.drop_labels(labels, seeded(3)))
    # the stage embedding starts small, as the other zero- or small-initialised conditioning paths
    assert model.flow_stage_embed.weight.std().item() == pytest.approx(0.02, rel=0.2)


# ----- E-CAR: the stage loop ----------------------------------------------------------------------
class ZeroSamplingAR(torch.nn.Module):
    """Stands in for the AR at sampling: counts KV-cached steps and full passes, returns zeros."""

    def __init__(self, layout: StageLayout, width: int) -> None:
        super().__init__()
        self.layout, self.width, self.steps, self.passes = layout, width, 0, 0

    def new_cache(self):
        return []

    def step(self, stage, labels_B, previous_BCHW, cache):
        self.steps += 1
        return torch.zeros(labels_B.shape[0], self.layout.token_counts[stage], self.width)

    def forward(self, labels_B, maps, num_stages=None):
        self.passes += 1
        return torch.zeros(labels_B.shape[0], self.layout.offsets[num_stages or self.layout.num_stages], self.width)


def counting(model):
    """Replace the AR and the flow by zero stubs; returns the (stage, rows) of every flow call."""
    calls = []

    def velocity(stage, x_BCHW, t_B, condition):
        calls.append((stage, x_BCHW.shape[0]))
        return torch.zeros_like(x_BCHW)

    model.ar = ZeroSamplingAR(model.layout, model.config.model.width)
    model.stage_velocity = velocity
    return calls


def test_the_stage_loop_honours_its_arguments():
    torch.manual_seed(0)
    model = build_model(get_config("ecar-debug")).eval()
    calls = counting(model)
    labels, unguided = torch.tensor([1, 2]), dataclasses.replace(model.config.sampling, cfg_scale=1.0)
    results = list(model.iter_stages(labels, unguided, seeded(0), steps_per_stage=(2, 1, 3)))
    assert [r.stage for r in results] == [0, 1, 2]
    assert calls == [(0, 2), (0, 2), (1, 2), (2, 2), (2, 2), (2, 2)]
    assert (model.ar.steps, model.ar.passes) == (3, 0)  # the KV cache by default
    calls.clear()
    model.generate(labels, unguided, seeded(0), steps_per_stage=(1, 2, 1))
    assert calls == [(0, 2), (1, 2), (1, 2), (2, 2)]
    # a linear guidance ramp: stage 0 unguided (one pass), the later stages as CFG pairs
    calls.clear()
    linear = dataclasses.replace(model.config.sampling, cfg_scale=3.0, cfg_schedule="linear")
    model.generate(labels, linear, seeded(0), steps_per_stage=(1, 1, 1))
    assert calls == [(0, 2), (1, 4), (2, 4)]
    with pytest.raises(ValueError, match=r"steps_per_stage \[1, 1\] needs one entry per stage \(3\)"):
        next(model.iter_stages(labels, steps_per_stage=(1, 1)))


def test_sampling_and_training_follow_the_inputs_device_not_the_default_device():
    """Every tensor E-CAR makes is placed on its inputs' device (a GPU in production): under a
    meta default device, CPU inputs still give the CPU results bit for bit."""
    torch.manual_seed(0)
    model = build_model(get_config("ecar-debug")).eval()
    labels, latents = torch.tensor([1, 2]), torch.randn(2, 4, 8, 8, generator=seeded(1))
    sampled = model.generate(labels, generator=seeded(0), steps_per_stage=(1, 1, 1))
    model.train()
    loss = model.loss(latents, labels, seeded(0))["loss"]
    with torch.device("meta"):
        model.eval()
        assert torch.equal(model.generate(labels, generator=seeded(0), steps_per_stage=(1, 1, 1)), sampled)
        model.train()
        assert torch.equal(model.loss(latents, labels, seeded(0))["loss"], loss)


def test_up_and_renoise_without_room_for_noise_is_the_scaled_up_state_alone():
    """b = a = 1/2 at factor 2: the carried noise k (1 - b) already has the start's std 1 - a,
    so nothing is added (sigma = 0) and the start is exactly k Up(x) (here k = 1)."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert flow.renoise_coefficients(0.5, 0.5, 2)[1] == 0.0
    assert torch.equal(flow.upsample_and_renoise(x, 8, previous_end=0.5, next_start=0.5), flow.upsample(x, 8))
    # k = a / b = 2: the carried noise 2 (1 - b) = 1.5 exceeds 1 - a = 0.5, still nothing is added
    assert flow.renoise_coefficients(0.25, 0.5, 2)[1] == 0.0
    assert torch.equal(flow.upsample_and_renoise(x, 8, previous_end=0.25, next_start=0.5), 2.0 * flow.upsample(x, 8))
