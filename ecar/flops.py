"""FLOP accounting by running the real code under torch's FLOP counter.

Models are built on the `meta` device, without allocating weights. All Euler steps of a stage
have the same shapes, so generation is counted from real runs of one and two steps per stage
and multiplied out: DiT-XL/2 at 250 steps takes seconds. Matrix products, convolutions and
attention are counted (as in DiT's table); element-wise work is not. A multiply-add counts as
ONE FLOP, as in DiT's paper, so figures compare with its 118.6 GFLOPs for DiT-XL/2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from ecar.config import Config, SamplingConfig
from ecar.euler import step_scales
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


Cost = dict[str, float]  # MACs of (part of) one stage: {"ar", "flow", "total"}


def _linear(*terms: tuple[int, Cost]) -> Cost:
    """sum(k * cost) over (k, cost) terms, per part."""
    return {part: sum(k * cost[part] for k, cost in terms) for part in ("ar", "flow", "total")}


def stage_costs(model: ClassConditional, sampling: SamplingConfig, steps: tuple[int, ...]) -> list[Cost]:
    """Per stage, the counted MACs of one real sampling run at batch 1 with `steps` Euler steps
    per stage (every step counted; `generation_flops` counts the same from 1- and 2-step runs)."""
    labels = torch.zeros(1, dtype=torch.long, device="meta")
    if isinstance(model, ECAR):
        iterator = model.iter_stages(labels, sampling, steps_per_stage=steps)
        counted = [_counted(model, lambda: next(iterator)) for _ in range(model.layout.num_stages)]
    else:
        counted = [_counted(model, lambda: model.generate(labels, sampling, steps_per_stage=steps))]
    return [{"ar": parts["ar"], "flow": parts["flow"], "total": total} for _, parts, total in counted]


def _fixed_and_step_costs(model: ClassConditional, sampling: SamplingConfig) -> tuple[list[Cost], list[Cost]]:
    """Per stage, (the MACs run once: AR step and flow condition, the MACs of one Euler step),
    from real runs of 1 and 2 steps per stage: all of a stage's steps under one sampling
    setting have the same shapes."""
    stages = model.layout.num_stages
    one_step = stage_costs(model, sampling, (1,) * stages)
    two_steps = stage_costs(model, sampling, (2,) * stages)
    step = [_linear((1, two), (-1, one)) for one, two in zip(one_step, two_steps)]
    fixed = [_linear((1, one), (-1, each)) for one, each in zip(one_step, step)]
    return fixed, step


def _guided_steps(model: ClassConditional, sampling: SamplingConfig) -> list[int]:
    """Per stage, how many Euler steps run a CFG pair (the others: the conditional half only)."""
    layout, steps = model.layout, model.config.flow.steps_per_stage
    return [
        sum(scale != 1.0 for scale in step_scales(sampling, s, layout.num_stages, *layout.windows[s], steps[s]))
        for s in range(layout.num_stages)
    ]


def generation_flops(model: ClassConditional) -> tuple[list[StageFlops], list[StageFlops]]:
    """Per-stage FLOPs of generating one image with the config's sampling schedule, and the
    same with cfg_scale 1 (no unconditional pass).

    A stage costs its once-per-stage work plus its guided steps (a CFG pair, 2x batch) and its
    unguided steps (scale 1: the conditional half only). Each kind of step is counted in real
    runs and multiplied by how often `step_scales` calls for it; `stage_costs` with the
    config's steps counts every step instead, to the same MAC.
    """
    config, layout = model.config, model.layout
    steps = config.flow.steps_per_stage
    unguided_fixed, unguided_step = _fixed_and_step_costs(model, replace(config.sampling, cfg_scale=1.0))
    guided_steps = _guided_steps(model, config.sampling)
    if any(guided_steps):
        # The AR and the condition then run on the CFG batch; runs that guide every step count
        # them and a guided step.
        everywhere = replace(config.sampling, cfg_schedule="constant", guidance_interval=(0.0, 1.0))
        guided_fixed, guided_step = _fixed_and_step_costs(model, everywhere)
    else:
        guided_fixed, guided_step = unguided_fixed, unguided_step

    def stage(s: int, fixed: Cost, guided: int) -> StageFlops:
        cost = _linear((1, fixed), (guided, guided_step[s]), (steps[s] - guided, unguided_step[s]))
        return StageFlops(s, layout.grids[s], steps[s], **cost)

    return (
        [stage(s, guided_fixed[s], guided_steps[s]) for s in range(layout.num_stages)],
        [stage(s, unguided_fixed[s], 0) for s in range(layout.num_stages)],
    )


def decode_flops(config: Config) -> float | None:
    """MACs of decoding one latent with the configured KL-VAE (None for a diffusers VAE, whose
    architecture is only known once its folder is loaded)."""
    if config.tokenizer.kind != "kl_vae":
        return None
    from ecar.tokenizer.vae import KLVAE, vae_shape

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
    sampling loop and reports forwards only."""
    model = _meta_model(config)
    forward = forward_flops(model)
    notes = []
    if generation:
        stages, unguided_stages = generation_flops(model)
        total = sum(stage.total for stage in stages)
        unguided = sum(stage.total for stage in unguided_stages)
    else:
        stages, total, unguided = [], 0.0, 0.0
        notes.append("generation not counted (--forward-only)")
    if total > unguided:
        notes.append(
            f"classifier-free guidance costs x{total / unguided:.2f} (a conditional and an "
            "unconditional pass at each guided step)"
        )
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
        + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in report.parameters_by_part.items())
        + ")",
        "one network forward, batch 1:",
    ]
    lines += [f"  {part:<28}{g(value)}FLOPs" for part, value in report.forward.items()]
    if report.generation_stages:
        lines.append(f"generating one image (steps {list(report.steps_per_stage)}, cfg {report.cfg_scale}):")
        lines.append(f"  {'stage':<6}{'grid':>5}{'steps':>6}{'AR':>14}{'flow':>14}{'total':>14}")
        for stage in report.generation_stages:
            lines.append(
                f"  {stage.stage:<6}{stage.grid:>5}{stage.steps:>6}{g(stage.ar):>14}"
                f"{g(stage.flow):>14}{g(stage.total):>14}"
            )
        lines.append(f"  total{g(report.generation_total)}FLOPs   (without CFG:{g(report.generation_unguided)}FLOPs)")
    if report.decode is not None:
        lines.append(
            f"  VAE decode (the configured KL-VAE){g(report.decode)}FLOPs; "
            f"with decode:{g(report.generation_total + report.decode)}FLOPs"
        )
    lines += [f"note: {note}" for note in report.notes]
    lines.append(f"note: {report.convention}")
    return "\n".join(lines)
