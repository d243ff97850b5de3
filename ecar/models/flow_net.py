"""The flow transformer: velocity of a latent at any stage grid, given time and a condition.

One network serves every E-CAR stage (the stage grid only changes the token count) and is also
the whole flow-DiT, where the condition is the class embedding instead of the AR's map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from ecar.models.blocks import Block, FinalLayer, TimestepEmbedder, initialize, sincos_embedding_2d

INJECTIONS = ("spatial_adaln", "additive", "cross_attention")


@dataclass(frozen=True)
class FlowCondition:
    """What the flow network needs from the AR condition z_s (B x N x D), computed once per stage.

    Exactly one of the fields is set, by the injection mode: per-block spatial modulations
    (plus the final layer's), an additive input term, or per-block cross-attention keys/values.
    """

    block_modulations: tuple[torch.Tensor, ...] | None = None
    final_modulation: torch.Tensor | None = None
    additive: torch.Tensor | None = None
    context_kv: tuple[torch.Tensor, ...] | None = None

    def rows(self, index: slice) -> FlowCondition:
        """The condition for a sub-batch (e.g. the conditional half of a CFG batch)."""

        def batch(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value[index]

        return FlowCondition(
            block_modulations=None
            if self.block_modulations is None
            else tuple(m[index] for m in self.block_modulations),
            final_modulation=batch(self.final_modulation),
            additive=batch(self.additive),
            # keys/values are (2, B, heads, M, d): the batch is dimension 1
            context_kv=None if self.context_kv is None else tuple(kv[:, index] for kv in self.context_kv),
        )


class FlowTransformer(nn.Module):
    """Patchified latent tokens -> velocity. `injection=None`: global conditioning only (DiT)."""

    def __init__(
        self,
        channels: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        patch_size: int,
        finest_token_grid: int,
        injection: str | None,
    ) -> None:
        super().__init__()
        if injection is not None and injection not in INJECTIONS:
            raise ValueError(f"unknown condition injection {injection!r}; use one of {INJECTIONS}")
        self.channels, self.patch_size, self.width = channels, patch_size, width
        self.finest_token_grid = finest_token_grid
        self.injection = injection
        spatial = injection == "spatial_adaln"
        self.patch_embed = nn.Conv2d(channels, width, kernel_size=patch_size, stride=patch_size)
        self.time_embed = TimestepEmbedder(width)
        self.additive_proj = nn.Linear(width, width) if injection == "additive" else None
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, spatial_modulation=spatial, cross_attention=injection == "cross_attention")
            for _ in range(depth)
        )
        self.final = FinalLayer(width, patch_size * patch_size * channels, spatial_modulation=spatial)
        self._positions: dict[tuple[int, str], torch.Tensor] = {}
        initialize(self)

    def positions(self, token_grid: int, device: torch.device) -> torch.Tensor:
        key = (token_grid, str(device))
        if key not in self._positions:
            self._positions[key] = sincos_embedding_2d(self.width, token_grid, self.finest_token_grid).to(device)
        return self._positions[key]

    def prepare_condition(self, z_BND: torch.Tensor) -> FlowCondition:
        """Turn the AR condition into what every Euler step of the stage reuses."""
        if self.injection == "spatial_adaln":
            return FlowCondition(
                block_modulations=tuple(block.spatial_modulation(z_BND) for block in self.blocks),
                final_modulation=self.final.spatial_modulation(z_BND),
            )
        if self.injection == "additive":
            return FlowCondition(additive=self.additive_proj(z_BND))
        if self.injection == "cross_attention":
            return FlowCondition(context_kv=tuple(b.cross_attn.project_context(z_BND) for b in self.blocks))
        raise ValueError("a flow network without injection takes no AR condition")

    def forward(
        self,
        x_BCHW: torch.Tensor,
        t_B: torch.Tensor,
        global_BD: torch.Tensor | None = None,
        condition: FlowCondition | None = None,
    ) -> torch.Tensor:
        """Velocity (B, C, H, W) at signal time t; `global_BD` (class or stage embedding) adds
        to the time embedding."""
        token_grid = x_BCHW.shape[-1] // self.patch_size
        tokens = rearrange(self.patch_embed(x_BCHW), "b d h w -> b (h w) d")
        tokens = tokens + self.positions(token_grid, x_BCHW.device).to(tokens.dtype)
        global_embedding = self.time_embed(t_B)
        if global_BD is not None:
            global_embedding = global_embedding + global_BD
        condition = condition or FlowCondition()
        if condition.additive is not None:
            tokens = tokens + condition.additive
        for index, block in enumerate(self.blocks):
            spatial = condition.block_modulations[index] if condition.block_modulations else None
            context = condition.context_kv[index] if condition.context_kv else None
            tokens = block(tokens, block.modulation(global_embedding, spatial), context_kv=context)
        out = self.final(tokens, self.final.modulation(global_embedding, condition.final_modulation))
        p = self.patch_size
        return rearrange(out, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=token_grid, p1=p, p2=p)
