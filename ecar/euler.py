"""The Euler loop with classifier-free guidance, shared by E-CAR stages and the flow-DiT."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ecar.config import SamplingConfig
from ecar.flow import combine_guidance, euler_step, guidance_scale

# network(x_BCHW, t_B, rows) -> velocity; rows=None: the whole [cond; uncond] condition,
# rows=slice(0, B): the conditional half only.
Network = Callable[[torch.Tensor, torch.Tensor, "slice | None"], torch.Tensor]


def step_scales(
    sampling: SamplingConfig, stage: int, num_stages: int, start: float, end: float, steps: int
) -> list[float]:
    """The CFG scale at each Euler step of one stage (1.0 = no unconditional pass)."""
    return [
        guidance_scale(
            sampling.cfg_scale,
            sampling.cfg_schedule,
            stage,
            num_stages,
            start + (k / steps) * (end - start),
            sampling.guidance_interval,
        )
        for k in range(steps)
    ]


def guided_velocity(network: Network, x_BCHW: torch.Tensor, t: float, scale: float) -> torch.Tensor:
    """One network evaluation at time t: conditional only when scale is 1, else a CFG pair."""
    batch = x_BCHW.shape[0]
    t_B = torch.full((batch,), t, device=x_BCHW.device, dtype=x_BCHW.dtype)
    if scale == 1.0:
        return network(x_BCHW, t_B, slice(0, batch))
    velocity = network(torch.cat([x_BCHW, x_BCHW]), torch.cat([t_B, t_B]), None)
    conditional, unconditional = velocity.chunk(2)
    return combine_guidance(conditional, unconditional, scale)


def integrate(
    network: Network,
    x_BCHW: torch.Tensor,
    start: float,
    end: float,
    scales: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler steps over local time tau in [0, 1] (one per scale); returns (end state, last velocity)."""
    steps = len(scales)
    velocity = torch.zeros_like(x_BCHW)
    for k, scale in enumerate(scales):
        t = start + (k / steps) * (end - start)
        velocity = guided_velocity(network, x_BCHW, t, scale)
        x_BCHW = euler_step(x_BCHW, velocity, 1.0 / steps)
    return x_BCHW, velocity


def with_null_labels(labels_B: torch.Tensor, null_class: int, guided: bool) -> torch.Tensor:
    """[labels; null labels] for a CFG batch, or the labels alone."""
    if not guided:
        return labels_B
    return torch.cat([labels_B, torch.full_like(labels_B, null_class)])
