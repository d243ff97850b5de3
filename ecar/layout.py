"""Stage geometry, derived once: grids, token counts, offsets, block-causal mask, time windows.

The AR transformer, the loss and the sampler all read these from one `StageLayout` instead of
recomputing them (VAR computes them twice and repeats the scale tuple five times).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ecar.config import Config


def corrected_start(previous_end: float, factor: int) -> float:
    """The next stage's start a for a previous end b and grid ratio f: a = b / (f - (f - 1) b).

    Nearest up-sampling by f copies the end state's noise (std k (1 - b), k = a / b) into every
    cell of an f x f block; added block noise can cancel that correlation only while
    f k (1 - b) <= 1 - a (its most negative correlation is -1 / (f^2 - 1)). This start meets it
    with equality, so no signal time is wasted on extra noise.
    """
    return previous_end / (factor - (factor - 1) * previous_end)


@dataclass(frozen=True)
class StageLayout:
    """Geometry of S stages over a latent of side `grids[-1]`, tokenised in `patch_size` patches.

    Windows are in signal time t (0 = noise, 1 = data): stage s owns [starts[s], ends[s]].
    Ends are the split points (even by default, or `window_edges`); with `renoise_correction`
    each next start is moved to a_{s+1} = b_s / (f - (f - 1) b_s), f the grid ratio between the
    two stages: the latest start from which up-sampling plus block-noise re-noising of a stage's
    end state is exactly the next stage's training start distribution (i.i.d. noise of std
    1 - a; see `flow.renoise_coefficients`). For f = 2 it is b / (2 - b), the inverse of
    Pyramidal Flow's b = 2a / (1 + a).
    """

    grids: tuple[int, ...]
    patch_size: int = 1
    window_edges: tuple[float, ...] | None = None
    renoise_correction: bool = True
    full_window: bool = False

    @classmethod
    def from_config(cls, config: Config) -> StageLayout:
        return cls(
            grids=tuple(config.stages.grids),
            patch_size=config.model.patch_size,
            window_edges=config.stages.window_edges,
            renoise_correction=config.stages.renoise_correction,
            full_window=config.stages.full_window,
        )

    @property
    def num_stages(self) -> int:
        return len(self.grids)

    @cached_property
    def token_grids(self) -> tuple[int, ...]:
        """Side of each stage's token grid (grid / patch size)."""
        return tuple(g // self.patch_size for g in self.grids)

    @cached_property
    def token_counts(self) -> tuple[int, ...]:
        return tuple(n * n for n in self.token_grids)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Sequence offset of each stage's first token, plus the total length at the end."""
        offsets = [0]
        for count in self.token_counts:
            offsets.append(offsets[-1] + count)
        return tuple(offsets)

    @property
    def total_tokens(self) -> int:
        return self.offsets[-1]

    def stage_slice(self, stage: int) -> slice:
        return slice(self.offsets[stage], self.offsets[stage + 1])

    @cached_property
    def stage_of_token(self) -> torch.Tensor:
        """(L,) long: the stage index of every token of the full AR sequence."""
        # Built on the CPU explicitly, also under a `torch.device("meta")` context.
        return torch.repeat_interleave(
            torch.arange(self.num_stages, device="cpu"), torch.tensor(self.token_counts, device="cpu")
        )

    @cached_property
    def block_causal_mask(self) -> torch.Tensor:
        """(L, L) bool, True = may attend: a token of stage i sees every token of stages <= i."""
        stage = self.stage_of_token
        return stage[None, :] <= stage[:, None]

    @cached_property
    def ends(self) -> tuple[float, ...]:
        if self.full_window:
            return (1.0,) * self.num_stages
        if self.window_edges is not None:
            return tuple(float(e) for e in self.window_edges[1:])
        count = self.num_stages
        return tuple((s + 1) / count for s in range(count))

    @cached_property
    def starts(self) -> tuple[float, ...]:
        if self.full_window:
            return (0.0,) * self.num_stages
        starts = [0.0]
        for s, end in enumerate(self.ends[:-1]):
            factor = self.grids[s + 1] // self.grids[s]
            starts.append(corrected_start(end, factor) if self.renoise_correction else end)
        return tuple(starts)

    @property
    def windows(self) -> tuple[tuple[float, float], ...]:
        return tuple(zip(self.starts, self.ends))
