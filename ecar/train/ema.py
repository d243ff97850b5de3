"""Exponential moving average of the weights, kept in fp32 next to whatever the optimizer owns.

The EMA follows named tensors: full parameters, or under ZeRO-3 each rank's flat partition of
them (so the EMA is partitioned exactly like the weights and costs 1/world of a copy).
`ecar.train.engine` gathers partitions into whole tensors for sampling and export.
"""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, sources: list[tuple[str, torch.Tensor]], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} must lie in [0, 1)")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            name: tensor.detach().to(torch.float32).clone() for name, tensor in sources
        }

    @torch.no_grad()
    def update(self, sources: list[tuple[str, torch.Tensor]]) -> None:
        """shadow <- decay * shadow + (1 - decay) * source."""
        names = [name for name, _ in sources]
        if names != list(self.shadow):
            raise KeyError("EMA sources changed names or order since the EMA was created")
        shadows = list(self.shadow.values())
        values = [tensor.detach().to(torch.float32) for _, tensor in sources]
        torch._foreach_lerp_(shadows, values, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.clone() for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
            raise KeyError(f"EMA state does not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
        for name, tensor in state.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(
                    f"EMA tensor {name}: shape {tuple(tensor.shape)} in the checkpoint, "
                    f"{tuple(self.shadow[name].shape)} in the model"
                )
            self.shadow[name].copy_(tensor)
