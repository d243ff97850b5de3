"""FLOP accounting by running the real code under torch's FLOP counter.

Models are built on the `meta` device, so even DiT-XL/2 at 250 steps is counted in seconds
without allocating weights. Matrix products, convolutions and attention are counted (as in
DiT's table); element-wise work is not. A multiply-add counts as ONE FLOP, as in DiT's paper,
so figures compare with its 118.6 GFLOPs for DiT-XL/2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ecar.config import Config
from ecar.models import ECAR, ClassConditional, build_model

CONVENTION = "FLOPs count a multiply-add once (DiT's convention); element-wise ops are not counted"


@dataclass
class StageFlops:
    stage: int
    grid: int
    steps: int
    ar: float
    flow: float
    total: float


@dataclass
class FlopReport:
    preset: str
    kind: str
    parameters: int
    parameters_by_part: dict[str, int]
    forward: dict[str, float]  # one network forward at batch 1, per part
    generation_stages: list[StageFlops]
    generation_total: float  # one image, with the preset's CFG
    generation_unguided: float  # one image, cfg_scale = 1 (no unconditional pass)
    steps_per_stage: tuple[int, ...]
    cfg_scale: float
    decode: float | None = None  # VAE decode of one image, when a tokenizer is configured
    convention: str = CONVENTION
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class PartFlopCounter(FlopCounterMode):
    """torch's FLOP counter, plus a split of every counted op between named parts of a model.

    An op belongs to a part when any module active at the time lies under that part's name.
    The counter's own per-module table can't give this: the AR step, the flow's per-stage
    condition and the Euler steps call sub-modules outside the top-level module's forward.
    (Uses the counter's module tracker and per-op hook; torch is pinned, see pyproject.toml.)
    """

    def __init__(self, model: torch.nn.Module, parts: tuple[str, ...]) -> None:
        super().__init__(display=False)
        root = type(model).__name__
        self.mod_tracker._get_mod_name(model)  # names every sub-module "ECAR.ar...", up front
        self.prefixes = {part: f"{root}.{part}" for part in parts}
        self.part_flops = dict.fromkeys(parts, 0)

    def _count_flops(self, func_packet, out, args, kwargs):
        before = self.get_total_flops()
        out = super()._count_flops(func_packet, out, args, kwargs)
        added = self.get_total_flops() - before
        if added:
            active = self.mod_tracker.parents
            for part, prefix in self.prefixes.items():
                if any(name == prefix or name.startswith(prefix + ".") for name in active):
                    self.part_flops[part] += added
        return out


def _counted(model: torch.nn.Module, run: Callable[[], object]) -> tuple[object, dict[str, float], float]:
    """(result, {part: MACs}, total MACs) of `run()`; the counter counts 2 FLOPs per multiply-add."""
    counter = PartFlopCounter(model, ("ar", "flow"))
    with torch.no_grad(), counter:
        result = run()
    parts = {part: flops / 2 for part, flops in counter.part_flops.items()}
    return result, parts, counter.get_total_flops() / 2


def _meta_model(config: Config) -> ClassConditional:
    with torch.device("meta"):
        return build_model(config).eval()


def forward_flops(model: ClassConditional) -> dict[str, float]:
    """One network forward at batch 1: the AR over the whole sequence and the flow at each grid."""
    config = model.config
    labels = torch.zeros(1, dtype=torch.long, device="meta")
    channels = config.model.latent_channels
    out: dict[str, float] = {}
    if isinstance(model, ECAR):
        maps = [torch.zeros(1, channels, g, g, device="meta") for g in model.layout.grids]
        _, _, total = _counted(model, lambda: model.ar(labels, maps))
        out["ar_full_sequence"] = total
        for s, grid in enumerate(model.layout.grids):
            z = torch.zeros(1, model.layout.token_counts[s], config.model.width, device="meta")
            x = torch.zeros(1, channels, grid, grid, device="meta")
            t = torch.zeros(1, device="meta")

            def run(s=s, x=x, t=t, z=z):
                return model.stage_velocity(s, x, t, model.flow.prepare_condition(z))

            _, _, total = _counted(model, run)
            out[f"flow_stage{s}_grid{grid}"] = total
    else:
        size = config.model.latent_size
        x = torch.zeros(1, channels, size, size, device="meta")
        t = torch.zeros(1, device="meta")
        _, _, total = _counted(model, lambda: model.velocity(x, t, labels))
        out["flow"] = total
    return out


def generation_flops(model: ClassConditional, cfg_scale: float | None = None) -> tuple[list[StageFlops], float]:
    """Per-stage and total FLOPs of generating one image with the config's sampling schedule."""
    config = model.config
    sampling = config.sampling if cfg_scale is None else replace(config.sampling, cfg_scale=cfg_scale)
    labels = torch.zeros(1, dtype=torch.long, device="meta")
    steps = config.flow.steps_per_stage
    stages: list[StageFlops] = []
    if isinstance(model, ECAR):
        iterator = model.iter_stages(labels, sampling)
        for s in range(model.layout.num_stages):
            _, parts, total = _counted(model, lambda: next(iterator))
            stages.append(StageFlops(s, model.layout.grids[s], steps[s], parts["ar"], parts["flow"], total))
    else:
        _, parts, total = _counted(model, lambda: model.generate(labels, sampling))
        stages.append(StageFlops(0, config.model.latent_size, steps[0], 0.0, parts["flow"], total))
    return stages, sum(stage.total for stage in stages)


def decode_flops(config: Config) -> float | None:
    """MACs of decoding one latent with the configured KL-VAE (None for a diffusers VAE, whose
    architecture is only known once its folder is loaded)."""
    if config.tokenizer.kind != "kl_vae":
        return None
    from ecar.tokenizer.train import vae_shape
    from ecar.tokenizer.vae import KLVAE

    with torch.device("meta"):
        vae = KLVAE(vae_shape(config)).eval()
    size = config.model.latent_size
    latent = torch.zeros(1, config.model.latent_channels, size, size, device="meta")
    _, _, total = _counted(vae, lambda: vae.decode(latent))
    return total


def parameter_counts(model: ClassConditional) -> dict[str, int]:
    return {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}


def count(config: Config, generation: bool = True) -> FlopReport:
    """The FLOP report of a config (see `ecar flops`); `generation=False` skips counting the
    sampling loop (minutes for a 250-step DiT-XL on the meta device) and reports forwards only."""
    model = _meta_model(config)
    forward = forward_flops(model)
    notes = []
    if generation:
        stages, total = generation_flops(model)
        _, unguided = generation_flops(model, cfg_scale=1.0)
    else:
        stages, total, unguided = [], 0.0, 0.0
        notes.append("generation not counted (--forward-only)")
    if total > unguided:
        notes.append(f"classifier-free guidance costs x{total / unguided:.2f} (a conditional and an "
                     "unconditional pass at each guided step)")
    decode = decode_flops(config)
    if decode is None:
        notes.append("VAE decode: not counted (a diffusers VAE is only known once loaded)")
    return FlopReport(
        preset=config.preset,
        kind=config.model.kind,
        parameters=sum(p.numel() for p in model.parameters()),
        parameters_by_part=parameter_counts(model),
        forward=forward,
        generation_stages=stages,
        generation_total=total,
        generation_unguided=unguided,
        steps_per_stage=tuple(config.flow.steps_per_stage),
        cfg_scale=config.sampling.cfg_scale,
        decode=decode,
        notes=notes,
    )


def format_report(report: FlopReport) -> str:
    def g(value: float) -> str:
        return f"{value / 1e9:10.3f} G"

    lines = [
        f"preset {report.preset} ({report.kind})",
        f"parameters: {report.parameters / 1e6:.2f} M ("
        + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in report.parameters_by_part.items()) + ")",
        "one network forward, batch 1:",
    ]
    lines += [f"  {part:<28}{g(value)}FLOPs" for part, value in report.forward.items()]
    if report.generation_stages:
        lines.append(f"generating one image (steps {list(report.steps_per_stage)}, cfg {report.cfg_scale}):")
        lines.append(f"  {'stage':<6}{'grid':>5}{'steps':>6}{'AR':>14}{'flow':>14}{'total':>14}")
        for stage in report.generation_stages:
            lines.append(f"  {stage.stage:<6}{stage.grid:>5}{stage.steps:>6}{g(stage.ar):>14}"
                         f"{g(stage.flow):>14}{g(stage.total):>14}")
        lines.append(f"  total{g(report.generation_total)}FLOPs   "
                     f"(without CFG:{g(report.generation_unguided)}FLOPs)")
    if report.decode is not None:
        lines.append(f"  VAE decode (the configured KL-VAE){g(report.decode)}FLOPs; "
                     f"with decode:{g(report.generation_total + report.decode)}FLOPs")
    lines += [f"note: {note}" for note in report.notes]
    lines.append(f"note: {report.convention}")
    return "\n".join(lines)
