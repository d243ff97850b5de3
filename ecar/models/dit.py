"""The flow-DiT baseline: the same blocks over the full latent, one rectified-flow path (SiT-style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ecar import flow
from ecar.config import Config, SamplingConfig
from ecar.euler import integrate, step_scales, with_null_labels
from ecar.models.ecar import ClassConditional
from ecar.models.flow_net import FlowTransformer


class FlowDiT(ClassConditional):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        model = config.model
        self.class_embed = nn.Embedding(model.num_classes + 1, model.width)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        self.flow = FlowTransformer(
            model.latent_channels,
            model.width,
            model.flow_depth,
            model.heads,
            model.mlp_ratio,
            model.patch_size,
            self.layout.token_grids[-1],
            injection=None,
        )

    def velocity(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        return self.flow(x_BCHW, t_B, self.class_embed(labels_B))

    def loss(
        self, latents_BCHW: torch.Tensor, labels_B: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """{"loss", "loss_stage0"}: velocity MSE on the straight noise-to-data path."""
        noise = flow.gaussian(tuple(latents_BCHW.shape), generator, latents_BCHW.device, latents_BCHW.dtype)
        tau = self.sample_tau(latents_BCHW.shape[0], latents_BCHW.device, generator)
        x = flow.interpolate(noise, latents_BCHW, tau)
        velocity = self.velocity(x, tau.to(x.dtype), self.drop_labels(labels_B, generator))
        return self.weighted_total([F.mse_loss(velocity, flow.velocity_target(noise, latents_BCHW))])

    @torch.no_grad()
    def generate(
        self,
        labels_B: torch.Tensor,
        sampling: SamplingConfig | None = None,
        generator: flow.Generators = None,
        steps_per_stage: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        sampling = sampling or self.config.sampling
        (steps,) = steps_per_stage or self.config.flow.steps_per_stage
        model = self.config.model
        scales = step_scales(sampling, 0, 1, 0.0, 1.0, steps)
        labels = with_null_labels(labels_B, self.null_class, any(s != 1.0 for s in scales))
        shape = (labels_B.shape[0], model.latent_channels, model.latent_size, model.latent_size)
        x = flow.gaussian(shape, generator, labels_B.device, self.flow.patch_embed.weight.dtype)

        def network(x_in, t_in, rows):
            return self.velocity(x_in, t_in, labels if rows is None else labels[rows])

        x, _ = integrate(network, x, 0.0, 1.0, scales)
        return x
