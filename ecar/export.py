"""The exported checkpoint: consolidated (EMA) weights for sampling, loadable at any world size.

Layout under one URI (a local folder or s3://bucket/prefix):
    model.safetensors   the model's state dict (weights only: nothing executes on load)
    config.json         the full Config the model was built from
    export.json         latent scale, manifest URI, training step, MLflow run, weights hash, schema version
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ecar import storage
from ecar.config import Config
from ecar.models import ClassConditional, build_model

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Exported:
    model: ClassConditional
    config: Config
    latent_scale: float
    manifest_uri: str
    step: int


def save_exported(
    state_dict: dict[str, torch.Tensor],
    config: Config,
    uri: str,
    latent_scale: float,
    manifest_uri: str = "",
    step: int = 0,
    mlflow_run_id: str = "",
) -> str:
    """Write an exported checkpoint; the metadata file goes last, so its presence means complete."""
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    blob = save_safetensors(tensors)
    storage.write_bytes_atomic(storage.join(uri, "model.safetensors"), blob, config.storage)
    storage.write_text_atomic(storage.join(uri, "config.json"), config.to_json(), config.storage)
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "latent_scale": float(latent_scale),
        "manifest_uri": manifest_uri,
        "step": int(step),
        "mlflow_run_id": mlflow_run_id,  # evaluation logs against the run that trained it
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    storage.write_text_atomic(storage.join(uri, "export.json"), json.dumps(metadata, indent=2), config.storage)
    return uri


def read_metadata(uri: str) -> dict[str, Any]:
    path = storage.join(uri, "export.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"no exported checkpoint at {uri} (missing export.json)")
    metadata = json.loads(storage.read_text(path))
    if metadata.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{uri}/export.json: schema version {metadata.get('schema_version')} "
                         f"is not {SCHEMA_VERSION}")
    return metadata


def read_config(uri: str) -> Config:
    """The config of an exported checkpoint, without loading its weights."""
    read_metadata(uri)
    return Config.from_text(storage.read_text(storage.join(uri, "config.json")))


def load_exported(uri: str, device: torch.device | str = "cpu") -> Exported:
    """The model (eval mode, on `device`) with its config and latent scale; weights are verified
    against the recorded hash so a truncated upload fails loudly instead of sampling garbage."""
    metadata = read_metadata(uri)
    config = read_config(uri)
    blob = storage.read_bytes(storage.join(uri, "model.safetensors"))
    if hashlib.sha256(blob).hexdigest() != metadata["weights_sha256"]:
        raise ValueError(f"{uri}/model.safetensors does not match the hash in export.json (corrupt or partial)")
    model = build_model(config)
    model.load_state_dict(load_safetensors(blob))
    return Exported(model=model.to(device).eval(), config=config, latent_scale=metadata["latent_scale"],
                    manifest_uri=metadata["manifest_uri"], step=metadata["step"])
