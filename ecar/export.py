"""The exported checkpoint: consolidated (EMA) weights for sampling, loadable at any world size.

Layout under one URI (a local folder or s3://bucket/prefix):
    model.safetensors   the model's state dict (weights only: nothing executes on load)
    config.json         the full Config the model was built from
    export.json         latent scale, manifest URI, training step, MLflow run, schema version, and
                        the hashes of the weights and of the config: both are checked on load, so
                        neither a truncated upload nor an edited config loads as another model
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

SCHEMA_VERSION = 2  # 2: config_sha256 and content_sha256 (1: weights only)
REQUIRED = {
    1: ("latent_scale", "manifest_uri", "step", "weights_sha256"),
    2: ("latent_scale", "manifest_uri", "step", "weights_sha256", "config_sha256", "content_sha256"),
}


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
    config_text = config.to_json()
    storage.write_text_atomic(storage.join(uri, "config.json"), config_text, config.storage)
    weights, described = hashlib.sha256(blob).hexdigest(), hashlib.sha256(config_text.encode()).hexdigest()
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "latent_scale": float(latent_scale),
        "manifest_uri": manifest_uri,
        "step": int(step),
        "mlflow_run_id": mlflow_run_id,  # evaluation logs against the run that trained it
        "weights_sha256": weights,
        "config_sha256": described,
        "content_sha256": content_hash(weights, described),  # the model's identity: weights and config
    }
    storage.write_text_atomic(storage.join(uri, "export.json"), json.dumps(metadata, indent=2), config.storage)
    return uri


def content_hash(weights_sha256: str, config_sha256: str) -> str:
    return hashlib.sha256(f"{weights_sha256}:{config_sha256}".encode()).hexdigest()


def read_metadata(uri: str) -> dict[str, Any]:
    """export.json, checked for its schema and keys; `content_sha256` is always present (for a
    schema-1 export, which recorded no config hash, it covers the weights alone)."""
    path = storage.join(uri, "export.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"no exported checkpoint at {uri} (missing export.json)")
    try:
        metadata = json.loads(storage.read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    version = metadata.get("schema_version")
    if version not in REQUIRED:
        raise ValueError(f"{path}: schema version {version} is not one of {sorted(REQUIRED)}")
    missing = [key for key in REQUIRED[version] if key not in metadata]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)} (incomplete or edited export)")
    if version == 1:
        metadata["content_sha256"] = metadata["weights_sha256"]
    return metadata


def read_config(uri: str) -> Config:
    """The config of an exported checkpoint, without loading its weights; checked against its
    recorded hash (schema 2), so an edited config.json is refused."""
    metadata = read_metadata(uri)
    path = storage.join(uri, "config.json")
    text = storage.read_text(path)
    if "config_sha256" in metadata and hashlib.sha256(text.encode()).hexdigest() != metadata["config_sha256"]:
        raise ValueError(
            f"{path} does not match the hash in export.json (edited or partial): it would build "
            "another model than the one trained"
        )
    return Config.from_text(text)


def verify_weights(uri: str, metadata: dict[str, Any] | None = None) -> bytes:
    """The weights file, checked against the hash export.json records (a truncated upload or a
    replaced file raises ValueError)."""
    metadata = metadata or read_metadata(uri)
    blob = storage.read_bytes(storage.join(uri, "model.safetensors"))
    if hashlib.sha256(blob).hexdigest() != metadata["weights_sha256"]:
        raise ValueError(f"{uri}/model.safetensors does not match the hash in export.json (corrupt or partial)")
    return blob


def load_exported(uri: str, device: torch.device | str = "cpu") -> Exported:
    """The model (eval mode, on `device`) with its config and latent scale; weights are verified
    against the recorded hash so a truncated upload fails loudly instead of sampling garbage."""
    metadata = read_metadata(uri)
    config = read_config(uri)
    blob = verify_weights(uri, metadata)
    model = build_model(config)
    model.load_state_dict(load_safetensors(blob))
    return Exported(
        model=model.to(device).eval(),
        config=config,
        latent_scale=metadata["latent_scale"],
        manifest_uri=metadata["manifest_uri"],
        step=metadata["step"],
    )
