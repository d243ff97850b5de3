"""Flow math as pure functions: interpolants, targets, block noise, re-noising, Euler steps.

Signal time t runs from 0 (pure noise) to 1 (data). Within stage s the local time tau in [0, 1]
moves the state from `start = a * Up(M_{s-1}) + (1 - a) * n` to `end = b * M_s + (1 - b) * n`
along a straight line, so the velocity target is `end - start` and the global time is
`a + tau * (b - a)`. Nothing here owns parameters; every function is testable on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Generators = torch.Generator | Sequence[torch.Generator] | None


def gaussian(
    shape: tuple[int, ...],
    generator: Generators = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise. With one generator per sample, row i is drawn from generator i
    alone, so an image depends on its own seed and not on which batch it was sampled in."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])


def downsample(latents_BCHW: torch.Tensor, grid: int) -> torch.Tensor:
    """Area down-sampling to a `grid` x `grid` map (the token map M_s = Down(F, g_s))."""
    if latents_BCHW.shape[-1] == grid:
        return latents_BCHW
    return F.interpolate(latents_BCHW, size=(grid, grid), mode="area")


def upsample(x_BCHW: torch.Tensor, grid: int) -> torch.Tensor:
    """Nearest up-sampling: each coarse value becomes a whole block of the finer grid."""
    if x_BCHW.shape[-1] == grid:
        return x_BCHW
    return F.interpolate(x_BCHW, size=(grid, grid), mode="nearest")


def token_maps(latents_BCHW: torch.Tensor, grids: tuple[int, ...]) -> list[torch.Tensor]:
    """M_1..M_S: the latent area-down-sampled to every stage grid (M_S is the latent itself)."""
    return [downsample(latents_BCHW, g) for g in grids]


def stage_endpoints(
    target_BCHW: torch.Tensor,
    previous_BCHW: torch.Tensor | None,
    noise_BCHW: torch.Tensor,
    start: float,
    end: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training endpoints of one stage: (start state, end state), both at the target's grid.

    `previous_BCHW` is M_{s-1} at its own grid (None for the first stage or a full window),
    up-sampled here to the target grid.
    """
    if previous_BCHW is None or start == 0.0:
        start_BCHW = noise_BCHW
    else:
        previous_up = upsample(previous_BCHW, target_BCHW.shape[-1])
        start_BCHW = start * previous_up + (1.0 - start) * noise_BCHW
    end_BCHW = end * target_BCHW + (1.0 - end) * noise_BCHW
    return start_BCHW, end_BCHW


def interpolate(start_BCHW: torch.Tensor, end_BCHW: torch.Tensor, tau_B: torch.Tensor) -> torch.Tensor:
    """x_tau = tau * end + (1 - tau) * start, per sample."""
    tau = tau_B.view(-1, 1, 1, 1).to(start_BCHW.dtype)
    return tau * end_BCHW + (1.0 - tau) * start_BCHW


def velocity_target(start_BCHW: torch.Tensor, end_BCHW: torch.Tensor) -> torch.Tensor:
    """d x_tau / d tau along the straight path."""
    return end_BCHW - start_BCHW


def global_time(tau_B: torch.Tensor, start: float, end: float) -> torch.Tensor:
    return start + tau_B * (end - start)


def sample_tau(
    batch: int,
    kind: str,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """Local training times in (0, 1): uniform, or logit-normal (SD3) to favour mid-path times."""
    if kind == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
    raise ValueError(f"unknown time sampling {kind!r} (use 'uniform' or 'logit_normal')")


def block_noise(
    shape: tuple[int, ...],
    block: int,
    correlation: float,
    generator: Generators = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Unit-variance Gaussian noise whose values inside each `block` x `block` tile share
    pairwise `correlation` (>= -1 / (block**2 - 1), the most negative an equicorrelated tile allows).

    Built as alpha * (eps - tile mean) + gamma * tile mean with alpha^2 = 1 - rho and
    gamma^2 = 1 + (n - 1) rho, n = block^2: the first part alone has correlation -1/(n-1).
    """
    batch, channels, height, width = shape
    cells = block * block
    floor = -1.0 / (cells - 1) if cells > 1 else 0.0
    if correlation < floor - 1e-9 or correlation > 1.0:
        raise ValueError(f"block correlation {correlation} outside [{floor:.4f}, 1] for {block}x{block} blocks")
    eps = gaussian(shape, generator, device, dtype)
    if cells == 1:
        return eps
    tiles = eps.view(batch, channels, height // block, block, width // block, block)
    mean = tiles.mean(dim=(3, 5), keepdim=True)
    alpha = math.sqrt(max(1.0 - correlation, 0.0))
    gamma = math.sqrt(max(1.0 + (cells - 1) * correlation, 0.0))
    noise = alpha * (tiles - mean) + gamma * mean
    return noise.view(shape)


def renoise_coefficients(previous_end: float, next_start: float, factor: int) -> tuple[float, float, float]:
    """(signal scale k, added noise std, added-noise block correlation) for up-and-re-noise.

    The end state b M + (1 - b) n, nearest-up-sampled and scaled by k = a / b, carries signal
    a M and block-constant noise of std k (1 - b). Block noise of std sigma and correlation rho
    is added so the total has std (1 - a) and zero correlation inside each block, i.e. is the
    i.i.d. training start noise. That is possible exactly when (1 - a) >= factor * k (1 - b),
    with equality under the re-noise correction (`layout.corrected_start`): then rho is
    -1 / (factor^2 - 1), for factor 2 k = (1 + a) / 2, sigma = sqrt(3) (1 - a) / 2 and
    rho = -1/3. Otherwise the closest feasible noise is used (without the correction: no noise
    is added and blocks stay correlated).
    """
    a, b = next_start, previous_end
    if not 0.0 < b <= 1.0:
        raise ValueError(f"previous stage end {b} must lie in (0, 1]")
    k = a / b
    carried_var = (k * (1.0 - b)) ** 2
    added_var = max((1.0 - a) ** 2 - carried_var, 0.0)
    if added_var <= 1e-12:
        return k, 0.0, 0.0
    cells = factor * factor
    floor = -1.0 / (cells - 1) if cells > 1 else 0.0
    correlation = max(-carried_var / added_var, floor)
    return k, math.sqrt(added_var), correlation


def upsample_and_renoise(
    end_state_BCHW: torch.Tensor,
    grid: int,
    previous_end: float,
    next_start: float,
    generator: Generators = None,
) -> torch.Tensor:
    """Move a stage's end state (time b) to the next stage's start state (time a) at `grid`."""
    factor = grid // end_state_BCHW.shape[-1]
    k, sigma, rho = renoise_coefficients(previous_end, next_start, factor)
    up = upsample(end_state_BCHW, grid)
    if sigma == 0.0:
        return k * up
    noise = block_noise(tuple(up.shape), factor, rho, generator, up.device, up.dtype)
    return k * up + sigma * noise


def start_noise(start_state_BCHW: torch.Tensor, previous_BCHW: torch.Tensor, start: float) -> torch.Tensor:
    """The noise n of a start state a * Up(M_{s-1}) + (1 - a) * n, given M_{s-1} at its own grid."""
    previous_up = upsample(previous_BCHW, start_state_BCHW.shape[-1])
    return (start_state_BCHW - start * previous_up) / (1.0 - start)


def euler_step(x_BCHW: torch.Tensor, velocity_BCHW: torch.Tensor, dtau: float) -> torch.Tensor:
    return x_BCHW + dtau * velocity_BCHW


def clean_estimate(
    end_state_BCHW: torch.Tensor,
    velocity_BCHW: torch.Tensor,
    start: float,
    end: float,
    previous_up_BCHW: torch.Tensor | None,
) -> torch.Tensor:
    """Recover M_s from a stage's end state and velocity (two linear equations in M_s and n).

    end = b M + (1 - b) n and start = end - v = a P + (1 - a) n, with P the up-sampled previous
    map (absent when a = 0): n = (end - v - a P) / (1 - a), then M = (end - (1 - b) n) / b.
    """
    start_state = end_state_BCHW - velocity_BCHW
    if start > 0.0 and previous_up_BCHW is not None:
        start_state = start_state - start * previous_up_BCHW
    noise = start_state / (1.0 - start)
    return (end_state_BCHW - (1.0 - end) * noise) / end


def combine_guidance(velocity_cond: torch.Tensor, velocity_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v = v_u + w (v_c - v_u)."""
    return velocity_uncond + scale * (velocity_cond - velocity_uncond)


def guidance_scale(
    scale: float,
    schedule: str,
    stage: int,
    num_stages: int,
    time: float,
    interval: tuple[float, float],
) -> float:
    """The CFG scale at one Euler step: the stage ramp, then 1 (no guidance) outside the interval."""
    low, high = interval
    if not low <= time <= high:
        return 1.0
    if schedule == "constant" or num_stages == 1:
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * stage / (num_stages - 1)
    raise ValueError(f"unknown guidance schedule {schedule!r} (use 'constant' or 'linear')")
