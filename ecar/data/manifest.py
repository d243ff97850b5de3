"""The latent data set's manifest: what every consumer of the latents trusts.

`PREFIX/manifest.json` (written last, atomically, only when every shard is complete):

    schema_version   int, SCHEMA_VERSION
    kind             "latents"
    tokenizer        {kind, uri, sha256}: which tokenizer made the latents (content hash)
    latent_shape     [C, h, w];  latent_dtype "float32"
    latent_scale     training uses scale * latent, decoding divides by it (never a literal in
                     code): the tokenizer's own scale when it has one (a diffusers VAE's config
                     `scaling_factor`), else 1 / std of the train split's latent values
    latent_scale_source  "tokenizer" or "measured"
    latent_mean, latent_std   the measured statistics of the train split's latent values
    flip_augment     whether shards carry `latent_flip` (latent of the mirrored image)
    num_classes, class_names
    image_size, image_channels, source {images_uri, kind, uri}
    splits           {split: {rows, quarantined, input_rows, quarantine_reasons, shards: [{name, rows, quarantined}]}}
    quarantined      total quarantined rows

Shards: `PREFIX/latents/SPLIT/shard-NNNNN.parquet` with columns id (string), label (int64),
latent (fixed_size_list<float32>[C*h*w], C-major: reshape to (C, h, w)) and optionally
latent_flip (same type). Quarantine: `PREFIX/quarantine/SPLIT/shard-NNNNN.parquet`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ecar import storage
from ecar.config import StorageConfig

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
LATENT_DTYPE = "float32"


def manifest_location(uri: str) -> tuple[str, str]:
    """(prefix, manifest file URI) for a prefix or a manifest.json URI."""
    if uri.rstrip("/").endswith(".json"):
        prefix = uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."
        return prefix, uri
    return uri, storage.join(uri, MANIFEST_NAME)


def latent_shard_uri(prefix: str, split: str, name: str) -> str:
    return storage.join(prefix, "latents", split, name)


def quarantine_shard_uri(prefix: str, split: str, name: str) -> str:
    return storage.join(prefix, "quarantine", split, name)


def write_manifest(prefix: str, manifest: dict[str, Any], storage_config: StorageConfig | None = None) -> str:
    uri = storage.join(prefix, MANIFEST_NAME)
    storage.write_text_atomic(uri, json.dumps(manifest, indent=2), storage_config)
    return uri


def read_manifest(uri: str, storage_config: StorageConfig | None = None) -> dict[str, Any]:
    """The manifest at a prefix or manifest.json URI, with `prefix` added; clear errors when it
    is missing (the encode job has not finished) or of another schema."""
    prefix, location = manifest_location(uri)
    if not storage.exists(location, storage_config):
        raise FileNotFoundError(f"no latent manifest at {location} (has `ecar encode` finished?)")
    try:
        manifest = json.loads(storage.read_text(location, storage_config))
    except json.JSONDecodeError as error:
        raise ValueError(f"{location}: not JSON ({error})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("schema_version") != SCHEMA_VERSION
        or manifest.get("kind") != "latents"
    ):
        raise ValueError(f"{location}: not a latent manifest of schema version {SCHEMA_VERSION}")
    _check_keys(manifest, location)
    return {**manifest, "prefix": prefix}


REQUIRED_KEYS = ("tokenizer", "latent_shape", "latent_dtype", "latent_scale", "num_classes", "flip_augment", "splits")


def _check_keys(manifest: dict[str, Any], location: str) -> None:
    """Every key the readers use, named when missing (an edited or truncated manifest)."""
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"{location}: missing key {missing[0]!r} (incomplete or edited manifest)")
    for split, entry in manifest["splits"].items():
        for key in ("rows", "shards"):
            if key not in entry:
                raise ValueError(f"{location}: split {split!r} has no {key!r}")
        for index, shard in enumerate(entry["shards"]):
            for key in ("name", "rows"):
                if key not in shard:
                    raise ValueError(f"{location}: split {split!r}, shard {index} has no {key!r}")


def content_sha256(manifest: dict[str, Any]) -> str:
    """A hash of what the manifest says (shards, rows, scale, tokenizer), not of where it lies:
    the same data set moved to another prefix keeps its hash."""
    content = {key: value for key, value in manifest.items() if key != "prefix"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def shard_uris(manifest: dict[str, Any], split: str) -> list[str]:
    if split not in manifest["splits"]:
        raise ValueError(f"the latent data set has no split {split!r} (splits: {', '.join(manifest['splits'])})")
    return [latent_shard_uri(manifest["prefix"], split, s["name"]) for s in manifest["splits"][split]["shards"]]
