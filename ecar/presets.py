"""Named presets, one function each, looked up by name (`ecar-fmnist`, `dit-xl-2`, ...).

Sizing: an E-CAR block with spatial adaLN holds ~24 w^2 parameters (attention + MLP 12 w^2,
per-position and time modulation 6 w^2 each) and an AR or DiT block ~18 w^2, so AR depth d_a
plus flow depth d_f matches a DiT of depth D when 18 d_a + 24 d_f ~= 18 D: ecar-b (5 + 5)
sits near DiT-B (12), ecar-l (10 + 10) near DiT-L (24), ecar-xl (12 + 12) near DiT-XL (28).
`ecar flops PRESET` prints the measured counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ecar.config import (
    Config,
    ConfigError,
    DataConfig,
    FlowConfig,
    ModelConfig,
    SamplingConfig,
    StagesConfig,
    TokenizerConfig,
    TrainConfig,
)

PRESETS: dict[str, Callable[[], Config]] = {}


def preset(name: str) -> Callable[[Callable[[], Config]], Callable[[], Config]]:
    def register(function: Callable[[], Config]) -> Callable[[], Config]:
        PRESETS[name] = function
        return function

    return register


def get_config(name: str, overrides: list[str] | dict | None = None) -> Config:
    """The preset `name` with dotted overrides applied and the whole tree validated."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    config = PRESETS[name]()
    return config.override(overrides) if overrides else config


# ----- E-CAR --------------------------------------------------------------------------------
@preset("ecar-debug")
def ecar_debug() -> Config:
    """A few seconds on CPU: tiny widths, 3 stages over an 8x8x4 latent."""
    return Config(
        preset="ecar-debug",
        model=ModelConfig(
            latent_channels=4, latent_size=8, num_classes=10, width=64, heads=2, patch_size=1, ar_depth=1, flow_depth=2
        ),
        stages=StagesConfig(grids=(2, 4, 8)),
        flow=FlowConfig(steps_per_stage=(2, 2, 2)),
        sampling=SamplingConfig(cfg_scale=1.5, batch_size=16, num_images=32),
        train=TrainConfig(
            steps=20,
            global_batch_size=16,
            micro_batch_size=8,
            lr=1e-3,
            warmup_steps=2,
            ema_decay=0.9,
            log_every=5,
            sample_every=10,
            checkpoint_every=10,
            cpus_per_worker=0.5,
        ),
        data=DataConfig(
            image_size=16, shard_rows=256, encode_batch_size=64, encode_cpus_per_actor=0.5, quarantine_limit=0.05
        ),
        # maps 16x16 images to the 8x8x4 latent
        tokenizer=TokenizerConfig(
            width=16, steps=20, batch_size=16, lr=2e-3, cpus_per_worker=0.5, eval_images=64, fid_images=16
        ),
    )


@preset("ecar-fmnist")
def ecar_fmnist() -> Config:
    """Fashion-MNIST at 32x32 through a 16x16x4 latent; stages 4, 8, 16 (patch 2: 4, 16, 64 tokens)."""
    return Config(
        preset="ecar-fmnist",
        model=ModelConfig(
            latent_channels=4,
            latent_size=16,
            num_classes=10,
            width=256,
            heads=4,
            patch_size=2,
            ar_depth=4,
            flow_depth=4,
        ),
        # loss weights 1, 2, 4: the last stage, where E-CAR's quality is decided, trains hardest
        # (FID 80.90 against 82.65 with equal weights in the headline's ablation,
        # benchmarks/results/ablations.md)
        stages=StagesConfig(grids=(4, 8, 16), loss_weight_growth=2.0),
        flow=FlowConfig(steps_per_stage=(10, 10, 10)),
        sampling=SamplingConfig(cfg_scale=1.5, batch_size=100, num_images=5000),
        train=TrainConfig(
            steps=20000, global_batch_size=128, micro_batch_size=64, lr=3e-4, warmup_steps=500, ema_decay=0.999
        ),
        data=DataConfig(image_size=32, image_channels=1),
        # 32x32 images (Fashion-MNIST's 28x28 resized) to a 16x16x4 latent
        tokenizer=TokenizerConfig(width=32, steps=600, batch_size=64, lr=2e-3),
    )


def _imagenet_ecar(name: str, width: int, heads: int, ar_depth: int, flow_depth: int) -> Config:
    """ImageNet-256 on a 16x16x16 latent, patch 1: stages 4, 8, 16 end on 256 tokens, as DiT/2 does."""
    return Config(
        preset=name,
        model=ModelConfig(
            latent_channels=16,
            latent_size=16,
            num_classes=1000,
            width=width,
            heads=heads,
            patch_size=1,
            ar_depth=ar_depth,
            flow_depth=flow_depth,
        ),
        stages=StagesConfig(grids=(4, 8, 16)),
        flow=FlowConfig(steps_per_stage=(10, 10, 10)),
        sampling=SamplingConfig(cfg_scale=1.5, batch_size=64, num_images=50000),
        train=TrainConfig(
            steps=400000,
            global_batch_size=256,
            micro_batch_size=32,
            lr=1e-4,
            min_lr=1e-4,
            lr_schedule="constant",
            num_workers=8,
            use_gpu=True,
            precision="bf16",
            ema_decay=0.9999,
        ),
        data=DataConfig(source="image_folder", image_size=256, image_channels=3),
    )


@preset("ecar-b")
def ecar_b() -> Config:
    return _imagenet_ecar("ecar-b", width=768, heads=12, ar_depth=5, flow_depth=5)


@preset("ecar-l")
def ecar_l() -> Config:
    return _imagenet_ecar("ecar-l", width=1024, heads=16, ar_depth=10, flow_depth=10)


@preset("ecar-xl")
def ecar_xl() -> Config:
    return _imagenet_ecar("ecar-xl", width=1152, heads=16, ar_depth=12, flow_depth=12)


# ----- flow-DiT baselines ---------------------------------------------------------------------
def _imagenet_dit(name: str, width: int, heads: int, depth: int) -> Config:
    """DiT's shapes: a 32x32x4 latent in 2x2 patches (256 tokens), 250 Euler steps."""
    base = _imagenet_ecar(name, width=width, heads=heads, ar_depth=1, flow_depth=depth)
    return replace(
        base,
        model=replace(base.model, kind="dit", latent_channels=4, latent_size=32, patch_size=2),
        stages=StagesConfig(grids=(32,)),
        flow=FlowConfig(steps_per_stage=(250,)),
    )


@preset("dit-s-2")
def dit_s_2() -> Config:
    return _imagenet_dit("dit-s-2", width=384, heads=6, depth=12)


@preset("dit-b-2")
def dit_b_2() -> Config:
    return _imagenet_dit("dit-b-2", width=768, heads=12, depth=12)


@preset("dit-l-2")
def dit_l_2() -> Config:
    return _imagenet_dit("dit-l-2", width=1024, heads=16, depth=24)


@preset("dit-xl-2")
def dit_xl_2() -> Config:
    return _imagenet_dit("dit-xl-2", width=1152, heads=16, depth=28)


@preset("dit-fmnist")
def dit_fmnist() -> Config:
    """The flow-DiT matched to ecar-fmnist: same width, depth = AR + flow depth, same latent and patch."""
    base = ecar_fmnist()
    return replace(
        base,
        preset="dit-fmnist",
        model=replace(base.model, kind="dit", flow_depth=base.model.ar_depth + base.model.flow_depth),
        stages=StagesConfig(grids=(base.model.latent_size,)),
        flow=FlowConfig(steps_per_stage=(250,)),
    )
