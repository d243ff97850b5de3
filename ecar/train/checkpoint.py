"""What a training checkpoint holds besides DeepSpeed's shards, and how it is read back.

One checkpoint folder (Ray merges every rank's files into it):
    deepspeed/                 DeepSpeed's sharded module + optimizer state (every rank)
    ema.safetensors            EMA weights, whole (ZeRO 0-2; rank 0)
    ema-rank00003.safetensors  EMA partitions, one per rank (ZeRO-3)
    train_state.json           step, data position, skip counter, world size, ZeRO stage,
                               manifest URI and content hash, MLflow run id (rank 0)
    config.json                the full Config (rank 0)

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


def ema_file(zero_stage: int, rank: int) -> str:
    return f"ema-rank{rank:05d}.safetensors" if zero_stage == 3 else "ema.safetensors"


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
    ema_state: dict[str, torch.Tensor],
    info: RunInfo,
    config: Config,
    rank: int,
) -> None:
    """This rank's non-DeepSpeed files; call after `DeepSpeedBackend.save(directory)`."""
    directory.mkdir(parents=True, exist_ok=True)
    if info.zero_stage == 3 or rank == 0:
        tensors = {name: t.detach().cpu().contiguous() for name, t in ema_state.items()}
        save_file(tensors, str(directory / ema_file(info.zero_stage, rank)))
    if rank == 0:
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


def read_ema(directory: Path, zero_stage: int, rank: int) -> dict[str, torch.Tensor]:
    path = directory / ema_file(zero_stage, rank)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {directory} has no {path.name}")
    return load_file(str(path))


def check_compatible(info: RunInfo, world_size: int, zero_stage: int) -> None:
    """DeepSpeed's sharded state reloads only at the same world size and ZeRO stage; the exported
    checkpoint (consolidated EMA) is the way to change either."""
    if info.world_size != world_size or info.zero_stage != zero_stage:
        raise ValueError(
            f"the checkpoint was written by {info.world_size} workers at ZeRO stage {info.zero_stage}; this "
            f"run has {world_size} workers at stage {zero_stage}. Resume with the same train.num_workers and "
            "train.zero_stage, or start a new run (a new --name) from the exported checkpoint"
        )
