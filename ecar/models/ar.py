"""The AR transformer: one parallel step per stage, producing the flow condition z_s.

Sequence: stage 1 is the class embedding at every position; stage s > 1 is a linear projection
of the previous token map up-sampled to grid s. Each token gets its stage embedding and a 2-D
position. A block-causal mask lets a token of stage i see stages <= i, so teacher-forced
training is one forward pass; at sampling a KV cache makes each stage cost one pass over its
own tokens.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ecar.flow import upsample
from ecar.layout import StageLayout
from ecar.models.blocks import Block, KVCache, initialize, sincos_embedding_2d


class ARTransformer(nn.Module):
    def __init__(
        self,
        layout: StageLayout,
        channels: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.num_classes = num_classes
        # The last row is the "no class" embedding used for label dropout and CFG.
        self.class_embed = nn.Embedding(num_classes + 1, width)
        self.stage_embed = nn.Embedding(layout.num_stages, width)
        self.input_proj = nn.Linear(channels * layout.patch_size**2, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        # A plain (not zero-initialised) head: the flow's zero-initialised condition layers
        # need a non-zero z to receive any gradient at all.
        self.out_norm = nn.LayerNorm(width, eps=1e-6)
        self.out_proj = nn.Linear(width, width)
        positions = [sincos_embedding_2d(width, n, layout.token_grids[-1]) for n in layout.token_grids]
        self.register_buffer("positions", torch.cat(positions), persistent=False)
        device = self.class_embed.weight.device  # the layout builds its mask on the CPU
        self.register_buffer("mask", layout.block_causal_mask.to(device), persistent=False)
        initialize(self)

    def stage_tokens(self, stage: int, labels_B: torch.Tensor, previous_BCHW: torch.Tensor | None) -> torch.Tensor:
        """(B, n_s, D): input tokens of one stage. `previous_BCHW` is M_{s-1} at its own grid."""
        layout = self.layout
        span = layout.stage_slice(stage)
        if stage == 0:
            tokens = self.class_embed(labels_B)[:, None].expand(-1, layout.token_counts[0], -1)
        else:
            up = upsample(previous_BCHW, layout.grids[stage])
            p = layout.patch_size
            patches = rearrange(up, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)
            tokens = self.input_proj(patches)
        stage_1 = torch.full((1,), stage, dtype=torch.long, device=labels_B.device)
        return tokens + self.positions[span] + self.stage_embed(stage_1)

    def forward(self, labels_B: torch.Tensor, maps: list[torch.Tensor], num_stages: int | None = None) -> torch.Tensor:
        """Teacher-forced pass over the first `num_stages` stages (all by default).

        `maps[s]` is the token map M_s at grid s (only M_1..M_{S-1} are read). Returns
        (B, L, D) conditions, stage s at `layout.stage_slice(s)`.
        """
        count = num_stages or self.layout.num_stages
        tokens = torch.cat([self.stage_tokens(s, labels_B, maps[s - 1] if s else None) for s in range(count)], dim=1)
        length = self.layout.offsets[count]
        return self._run(tokens, labels_B, mask=self.mask[:length, :length])

    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.blocks]

    def step(
        self,
        stage: int,
        labels_B: torch.Tensor,
        previous_BCHW: torch.Tensor | None,
        cache: list[KVCache],
    ) -> torch.Tensor:
        """(B, n_s, D) conditions of one stage, attending to the cached earlier stages.

        No mask is needed: a stage sees all of its own tokens and everything cached before it.
        """
        tokens = self.stage_tokens(stage, labels_B, previous_BCHW)
        return self._run(tokens, labels_B, cache=cache)

    def _run(
        self,
        tokens_BND: torch.Tensor,
        labels_B: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
    ) -> torch.Tensor:
        class_embedding = self.class_embed(labels_B)
        for index, block in enumerate(self.blocks):
            tokens_BND = block(
                tokens_BND,
                block.modulation(class_embedding),
                mask_NN=mask,
                cache=cache[index] if cache is not None else None,
            )
        return self.out_proj(self.out_norm(tokens_BND))
