"""The training loop in plain torch: micro-batches, accumulation, the LR schedule, EMA, the
non-finite-loss guard and throughput meters.

The loop talks to a `Backend` (forward, backward, optimizer step, collectives). `TorchBackend`
here is a single-process AdamW (unit tests, debugging); `ecar.train.engine.DeepSpeedBackend`
is the distributed one. `Cadence` decides when logging, evaluation, checkpoints and previews
are due; the caller's `on_step` callback does them, on every rank at the same steps so that it
may run collectives.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import nn

from ecar.config import Config, TrainConfig, gradient_accumulation_steps
from ecar.layout import StageLayout
from ecar.seeds import derived_seed
from ecar.train.ema import EMA
from ecar.train.schedule import lr_at

# One micro-batch: latents (B, C, H, W) in the scaled latent space and class labels (B,).
Batch = tuple[torch.Tensor, torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """The loss was NaN or Inf; raised before the backward pass, so the weights are untouched."""


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0  # passes over this worker's data shard
    batches_in_epoch: int = 0  # micro-batches this worker consumed in `epoch`
    nonfinite_skipped: int = 0  # micro-batches replaced by a zero-gradient pass

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> TrainState:
        return cls(**{key: int(data[key]) for key in cls.__dataclass_fields__})


class LossModule(nn.Module):
    """Puts `model.loss` behind `forward`, so that DeepSpeed's engine (whose forward hooks ZeRO-3
    needs) can call it; parameter names gain the prefix "model."."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, latents_BCHW: torch.Tensor, labels_B: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        return self.model.loss(latents_BCHW, labels_B, generator)


class Backend(Protocol):
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype  # what the inputs are cast to (bf16 under bf16 training)

    def forward(
        self, latents_BCHW: torch.Tensor, labels_B: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]: ...

    def backward(self, loss: torch.Tensor, boundary: bool) -> None: ...

    def step(self, lr: float) -> float | None:
        """The optimizer step at an accumulation boundary; returns the pre-clip gradient norm."""
        ...

    def all_true(self, flag: bool) -> bool: ...

    def mean(self, values: list[float]) -> list[float]: ...

    def ema_sources(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs the EMA follows: this rank's parameters or their partitions."""
        ...


class TorchBackend:
    """One process, torch's AdamW: the same update DeepSpeed runs at ZeRO stage 0."""

    def __init__(self, model: nn.Module, train: TrainConfig, device: torch.device | str = "cpu") -> None:
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.module = LossModule(model).to(self.device)
        self.train = train
        self.accumulation = gradient_accumulation_steps(train, world_size=1)
        self.optimizer = torch.optim.AdamW(
            self.module.parameters(), lr=train.lr, betas=train.betas, eps=1e-8, weight_decay=train.weight_decay
        )

    def forward(self, latents_BCHW, labels_B, generator):
        return self.module(latents_BCHW, labels_B, generator)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        # Mean over the micro-batches of one step, as DeepSpeed scales by 1/accumulation.
        (loss / self.accumulation).backward()

    def step(self, lr: float) -> float | None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        clip = self.train.grad_clip if self.train.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def all_true(self, flag: bool) -> bool:
        return flag

    def mean(self, values: list[float]) -> list[float]:
        return list(values)

    def ema_sources(self) -> list[tuple[str, torch.Tensor]]:
        return [(name.removeprefix("model."), p) for name, p in self.module.named_parameters()]


@dataclass
class Meter:
    """Sums over the steps since the last log line."""

    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0
    losses: dict[str, float] = field(default_factory=dict)
    grad_norm: float = 0.0
    grad_norm_steps: int = 0

    def add_losses(self, losses: dict[str, torch.Tensor], accumulation: int) -> None:
        for key, value in losses.items():
            self.losses[key] = self.losses.get(key, 0.0) + float(value) / accumulation


class DataStream:
    """Micro-batches across epochs, resumable at (epoch, batches_in_epoch).

    `open_epoch(epoch)` must give the same sequence every time it is called for an epoch (the
    Ray adapter seeds its shuffle by epoch and preserves block order). On resume, the batches
    this worker already consumed in the epoch are read and dropped: reading a partial epoch
    again is cheap next to training on different data than the uninterrupted run would.
    """

    def __init__(self, open_epoch: Callable[[int], Iterable[Batch]], state: TrainState) -> None:
        self.open_epoch = open_epoch
        self.state = state
        self.iterator: Iterator[Batch] | None = None

    def _start(self) -> None:
        self.iterator = iter(self.open_epoch(self.state.epoch))
        skip = self.state.batches_in_epoch
        if skip:
            consumed = sum(1 for _ in itertools.islice(self.iterator, skip))
            if consumed < skip:
                raise RuntimeError(
                    f"resuming at batch {skip} of epoch {self.state.epoch}, but the "
                    f"data shard has only {consumed} batches per epoch"
                )

    def next(self) -> Batch:
        if self.iterator is None:
            self._start()
        for attempt in range(2):
            try:
                batch = next(self.iterator)
            except StopIteration:
                if attempt:
                    raise RuntimeError(
                        "this worker's data yields no full micro-batch: fewer rows than one global batch "
                        "(a micro-batch in each stream, see ecar.train.streams)"
                    ) from None
                self.state.epoch += 1
                self.state.batches_in_epoch = 0
                self._start()
                continue
            self.state.batches_in_epoch += 1
            return batch
        raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class Due:
    """What is due after one optimizer step."""

    log: bool  # window metrics are handed over
    evaluate: bool  # the held-out loss (at checkpoints too)
    checkpoint: bool
    preview: bool  # a sample grid from the EMA weights
    final: bool


@dataclass(frozen=True)
class Cadence:
    """When a run logs, evaluates, checkpoints and previews: every timing decision in one place."""

    steps: int
    log_every: int
    eval_every: int  # 0: evaluate at checkpoints only
    checkpoint_every: int
    preview_every: int

    @classmethod
    def from_config(cls, train: TrainConfig) -> Cadence:
        return cls(train.steps, train.log_every, train.eval_every, train.checkpoint_every, train.sample_every)

    def due(self, step: int) -> Due:
        final = step == self.steps
        checkpoint = step % self.checkpoint_every == 0 or final
        evaluate = bool(self.eval_every) and step % self.eval_every == 0
        return Due(
            log=step % self.log_every == 0 or final,
            evaluate=evaluate or checkpoint,
            checkpoint=checkpoint,
            preview=step % self.preview_every == 0,
            final=final,
        )


# on_step(state, due, metrics): metrics (window means) exactly when due.log, else None
StepCallback = Callable[[TrainState, Due, "dict[str, float] | None"], None]


def train(
    backend: Backend,
    config: Config,
    open_epoch: Callable[[int], Iterable[Batch]],
    state: TrainState,
    ema: EMA,
    on_step: StepCallback | None = None,
) -> TrainState:
    """Run optimizer steps from `state.step` to `config.train.steps`.

    After the EMA update of every step `on_step` receives what is `Due` (`Cadence`) and, when
    logging is due, the window means (loss and per-stage losses averaged over ranks; grad norm,
    lr, and this worker's samples/s, tokens/s and data-wait fraction), else None.
    """
    train_config = config.train
    cadence = Cadence.from_config(train_config)
    accumulation = gradient_accumulation_steps(train_config, backend.world_size)
    tokens_per_sample = StageLayout.from_config(config).total_tokens
    stream = DataStream(open_epoch, state)
    meter = Meter()
    while state.step < train_config.steps:
        step_start = time.perf_counter()
        lr = lr_at(state.step, train_config)
        for micro in range(accumulation):
            wait_start = time.perf_counter()
            latents, labels = stream.next()
            meter.data_seconds += time.perf_counter() - wait_start
            latents = latents.to(backend.device, backend.dtype, non_blocking=True)
            labels = labels.to(backend.device, torch.long, non_blocking=True)
            generator = torch.Generator(device=backend.device)
            # a function of where the micro-batch is in the run (its step and its slot in the global
            # batch, see ecar.train.streams): a resumed run draws what an uninterrupted one would,
            # at any world size
            slot = micro * backend.world_size + backend.rank
            generator.manual_seed(derived_seed(train_config.seed, state.step, slot))
            losses = backend.forward(latents, labels, generator)
            loss = losses["loss"]
            # Every rank must agree before backward: one rank skipping a collective would hang
            # the others.
            if not backend.all_true(bool(torch.isfinite(loss.detach()).all())):
                loss = _replace_nonfinite(backend, train_config, state, latents, labels, generator, losses)
            backend.backward(loss, boundary=micro == accumulation - 1)
            meter.add_losses({k: v.detach() for k, v in losses.items()}, accumulation)
            meter.samples += latents.shape[0]
        grad_norm = backend.step(lr)
        ema.update(backend.ema_sources())
        state.step += 1
        meter.steps += 1
        meter.seconds += time.perf_counter() - step_start
        if grad_norm is not None:
            meter.grad_norm += grad_norm
            meter.grad_norm_steps += 1
        due, metrics = cadence.due(state.step), None
        if due.log:
            metrics = _window_metrics(backend, meter, lr, tokens_per_sample, state)
            meter = Meter()
        if on_step is not None:
            on_step(state, due, metrics)
    return state


def _replace_nonfinite(
    backend: Backend,
    train_config: TrainConfig,
    state: TrainState,
    latents: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    losses: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Raise, or (nonfinite_loss="skip") make this micro-batch contribute an exactly zero
    gradient through a pass on a zero batch times 0, which keeps DeepSpeed's reductions and
    accumulation boundaries identical on every rank. NaN x 0 is NaN, so the bad loss itself
    cannot simply be scaled away."""
    detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
    if train_config.nonfinite_loss == "raise":
        raise NonFiniteLossError(
            f"non-finite loss at step {state.step} on some rank ({detail} here); stopped before the "
            "backward pass, weights untouched. Set train.nonfinite_loss=skip to skip such batches."
        )
    state.nonfinite_skipped += 1
    stand_in = backend.forward(torch.zeros_like(latents), labels, generator)["loss"]
    if not backend.all_true(bool(torch.isfinite(stand_in.detach()).all())):
        raise NonFiniteLossError(
            f"non-finite loss at step {state.step} even on a zero batch: the weights themselves are no longer finite"
        )
    for key in losses:
        losses[key] = torch.zeros_like(losses[key])  # keep the bad values out of the metrics
    return stand_in * 0.0


def _window_metrics(
    backend: Backend, meter: Meter, lr: float, tokens_per_sample: int, state: TrainState
) -> dict[str, float]:
    keys = sorted(meter.losses)
    means = backend.mean([meter.losses[k] / max(1, meter.steps) for k in keys])
    metrics = dict(zip(keys, means))
    seconds = max(meter.seconds, 1e-9)
    metrics.update(
        {
            "lr": lr,
            "samples_per_s_per_worker": meter.samples / seconds,
            "tokens_per_s_per_worker": meter.samples * tokens_per_sample / seconds,
            "data_wait_fraction": meter.data_seconds / seconds,
            "epoch": float(state.epoch),
            "nonfinite_skipped": float(state.nonfinite_skipped),
        }
    )
    if meter.grad_norm_steps:
        metrics["grad_norm"] = meter.grad_norm / meter.grad_norm_steps
    return metrics
