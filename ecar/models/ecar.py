"""E-CAR: an AR transformer conditions one flow transformer that denoises stage by stage.

`loss` trains both end to end through the flow-matching loss of every stage; `generate` runs
the stages: AR step, K_s guided Euler steps inside the stage's time window, recovery of the
clean map for the next AR input, then up-sampling and re-noising into the next stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ecar import flow
from ecar.config import Config, SamplingConfig
from ecar.euler import integrate, step_scales, with_null_labels
from ecar.layout import StageLayout
from ecar.models.ar import ARTransformer
from ecar.models.flow_net import FlowCondition, FlowTransformer


class ClassConditional(nn.Module):
    """What E-CAR and the flow-DiT share: config, layout, label dropout, the loss dictionary."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.layout = StageLayout.from_config(config)
        self.null_class = config.model.num_classes

    def drop_labels(self, labels_B: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace labels by the null class with probability `class_dropout` (training only)."""
        probability = self.config.model.class_dropout
        if not self.training or probability == 0.0:
            return labels_B
        drop = torch.rand(labels_B.shape, generator=generator, device=labels_B.device) < probability
        return torch.where(drop, torch.full_like(labels_B, self.null_class), labels_B)

    def sample_tau(self, batch: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        settings = self.config.flow
        return flow.sample_tau(
            batch, settings.time_sampling, generator, device, settings.logit_normal_mean, settings.logit_normal_std
        )

    def weighted_total(self, stage_losses: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = self.config.stages.stage_loss_weights()
        total = sum(w * loss for w, loss in zip(weights, stage_losses)) / sum(weights)
        result = {"loss": total}
        result.update({f"loss_stage{s}": loss.detach() for s, loss in enumerate(stage_losses)})
        return result


@dataclass
class StageResult:
    """One finished sampling stage: its end state and the clean map passed to the AR."""

    stage: int
    end_state: torch.Tensor
    clean: torch.Tensor


class ECAR(ClassConditional):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        model, layout = config.model, self.layout
        self.ar = ARTransformer(
            layout, model.latent_channels, model.width, model.ar_depth, model.heads, model.mlp_ratio, model.num_classes
        )
        self.flow = FlowTransformer(
            model.latent_channels,
            model.width,
            model.flow_depth,
            model.heads,
            model.mlp_ratio,
            model.patch_size,
            layout.token_grids[-1],
            injection=model.condition_injection,
        )
        # The flow network is shared by stages whose windows overlap; the stage embedding tells
        # it which grid and window it is in beyond what t alone says.
        self.flow_stage_embed = nn.Embedding(layout.num_stages, model.width)
        nn.init.normal_(self.flow_stage_embed.weight, std=0.02)

    def stage_velocity(
        self, stage: int, x_BCHW: torch.Tensor, t_B: torch.Tensor, condition: FlowCondition
    ) -> torch.Tensor:
        stage_B = torch.full((x_BCHW.shape[0],), stage, dtype=torch.long, device=x_BCHW.device)
        stage_BD = self.flow_stage_embed(stage_B)
        return self.flow(x_BCHW, t_B, stage_BD, condition)

    def loss(
        self, latents_BCHW: torch.Tensor, labels_B: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """{"loss": weighted mean over stages, "loss_stage{s}": each stage's velocity MSE}.

        The AR sees at each stage what it sees at sampling: the clean map M_{s-1} (teacher
        forcing; `ar_next_input="clean_estimate"`, which the sampler approximates by the
        recovered clean estimate), or the previous stage's noisy end state (`"noisy_end"`). In
        the latter case the next stage also starts from that same end state, up-sampled and
        re-noised as the sampler does, so the AR's input and the flow's start share their noise
        exactly as they do at sampling.
        """
        layout = self.layout
        maps = flow.token_maps(latents_BCHW, layout.grids)
        labels = self.drop_labels(labels_B, generator)
        batch = latents_BCHW.shape[0]
        chained = self.config.model.ar_next_input == "noisy_end"
        starts, ends, taus = [], [], []
        for s in range(layout.num_stages):  # each stage's noise, then its times: one seeded stream
            start_state, end_state = self.stage_path(s, maps, ends, generator)
            starts.append(start_state)
            ends.append(end_state)
            taus.append(self.sample_tau(batch, latents_BCHW.device, generator))
        conditions = self.ar(labels, ends if chained else maps)
        stage_losses = []
        for s, (start, end) in enumerate(layout.windows):
            x = flow.interpolate(starts[s], ends[s], taus[s])
            t = flow.global_time(taus[s], start, end).to(x.dtype)
            condition = self.flow.prepare_condition(conditions[:, layout.stage_slice(s)])
            velocity = self.stage_velocity(s, x, t, condition)
            stage_losses.append(F.mse_loss(velocity, flow.velocity_target(starts[s], ends[s])))
        return self.weighted_total(stage_losses)

    def stage_path(
        self, s: int, maps: list[torch.Tensor], ends: list[torch.Tensor], generator: flow.Generators = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage `s`'s training path towards the token map `maps[s]`: (start state, end state),
        given the end states `ends` of the stages before it. With the AR fed the noisy end state,
        the stage starts from the previous end state, up-sampled and re-noised as the sampler
        does, and ends on the same noise."""
        start, end = self.layout.windows[s]
        if self.config.model.ar_next_input == "noisy_end" and s > 0 and start > 0.0:
            start_state = flow.upsample_and_renoise(
                ends[s - 1], self.layout.grids[s], self.layout.ends[s - 1], start, generator
            )
            noise = flow.start_noise(start_state, maps[s - 1], start)
            return start_state, end * maps[s] + (1.0 - end) * noise
        noise = flow.gaussian(tuple(maps[s].shape), generator, maps[s].device, maps[s].dtype)
        return flow.stage_endpoints(maps[s], maps[s - 1] if s > 0 else None, noise, start, end)

    @torch.no_grad()
    def iter_stages(
        self,
        labels_B: torch.Tensor,
        sampling: SamplingConfig | None = None,
        generator: flow.Generators = None,
        steps_per_stage: tuple[int, ...] | None = None,
        use_cache: bool = True,
        given_ends: list[torch.Tensor] | tuple = (),
    ) -> Iterator[StageResult]:
        """Run the stages one by one, yielding after each (FLOP accounting counts per stage).

        `use_cache=False` re-runs the AR over the whole prefix with the block-causal mask at
        every stage instead of the KV cache (same result, more work; a reference for tests).
        `given_ends`: end states of the first stages to take instead of generating them (the
        per-stage diagnostic gives those of real latents, from `stage_path`); the AR reads them
        as it reads generated ones. Only with the AR fed the noisy end state.
        """
        sampling = sampling or self.config.sampling
        steps = steps_per_stage or self.config.flow.steps_per_stage
        layout, model = self.layout, self.config.model
        if len(steps) != layout.num_stages:
            raise ValueError(f"steps_per_stage {list(steps)} needs one entry per stage ({layout.num_stages})")
        if given_ends and model.ar_next_input != "noisy_end":
            raise ValueError("given_ends needs model.ar_next_input='noisy_end' (the AR reads the end states)")
        batch, device = labels_B.shape[0], labels_B.device
        dtype = self.flow.patch_embed.weight.dtype
        scales = [
            step_scales(sampling, s, layout.num_stages, *layout.windows[s], steps[s]) for s in range(layout.num_stages)
        ]
        guided = any(scale != 1.0 for stage_scales in scales for scale in stage_scales)
        ar_labels = with_null_labels(labels_B, self.null_class, guided)
        cache = self.ar.new_cache() if use_cache else None
        ar_inputs: list[torch.Tensor] = []  # clean maps fed to the AR, CFG-doubled
        x = previous_up = None
        for s, (start, end) in enumerate(layout.windows):
            if use_cache:
                z = self.ar.step(s, ar_labels, ar_inputs[-1] if s else None, cache)
            else:
                z = self.ar(ar_labels, ar_inputs, num_stages=s + 1)[:, layout.stage_slice(s)]
            condition = self.flow.prepare_condition(z)
            shape = (batch, model.latent_channels, layout.grids[s], layout.grids[s])
            if s == 0 or start == 0.0:
                x = flow.gaussian(shape, generator, device, dtype)
            else:
                x = flow.upsample_and_renoise(x, layout.grids[s], layout.ends[s - 1], start, generator)

            def network(x_in, t_in, rows, s=s, condition=condition):
                return self.stage_velocity(s, x_in, t_in, condition if rows is None else condition.rows(rows))

            if s < len(given_ends):
                x = clean = given_ends[s]
            else:
                x, velocity = integrate(network, x, start, end, scales[s])
                clean = x
                if model.ar_next_input == "clean_estimate":
                    clean = flow.clean_estimate(x, velocity, start, end, previous_up)
            yield StageResult(stage=s, end_state=x, clean=clean)
            if s + 1 < layout.num_stages:
                previous_up = flow.upsample(clean, layout.grids[s + 1])
                ar_inputs.append(torch.cat([clean, clean]) if guided else clean)

    @torch.no_grad()
    def generate(
        self,
        labels_B: torch.Tensor,
        sampling: SamplingConfig | None = None,
        generator: flow.Generators = None,
        steps_per_stage: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Latents (B, C, H, W) in the scaled latent space (divide by the manifest's scale to decode)."""
        result = None
        for stage_result in self.iter_stages(labels_B, sampling, generator, steps_per_stage):
            result = stage_result
        return result.end_state
