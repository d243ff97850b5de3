"""Transformer blocks shared by the AR transformer, the flow transformer and the flow-DiT.

A `Block` is DiT's adaLN-Zero block. Its modulation (shift, scale, gate for attention and MLP)
comes from a global vector (time, class or stage: shape B x 1 x 6D) and, for E-CAR's spatial
adaLN, from a per-position condition (B x N x 6D). The per-position part depends only on the
AR condition, so samplers compute it once per stage and reuse it at every Euler step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def modulate(x_BND: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x_BND * (1 + scale) + shift


def sincos_embedding_2d(width: int, token_grid: int, finest_grid: int) -> torch.Tensor:
    """(token_grid^2, width) fixed 2-D sine-cosine positions.

    Coordinates are token centres in units of the finest grid, so a coarse token and the fine
    tokens it covers share a position across stages.
    """
    if width % 4:
        raise ValueError(f"2-D sine-cosine positions need a width divisible by 4, got {width}")
    step = finest_grid / token_grid
    coords = (torch.arange(token_grid, dtype=torch.float64) + 0.5) * step - 0.5
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    frequencies = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))

    def embed(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(rows), embed(cols)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Signal time t in [0, 1] -> a width-D vector (sinusoidal features of 1000 t, then an MLP)."""

    def __init__(self, width: int, frequencies: int = 256) -> None:
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        scales = torch.exp(-math.log(10000.0) * torch.arange(half, device=t_B.device) / half)
        angles = 1000.0 * t_B.float()[:, None] * scales[None]
        features = torch.cat([angles.cos(), angles.sin()], dim=1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class KVCache:
    """Keys and values of the tokens an attention layer has seen so far (sampling only)."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def extend(self, keys_BHLd: torch.Tensor, values_BHLd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is not None:
            keys_BHLd = torch.cat([self.keys, keys_BHLd], dim=2)
            values_BHLd = torch.cat([self.values, values_BHLd], dim=2)
        self.keys, self.values = keys_BHLd, values_BHLd
        return keys_BHLd, values_BHLd


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(
        self,
        x_BND: torch.Tensor,
        mask_NN: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x_BND), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if cache is not None:
            k, v = cache.extend(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_NN)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    """Flow tokens attend to the stage's AR condition tokens; keys/values are made once per stage."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def project_context(self, context_BMD: torch.Tensor) -> torch.Tensor:
        """(2, B, H, M, d): keys and values of the condition tokens."""
        return rearrange(self.key_value(context_BMD), "b m (two h d) -> two b h m d", two=2, h=self.heads)

    def forward(self, x_BND: torch.Tensor, context_kv: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.query(self.norm(x_BND)), "b n (h d) -> b h n d", h=self.heads)
        out = F.scaled_dot_product_attention(q, context_kv[0], context_kv[1])
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """adaLN-Zero transformer block; optional per-position modulation and cross-attention."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float,
        spatial_modulation: bool = False,
        cross_attention: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.global_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.spatial_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width)) if spatial_modulation else None
        self.cross_attn = CrossAttention(width, heads) if cross_attention else None

    def modulation(self, global_BD: torch.Tensor, spatial_BN6D: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 or N, 6D): the global part, plus a precomputed per-position part if given."""
        modulation = self.global_modulation(global_BD)[:, None]
        return modulation if spatial_BN6D is None else modulation + spatial_BN6D

    def forward(
        self,
        x_BND: torch.Tensor,
        modulation: torch.Tensor,
        mask_NN: torch.Tensor | None = None,
        cache: KVCache | None = None,
        context_kv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=-1)
        x_BND = x_BND + gate1 * self.attn(modulate(self.norm1(x_BND), shift1, scale1), mask_NN, cache)
        if self.cross_attn is not None:
            x_BND = x_BND + self.cross_attn(x_BND, context_kv)
        return x_BND + gate2 * self.mlp(modulate(self.norm2(x_BND), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to `out_features` per token."""

    def __init__(self, width: int, out_features: int, spatial_modulation: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.global_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.spatial_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width)) if spatial_modulation else None
        self.linear = nn.Linear(width, out_features)

    def modulation(self, global_BD: torch.Tensor, spatial_BN2D: torch.Tensor | None = None) -> torch.Tensor:
        modulation = self.global_modulation(global_BD)[:, None]
        return modulation if spatial_BN2D is None else modulation + spatial_BN2D

    def forward(self, x_BND: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        shift, scale = modulation.chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x_BND), shift, scale))


def initialize(module: nn.Module) -> None:
    """DiT's initialisation: Xavier linears, zero biases, and zeroed adaLN and output layers so
    every block starts as the identity and every network output starts at zero."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.xavier_uniform_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=0.02)
    for sub in module.modules():
        if isinstance(sub, TimestepEmbedder):
            for layer in (sub.mlp[0], sub.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02)
        if isinstance(sub, (Block, FinalLayer)):
            for head in (sub.global_modulation, sub.spatial_modulation):
                if head is not None:
                    nn.init.zeros_(head[1].weight)
                    nn.init.zeros_(head[1].bias)
        if isinstance(sub, FinalLayer):
            nn.init.zeros_(sub.linear.weight)
            nn.init.zeros_(sub.linear.bias)
