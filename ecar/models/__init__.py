"""Model registry: a config's `model.kind` picks E-CAR or the flow-DiT baseline."""

from __future__ import annotations

from ecar.config import Config
from ecar.models.dit import FlowDiT
from ecar.models.ecar import ECAR, ClassConditional

__all__ = ["ECAR", "FlowDiT", "ClassConditional", "build_model"]


def build_model(config: Config) -> ClassConditional:
    """The network a config describes, freshly initialised, on the CPU."""
    return ECAR(config) if config.model.kind == "ecar" else FlowDiT(config)
