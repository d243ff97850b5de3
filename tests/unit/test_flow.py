import math

import pytest
import torch

from ecar import flow
from ecar.layout import StageLayout

pytestmark = pytest.mark.unit


def block_correlations(noise_BCHW: torch.Tensor, block: int = 2) -> tuple[float, float]:
    """(mean pairwise correlation inside blocks, between horizontally adjacent blocks)."""
    b, c, h, w = noise_BCHW.shape
    tiles = noise_BCHW.view(b, c, h // block, block, w // block, block)
    first, second = tiles[:, :, :, 0, :, 0].flatten(), tiles[:, :, :, 1, :, 1].flatten()
    inside = torch.corrcoef(torch.stack([first, second]))[0, 1].item()
    neighbour = tiles[:, :, :, 0, 1:, 0].flatten(), tiles[:, :, :, 0, :-1, 1].flatten()
    across = torch.corrcoef(torch.stack(neighbour))[0, 1].item()
    return inside, across


def test_block_noise_has_unit_variance_and_minus_one_third_correlation():
    noise = flow.block_noise((4000, 1, 8, 8), 2, -1 / 3, torch.Generator().manual_seed(0))
    inside, across = block_correlations(noise)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01)
    assert noise.std().item() == pytest.approx(1.0, abs=0.01)
    assert inside == pytest.approx(-1 / 3, abs=0.01)
    assert across == pytest.approx(0.0, abs=0.01)


@pytest.mark.parametrize("grids", [(4, 8, 16), (2, 4, 8, 16, 32)])
def test_up_and_renoise_lands_exactly_on_the_training_start_distribution(grids):
    """Monte Carlo: after up-and-re-noise the noise is mean 0, std (1 - a), uncorrelated in blocks,
    and the signal is a * Up(M): the training start a Up(M) + (1 - a) n of the next stage."""
    layout = StageLayout(grids=grids)
    generator = torch.Generator().manual_seed(1)
    batch = 6000
    for s in range(layout.num_stages - 1):
        coarse, fine = grids[s], grids[s + 1]
        end, next_start = layout.ends[s], layout.starts[s + 1]
        signal = torch.randn(1, 1, coarse, coarse, generator=generator).expand(batch, -1, -1, -1)
        noise = torch.randn(batch, 1, coarse, coarse, generator=generator)
        end_state = end * signal + (1 - end) * noise
        start_state = flow.upsample_and_renoise(end_state, fine, end, next_start, generator)
        residual = start_state - next_start * flow.upsample(signal, fine)
        inside, across = block_correlations(residual, fine // coarse)
        assert residual.mean().item() == pytest.approx(0.0, abs=0.01)
        assert residual.std(dim=0).mean().item() == pytest.approx(1 - next_start, rel=0.02)
        assert inside == pytest.approx(0.0, abs=0.02)
        assert across == pytest.approx(0.0, abs=0.02)


def test_renoise_coefficients_match_the_design_closed_form():
    for a in (0.2, 0.5, 0.75):
        b = 2 * a / (1 + a)
        k, sigma, rho = flow.renoise_coefficients(b, a, 2)
        assert k == pytest.approx((1 + a) / 2)
        assert sigma == pytest.approx(math.sqrt(3) * (1 - a) / 2)
        assert rho == pytest.approx(-1 / 3)


def test_without_the_correction_no_noise_is_added_and_blocks_stay_correlated():
    k, sigma, _ = flow.renoise_coefficients(0.5, 0.5, 2)
    assert (k, sigma) == (1.0, 0.0)


def test_one_euler_step_with_the_exact_velocity_lands_on_the_interpolant():
    generator = torch.Generator().manual_seed(2)
    target, previous = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 4, 4, generator=generator)
    noise = torch.randn(3, 4, 8, 8, generator=generator)
    start, end = flow.stage_endpoints(target, previous, noise, 0.2, 2 / 3)
    tau = torch.tensor([0.0, 0.3, 0.9])
    x = flow.interpolate(start, end, tau)
    stepped = flow.euler_step(x, flow.velocity_target(start, end), 0.1)
    assert torch.allclose(stepped, flow.interpolate(start, end, tau + 0.1), atol=1e-6)
    assert torch.allclose(flow.interpolate(start, end, torch.ones(3)), end)


def test_stage_endpoints_follow_the_design():
    target, previous, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 8, 8)
    start, end = flow.stage_endpoints(target, previous, noise, 0.2, 0.6)
    assert torch.allclose(start, 0.2 * flow.upsample(previous, 8) + 0.8 * noise)
    assert torch.allclose(end, 0.6 * target + 0.4 * noise)
    first_start, _ = flow.stage_endpoints(target, None, noise, 0.0, 0.3)
    assert torch.equal(first_start, noise)


@pytest.mark.parametrize("start, end", [(0.0, 1 / 3), (0.2, 2 / 3), (0.5, 1.0)])
def test_clean_estimate_recovers_the_map_from_end_state_and_velocity(start, end):
    target, previous, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 8, 8)
    start_state, end_state = flow.stage_endpoints(target, previous, noise, start, end)
    previous_up = flow.upsample(previous, 8)
    recovered = flow.clean_estimate(end_state, end_state - start_state, start, end, previous_up)
    assert torch.allclose(recovered, target, atol=1e-5)


def test_downsampling_is_area_averaging():
    latents = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(flow.downsample(latents, 2), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    maps = flow.token_maps(latents, (1, 2, 4))
    assert [m.shape[-1] for m in maps] == [1, 2, 4] and maps[0].item() == 7.5


def test_guidance_combination_and_schedule():
    conditional, unconditional = torch.full((2,), 3.0), torch.full((2,), 1.0)
    assert torch.equal(flow.combine_guidance(conditional, unconditional, 1.0), conditional)
    assert torch.equal(flow.combine_guidance(conditional, unconditional, 0.0), unconditional)
    assert torch.equal(flow.combine_guidance(conditional, unconditional, 2.5), torch.full((2,), 6.0))
    assert flow.guidance_scale(4.0, "constant", 0, 3, 0.5, (0.0, 1.0)) == 4.0
    assert flow.guidance_scale(4.0, "linear", 0, 3, 0.5, (0.0, 1.0)) == 1.0
    assert flow.guidance_scale(4.0, "linear", 1, 3, 0.5, (0.0, 1.0)) == 2.5
    assert flow.guidance_scale(4.0, "linear", 2, 3, 0.5, (0.0, 1.0)) == 4.0
    assert flow.guidance_scale(4.0, "constant", 2, 3, 0.9, (0.1, 0.8)) == 1.0


def test_per_sample_generators_make_rows_independent_of_the_batch():
    def generators(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    together = flow.gaussian((3, 2, 4, 4), generators([5, 6, 7]))
    alone = flow.gaussian((1, 2, 4, 4), generators([6]))
    assert torch.equal(together[1:2], alone)


def test_logit_normal_times_lie_inside_the_unit_interval():
    tau = flow.sample_tau(10000, "logit_normal", torch.Generator().manual_seed(0))
    assert 0 < tau.min() and tau.max() < 1
    assert tau.mean().item() == pytest.approx(0.5, abs=0.02)
