"""What a training checkpoint holds besides DeepSpeed's shards, and how it is read back.

One checkpoint folder (Ray merges every rank's files into it):
    deepspeed/                 DeepSpeed's sharded module + optimizer state (every rank)
    ema.safetensors            EMA weights, whole (rank 0)
    optimizer.safetensors      elastic runs: the fp32 master weights and AdamW's moments and step,
                               whole (rank 0), which any world size can re-partition
    train_state.json           step, data position, skip counter, world size, ZeRO stage,
                               manifest URI and content hash, MLflow run id (rank 0)
    config.json                the full Config (rank 0)

DeepSpeed's shards reload at the world size that wrote them; at another one (an elastic run
resized, or a relaunch with another train.num_workers) `optimizer.safetensors` is loaded instead.
Our own files are safetensors and JSON: nothing in them executes on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ecar.config import Config
from ecar.train.loop import TrainState

STATE_FILE = "train_state.json"
CONFIG_FILE = "config.json"


EMA_FILE = "ema.safetensors"
WHOLE_STATE_FILE = "optimizer.safetensors"


@dataclass(frozen=True)
class RunInfo:
    """Facts about the run saved next to the step counter and checked on resume."""

    world_size: int
    zero_stage: int
    manifest_uri: str
    mlflow_run_id: str
    manifest_sha256: str = ""  # "" in checkpoints written before it was recorded


def save_local(
    directory: Path,
    state: TrainState,
    ema: dict[str, torch.Tensor] | None,
    whole_state: dict[str, torch.Tensor] | None,
    info: RunInfo,
    config: Config,
    rank: int,
) -> None:
    """This rank's non-DeepSpeed files; call after `DeepSpeedBackend.save(directory)`. `ema` and
    `whole_state` are whole tensors (rank 0's, gathered; None elsewhere and in fixed-size runs)."""
    directory.mkdir(parents=True, exist_ok=True)
    if rank != 0:
        return
    save_file({name: t.contiguous() for name, t in ema.items()}, str(directory / EMA_FILE))
    if whole_state is not None:
        save_file({name: t.contiguous() for name, t in whole_state.items()}, str(directory / WHOLE_STATE_FILE))
    record: dict[str, Any] = {**state.to_dict(), **info.__dict__}
    (directory / STATE_FILE).write_text(json.dumps(record, indent=2))
    (directory / CONFIG_FILE).write_text(config.to_json())


def read_state(directory: Path) -> tuple[TrainState, RunInfo]:
    path = directory / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {directory} has no {STATE_FILE}")
    record = json.loads(path.read_text())
    info = RunInfo(**{key: record[key] for key in RunInfo.__dataclass_fields__ if key in record})
    return TrainState.from_dict(record), info


def _read(directory: Path, name: str) -> dict[str, torch.Tensor]:
    path = directory / name
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {directory} has no {name}")
    return load_file(str(path))


def read_ema(directory: Path) -> dict[str, torch.Tensor]:
    """The EMA weights, whole, in the model's shapes."""
    return _read(directory, EMA_FILE)


def read_whole_state(directory: Path) -> dict[str, torch.Tensor]:
    return _read(directory, WHOLE_STATE_FILE)


def needs_repartition(info: RunInfo, world_size: int, zero_stage: int, directory: Path) -> bool:
    """Whether this run (at `world_size`) must load the whole optimizer state instead of DeepSpeed's
    shards; raises where neither can resume it."""
    if info.zero_stage != zero_stage:
        raise ValueError(
            f"the checkpoint was written at ZeRO stage {info.zero_stage}, this run is at stage {zero_stage}. "
            "Resume with the same train.zero_stage, or start a new run (a new --name) from the exported checkpoint"
        )
    if info.world_size == world_size:
        return False
    if zero_stage not in (1, 2) or not (directory / WHOLE_STATE_FILE).exists():
        raise ValueError(
            f"the checkpoint was written by {info.world_size} workers at ZeRO stage {zero_stage}, without the "
            f"whole optimizer state another world size needs; this run has {world_size} workers. Resume with "
            f"train.num_workers={info.world_size}; elastic runs (train.min_workers > 0, ZeRO stage 1 or 2) write "
            "that state"
        )
    return True
