"""One typed, frozen config tree: the single source of truth for every job.

A `Config` is built from a named preset (`ecar.presets`) plus dotted overrides
(`train.lr=3e-4`, `flow.steps_per_stage=[8,8,8]`), validated as a whole, saved with every
checkpoint and logged to MLflow as flattened params. Unknown keys and invalid values raise
`ConfigError` naming the key, before any cluster resource is taken.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid; the message names the key."""


# What every entry point reports as a user's mistake: one line, exit code 2, no traceback
# (ConfigError is a ValueError; ImportError: an optional package such as diffusers is missing).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ImportError)


@dataclass(frozen=True)
class ModelConfig:
    """The networks. `kind="ecar"`: AR transformer + multistage flow; `kind="dit"`: flow-DiT."""

    kind: Literal["ecar", "dit"] = "ecar"
    latent_channels: int = 4
    latent_size: int = 16
    num_classes: int = 10
    width: int = 384
    heads: int = 6
    mlp_ratio: float = 4.0
    patch_size: int = 2
    ar_depth: int = 6  # E-CAR only: the condition generator
    flow_depth: int = 6  # E-CAR: the shared flow transformer; DiT: the whole network
    # How the AR condition z_s enters the flow transformer (FlowAR's ablation favours spatial adaLN).
    condition_injection: Literal["spatial_adaln", "additive", "cross_attention"] = "spatial_adaln"
    # What the AR sees of the previous stage. "noisy_end": the stage's noisy end state, in
    # training and at sampling alike (the next stage starts from that same state, re-noised).
    # "clean_estimate": teacher-forced on the clean map M_{s-1} in training, and at sampling on
    # the clean estimate recovered from the flow's end state and velocity, a posterior mean
    # the AR never saw in training (see benchmarks/results/diversity.md).
    ar_next_input: Literal["clean_estimate", "noisy_end"] = "noisy_end"
    class_dropout: float = 0.1


@dataclass(frozen=True)
class StagesConfig:
    """Stage geometry and time windows (signal time t: 0 = noise, 1 = data)."""

    grids: tuple[int, ...] = (4, 8, 16)
    # Custom window edges e_0=0 < e_1 < ... < e_S=1 (S+1 values); None = even split.
    window_edges: tuple[float, ...] | None = None
    # Pyramidal Flow's rule b_s = 2 a_{s+1} / (1 + a_{s+1}), so that up-and-re-noise lands
    # exactly on the next stage's training start distribution.
    renoise_correction: bool = True
    # FlowAR-like ablation: every stage denoises from pure noise over [0, 1].
    full_window: bool = False
    # Per-stage weights of the flow loss, one per stage; None = the geometric rule below.
    loss_weights: tuple[float, ...] | None = None
    # Without explicit weights, stage s weighs growth**s: 1 is equal; 2 gives 1, 2, 4 over three
    # stages and 1, 2 over two (a rule, so that sweeps over the stage count keep it).
    loss_weight_growth: float = 1.0

    def stage_loss_weights(self) -> tuple[float, ...]:
        """The weight of every stage's flow loss, as training uses them."""
        if self.loss_weights is not None:
            return tuple(self.loss_weights)
        return tuple(self.loss_weight_growth**s for s in range(len(self.grids)))


@dataclass(frozen=True)
class FlowConfig:
    """Flow-matching training and the Euler schedule."""

    steps_per_stage: tuple[int, ...] = (10, 10, 10)
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0


@dataclass(frozen=True)
class SamplingConfig:
    """Classifier-free guidance and batch sampling."""

    cfg_scale: float = 1.5
    # "constant": the same scale at every stage; "linear": ramps from 1 at stage 1 to
    # cfg_scale at stage S (guidance matters most where detail is generated).
    cfg_schedule: Literal["constant", "linear"] = "constant"
    # Guidance is applied only while the global time t lies in [low, high].
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    batch_size: int = 64
    num_images: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 20000
    global_batch_size: int = 256
    micro_batch_size: int = 128
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 500
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    zero_stage: int = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False
    num_workers: int = 2
    # Elastic runs (ZeRO-1/2, min_workers > 0): Ray Train runs between min_workers and num_workers
    # workers and resizes (from the latest checkpoint) as nodes come and go, and checkpoints carry
    # the whole optimizer state that a restart at another world size loads; 0: a fixed-size run.
    # The size it runs at must divide global_batch_size / micro_batch_size (the same batches at each
    # size): choose bounds that whole nodes meet, e.g. 4-GPU nodes and 4..8 workers.
    min_workers: int = 0
    cpus_per_worker: float = 1.0
    # torch threads per worker; 0 = one per whole CPU the worker asks for (Ray's default, at
    # least 1). More threads than CPUs asked for lets one worker use cores that Ray keeps free
    # for the data reads, which on a small machine can be faster than a second worker.
    torch_threads: int = 0
    use_gpu: bool = False
    log_every: int = 50
    sample_every: int = 2000
    checkpoint_every: int = 1000
    # Held-out flow loss (per stage) on `val_rows` latents of data.val_split, with fixed noise:
    # every `eval_every` steps (0: only with checkpoints) and logged as val_loss*; what Tune's
    # early stopping compares. val_rows=0 turns it off.
    eval_every: int = 0
    val_rows: int = 512
    num_to_keep: int = 2
    # Restarts of the worker group from the latest checkpoint after a worker or node dies (-1:
    # unlimited). A non-finite loss is not retried: replaying it from the same checkpoint with the
    # same data and seeds would fail the same way.
    max_failures: int = 3
    # Before any worker starts: a request the cluster cannot meet now (workers' CPUs and GPUs
    # leaving no CPU for the data reads, or no node fitting a worker) is refused. Set true on an
    # autoscaling cluster whose nodes appear on demand.
    wait_for_resources: bool = False
    nonfinite_loss: Literal["raise", "skip"] = "raise"
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    source: Literal["fashion_mnist", "image_folder", "parquet"] = "fashion_mnist"
    source_uri: str = ""
    image_size: int = 32
    image_channels: int = 1
    manifest_uri: str = ""
    shuffle_buffer_rows: int = 4096
    val_split: str = "test"  # held-out latents for the validation loss (see train.val_rows)
    shard_rows: int = 4096
    # Image shards written by `prepare`, read by `train-tokenizer` and `encode`.
    images_uri: str = ""
    # The encode job fails (no manifest) when more than this share of rows is quarantined.
    quarantine_limit: float = 0.01
    encode_batch_size: int = 256  # images per tokenizer forward inside an encode actor
    encode_actors: int = 1  # size of the encode actor pool
    encode_cpus_per_actor: float = 1.0
    # Also store the latent of the horizontally flipped image (column `latent_flip`).
    flip_augment: bool = False
    # Training's preflight reads every latent once on the driver (NaN/Inf, labels out of range,
    # unreadable pages): about a second for Fashion-MNIST, minutes for ImageNet's ~21 GB of latents.
    verify_values: bool = True


@dataclass(frozen=True)
class TokenizerConfig:
    """The image <-> latent tokenizer. Its latent channels are `model.latent_channels`, and its
    down-sampling factor is `data.image_size / model.latent_size` (a power of two): one
    source of truth for the latent shape."""

    kind: Literal["kl_vae", "diffusers"] = "kl_vae"
    width: int = 64  # channels of the first level; doubled per halving, capped at 4x
    res_blocks: int = 1
    kl_weight: float = 1e-6
    # Adds an EfficientNet-Lite0 feature distance (ImageNet weights shipped in a package).
    perceptual: bool = False
    perceptual_weight: float = 0.1
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    torch_threads: int = 0  # as train.torch_threads: 0 = one per whole CPU asked for
    use_gpu: bool = False
    eval_images: int = 1000  # held-out images for PSNR
    fid_images: int = 1000  # held-out images for reconstruction FID (0: skip)
    # A trained tokenizer (folder or s3:// prefix with tokenizer.safetensors + tokenizer.json);
    # or, for kind="diffusers", a local diffusers-format AutoencoderKL folder.
    checkpoint_uri: str = ""
    seed: int = 0


@dataclass(frozen=True)
class StorageConfig:
    root: str = "outputs"  # a local path or s3://bucket/prefix
    endpoint_url: str = ""  # empty: the standard AWS environment decides
    region: str = ""


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = ""  # empty: an absolute sqlite:// store under the storage root
    experiment_name: str = "ecar"
    registered_model: str = ""  # the registered model exports become versions of (empty: the preset's name)


@dataclass(frozen=True)
class Config:
    preset: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        validate(self)

    # ----- conversion -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return _build(cls, data, prefix="")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_text(cls, text: str) -> Config:
        """Parse JSON, else YAML (PyYAML's YAML 1.1 would read JSON's 3e-05 as a string)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ConfigError(f"config text must be a mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> Config:
        return cls.from_text(Path(path).read_text())

    def save(self, path: str | Path) -> None:
        text = self.to_yaml() if str(path).endswith((".yaml", ".yml")) else self.to_json()
        Path(path).write_text(text)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, e.g. for MLflow params."""
        return _flatten(self.to_dict())

    def override(self, overrides: list[str] | dict[str, Any]) -> Config:
        """Apply `key=value` strings (values parsed as YAML) or a {dotted key: value} dict."""
        if isinstance(overrides, dict):
            pairs = list(overrides.items())
        else:
            pairs = [_split_override(item) for item in overrides]
        data = self.to_dict()
        for key, value in pairs:
            _set_dotted(data, key, value)
        return Config.from_dict(data)


# ----- building from plain data, with key-naming errors -------------------------------------
def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (known keys under {where}: {', '.join(sorted(known))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _coerce(options[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {hint!r}")  # pragma: no cover


def _split_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=3e-4)")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"{key}: cannot parse value {text!r}: {error}") from None
    return key.strip(), _numbers(value)


def _numbers(value: Any) -> Any:
    """YAML 1.1 reads "3e-4" as a string, also inside lists ([1e-1, 2]): such strings are numbers."""
    if isinstance(value, str) and _looks_numeric(value):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], dict):
            raise ConfigError(f"unknown config key {'.'.join(parts[: depth + 1])}")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key {key}")
    if isinstance(node[parts[-1]], dict):
        # `train={}` would silently reset every key of the section to its default
        raise ConfigError(f"{key}: is a section, not a value; override its keys one by one ({key}.KEY=VALUE)")
    node[parts[-1]] = value


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ----- validation ---------------------------------------------------------------------------
def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def validate(config: Config) -> None:
    """Cross-field checks; each failure names the offending key."""
    model, stages, flow, sampling, train = (config.model, config.stages, config.flow, config.sampling, config.train)
    for key in ("latent_channels", "latent_size", "num_classes", "width", "heads", "patch_size"):
        _check(getattr(model, key) > 0, f"model.{key}", "must be positive")
    _check(
        model.width % model.heads == 0, "model.width", f"{model.width} is not divisible by model.heads={model.heads}"
    )
    _check(model.flow_depth > 0, "model.flow_depth", "must be positive")
    _check(model.ar_depth > 0 or model.kind == "dit", "model.ar_depth", "must be positive for E-CAR")
    _check(0.0 <= model.class_dropout < 1.0, "model.class_dropout", "must lie in [0, 1)")
    _check(model.mlp_ratio > 0, "model.mlp_ratio", "must be positive")

    grids = stages.grids
    _check(len(grids) >= 1, "stages.grids", "needs at least one stage")
    _check(all(b > a for a, b in zip(grids, grids[1:])), "stages.grids", f"{list(grids)} must be strictly increasing")
    _check(
        grids[-1] == model.latent_size,
        "stages.grids",
        f"last grid {grids[-1]} must equal model.latent_size={model.latent_size}",
    )
    for i, g in enumerate(grids):
        _check(
            model.latent_size % g == 0,
            f"stages.grids[{i}]",
            f"grid {g} does not divide the latent size {model.latent_size}",
        )
        _check(
            g % model.patch_size == 0,
            f"stages.grids[{i}]",
            f"grid {g} is not divisible by model.patch_size={model.patch_size}",
        )
    for i, (coarse, fine) in enumerate(zip(grids, grids[1:])):
        _check(
            fine % coarse == 0,
            f"stages.grids[{i + 1}]",
            f"grid {fine} is not a whole multiple of the previous grid {coarse} (up-sampling repeats whole blocks)",
        )
    if model.kind == "dit":
        _check(len(grids) == 1, "stages.grids", "a flow-DiT has one stage: the full latent")
    if stages.window_edges is not None:
        edges = stages.window_edges
        _check(
            len(edges) == len(grids) + 1,
            "stages.window_edges",
            f"needs {len(grids) + 1} edges for {len(grids)} stages, got {len(edges)}",
        )
        _check(all(0.0 <= e <= 1.0 for e in edges), "stages.window_edges", f"{list(edges)} has values outside [0, 1]")
        _check(edges[0] == 0.0 and edges[-1] == 1.0, "stages.window_edges", "must start at 0 and end at 1")
        _check(
            all(b > a for a, b in zip(edges, edges[1:])),
            "stages.window_edges",
            f"{list(edges)} must be strictly increasing",
        )
    _check(
        math.isfinite(stages.loss_weight_growth) and stages.loss_weight_growth > 0,
        "stages.loss_weight_growth",
        "must be a positive number",
    )
    if stages.loss_weights is not None:
        _check(
            len(stages.loss_weights) == len(grids), "stages.loss_weights", f"needs one weight per stage ({len(grids)})"
        )
        _check(
            all(w >= 0 for w in stages.loss_weights) and sum(stages.loss_weights) > 0,
            "stages.loss_weights",
            "must be non-negative with a positive sum",
        )

    _check(
        len(flow.steps_per_stage) == len(grids),
        "flow.steps_per_stage",
        f"needs one step count per stage ({len(grids)}), got {list(flow.steps_per_stage)}",
    )
    _check(all(k >= 1 for k in flow.steps_per_stage), "flow.steps_per_stage", "every stage needs at least one step")
    _check(flow.logit_normal_std > 0, "flow.logit_normal_std", "must be positive")

    _check(sampling.cfg_scale >= 0, "sampling.cfg_scale", "must be non-negative")
    low, high = sampling.guidance_interval
    _check(0.0 <= low <= high <= 1.0, "sampling.guidance_interval", f"{[low, high]} must satisfy 0 <= low <= high <= 1")
    _check(sampling.batch_size > 0, "sampling.batch_size", "must be positive")
    _check(sampling.num_images > 0, "sampling.num_images", "must be positive")

    _check(train.steps > 0, "train.steps", "must be positive")
    _check(train.lr > 0, "train.lr", "must be positive")
    _check(train.warmup_steps >= 0, "train.warmup_steps", "must be non-negative")
    _check(train.weight_decay >= 0, "train.weight_decay", "must be non-negative")
    _check(train.grad_clip >= 0, "train.grad_clip", "must be non-negative (0: no clipping)")
    _check(all(0.0 <= beta < 1.0 for beta in train.betas), "train.betas", f"{list(train.betas)} must lie in [0, 1)")
    _check(0 <= train.min_lr <= train.lr, "train.min_lr", "must lie in [0, train.lr]")
    _check(train.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"{train.zero_stage} is not a ZeRO stage (0-3)")
    _check(0.0 <= train.ema_decay < 1.0, "train.ema_decay", "must lie in [0, 1)")
    _check(train.num_workers >= 1, "train.num_workers", "must be at least 1")
    _check(train.micro_batch_size >= 1, "train.micro_batch_size", "must be at least 1")
    per_step = train.micro_batch_size * train.num_workers
    _check(
        train.global_batch_size % per_step == 0,
        "train.global_batch_size",
        f"{train.global_batch_size} is not micro_batch_size ({train.micro_batch_size}) x "
        f"num_workers ({train.num_workers}) x a whole number of accumulation steps",
    )
    low, high = worker_bounds(train)
    _check(0 <= train.min_workers <= high, "train.min_workers", f"must lie in [0, train.num_workers={high}]")
    _check(
        (train.global_batch_size // train.micro_batch_size) % low == 0,
        "train.min_workers",
        f"{low} does not divide global_batch_size / micro_batch_size ({train.global_batch_size} / "
        f"{train.micro_batch_size}): the global batch could not stay the same at {low} workers",
    )
    _check(
        train.min_workers == 0 or train.zero_stage in (1, 2),
        "train.min_workers",
        f"elastic runs re-partition ZeRO-1/2 state; at stage {train.zero_stage} keep train.min_workers=0",
    )
    _check(train.cpus_per_worker > 0, "train.cpus_per_worker", "must be positive")
    _check(train.torch_threads >= 0, "train.torch_threads", "must be 0 (Ray's default) or positive")
    for key in ("log_every", "sample_every", "checkpoint_every", "num_to_keep"):
        _check(getattr(train, key) >= 1, f"train.{key}", "must be at least 1")
    _check(train.eval_every >= 0, "train.eval_every", "must be 0 (with checkpoints only) or positive")
    _check(train.val_rows >= 0, "train.val_rows", "must be 0 (off) or positive")
    _check(train.max_failures >= -1, "train.max_failures", "must be -1 (unlimited) or more")

    _check(config.data.image_size > 0, "data.image_size", "must be positive")
    _check(config.data.image_channels in (1, 3), "data.image_channels", "must be 1 or 3")
    _validate_data_and_tokenizer(config)


def _validate_data_and_tokenizer(config: Config) -> None:
    data, tokenizer, model = config.data, config.tokenizer, config.model
    _check(data.shard_rows >= 1, "data.shard_rows", "must be at least 1")
    _check(data.shuffle_buffer_rows >= 0, "data.shuffle_buffer_rows", "must be non-negative")
    _check(0.0 <= data.quarantine_limit <= 1.0, "data.quarantine_limit", "must lie in [0, 1]")
    _check(data.encode_batch_size >= 1, "data.encode_batch_size", "must be at least 1")
    _check(data.encode_actors >= 1, "data.encode_actors", "must be at least 1")
    _check(data.encode_cpus_per_actor > 0, "data.encode_cpus_per_actor", "must be positive")
    factor = data.image_size // model.latent_size
    _check(
        data.image_size % model.latent_size == 0 and factor & (factor - 1) == 0,
        "data.image_size",
        f"{data.image_size} must be a power-of-two multiple of model.latent_size={model.latent_size} "
        "(the tokenizer's down-sampling factor)",
    )
    for key in ("width", "res_blocks", "steps", "batch_size", "num_workers"):
        _check(getattr(tokenizer, key) >= 1, f"tokenizer.{key}", "must be at least 1")
    _check(tokenizer.lr > 0, "tokenizer.lr", "must be positive")
    _check(tokenizer.kl_weight >= 0, "tokenizer.kl_weight", "must be non-negative")
    _check(tokenizer.perceptual_weight >= 0, "tokenizer.perceptual_weight", "must be non-negative")
    _check(tokenizer.cpus_per_worker > 0, "tokenizer.cpus_per_worker", "must be positive")
    _check(tokenizer.torch_threads >= 0, "tokenizer.torch_threads", "must be 0 (Ray's default) or positive")
    _check(tokenizer.eval_images >= 1, "tokenizer.eval_images", "must be at least 1")
    _check(
        tokenizer.fid_images == 0 or tokenizer.fid_images >= 2,
        "tokenizer.fid_images",
        "must be 0 (skip) or at least 2 (a covariance needs two images)",
    )


def worker_bounds(train: TrainConfig) -> tuple[int, int]:
    """(fewest, most) training workers: equal unless the run is elastic (train.min_workers)."""
    return (train.min_workers or train.num_workers), train.num_workers


def gradient_accumulation_steps(train: TrainConfig, world_size: int | None = None) -> int:
    """Micro-batches per optimizer step on each worker, from global = micro x accumulation x
    world size (`world_size`: the workers actually running, default train.num_workers)."""
    world = train.num_workers if world_size is None else world_size
    per_step = train.micro_batch_size * world
    if world < 1 or train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size: {train.global_batch_size} is not micro_batch_size "
            f"({train.micro_batch_size}) x world size ({world}) x a whole number of accumulation steps"
        )
    return train.global_batch_size // per_step
