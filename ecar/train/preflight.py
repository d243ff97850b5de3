"""Checks that run on the driver before any Ray resource is taken: storage reachable and
writable, the latent manifest present and matching the model, the tracking server answering.
Each failure is a `PreflightError` (a ValueError) whose message names the key, URI or file.
"""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from urllib.parse import urlparse

from ecar import storage
from ecar.config import Config
from ecar.log import get_logger
from ecar.train.trainer import ManifestSummary

log = get_logger(__name__)

PROBE_TIMEOUT_S = 5  # an unreachable endpoint must fail in seconds, not after boto's retries


class PreflightError(ValueError):
    """The run cannot start; the message names what is wrong and where."""


def _s3_client_probe(uri: str, config: Config, key: str) -> None:
    """Reach the bucket of an s3:// URI with a short timeout and a single attempt."""
    import boto3
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = urlparse(uri).netloc
    endpoint = storage.endpoint_url(config.storage) or None
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=storage.region(config.storage) or None,
        config=BotoConfig(
            connect_timeout=PROBE_TIMEOUT_S,
            read_timeout=PROBE_TIMEOUT_S,
            retries={"max_attempts": 1, "mode": "standard"},
        ),
    )
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "?")
        raise PreflightError(f"{key}: bucket {bucket!r} of {uri} is not accessible (S3 error {code})") from None
    except BotoCoreError as error:
        where = endpoint or "the default AWS endpoint"
        raise PreflightError(f"{key}: cannot reach storage for {uri} at {where}: {error}") from None


def check_storage(uri: str, config: Config, key: str, write: bool) -> None:
    """The location answers, and (write=True) accepts and deletes a small probe object."""
    if storage.is_remote(uri):
        _s3_client_probe(uri, config, key)
    probe = storage.join(uri, f".ecar-write-probe-{uuid.uuid4().hex}")
    if write:
        try:
            storage.write_bytes_atomic(probe, b"probe", config.storage)
            storage.delete(probe, config.storage)
        except (OSError, ValueError) as error:
            raise PreflightError(f"{key}: cannot write under {uri}: {error}") from None


def check_tracking(tracking_uri: str) -> None:
    """A tracking server must answer its health endpoint (an embedded SQLite store needs no check)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S) as response:
            response.read()
    except (urllib.error.URLError, OSError) as error:
        raise PreflightError(
            f"tracking.tracking_uri: the MLflow server at {tracking_uri} does not answer: "
            f"{getattr(error, 'reason', error)}"
        ) from None


def prepare_source(config: Config, manifest_uri: str, split: str = "train") -> ManifestSummary:
    """Read and check the latent manifest against the config; the shard footers are checked
    too (cheap: no data pages), so a broken data set fails here, not inside a worker."""
    from ecar.data.manifest import read_manifest
    from ecar.data.reader import validate_latents

    if not manifest_uri:
        raise PreflightError("data.manifest_uri: empty; pass --manifest URI (the output of `ecar encode`)")
    # absolute, so that the manifest's prefix (and every shard path derived from it) means the
    # same thing in the workers, which run in Ray's own folders
    manifest_uri = storage.absolute(manifest_uri)
    check_storage(manifest_uri, config, "data.manifest_uri", write=False)
    try:
        manifest = read_manifest(manifest_uri, config.storage)
    except FileNotFoundError as error:
        raise PreflightError(f"data.manifest_uri: {error}") from None
    if split not in manifest["splits"]:
        raise PreflightError(
            f"data.manifest_uri: {manifest_uri} has no {split!r} split (splits: {', '.join(manifest['splits'])})"
        )
    model = config.model
    expected = [model.latent_channels, model.latent_size, model.latent_size]
    if list(manifest["latent_shape"]) != expected:
        raise PreflightError(
            f"model.latent_channels/model.latent_size: the model takes latents of shape {expected} (C, H, W) but "
            f"the manifest {manifest_uri} holds {list(manifest['latent_shape'])}"
        )
    if manifest["num_classes"] > model.num_classes:
        raise PreflightError(
            f"model.num_classes: {model.num_classes}, but the manifest {manifest_uri} has "
            f"{manifest['num_classes']} classes"
        )
    rows = int(manifest["splits"][split]["rows"])
    # the data is split into global / micro streams (ecar.train.streams), each a micro-batch a step
    needed = config.train.global_batch_size
    if rows < needed:
        raise PreflightError(
            f"train.global_batch_size: {rows} {split} rows in {manifest_uri} cannot fill one global batch "
            f"of {needed} (a micro-batch of {config.train.micro_batch_size} in each of its streams)"
        )
    validate_latents(manifest, [split], config.storage, values=False)
    val_split, val_rows = _validation_rows(config, manifest, manifest_uri)
    return ManifestSummary(
        manifest_uri=storage.absolute(manifest_uri),  # recorded in the export, read from anywhere
        latent_shape=tuple(manifest["latent_shape"]),
        latent_scale=float(manifest["latent_scale"]),
        num_rows=rows,
        class_names=tuple(manifest.get("class_names") or ()),
        val_split=val_split,
        val_rows=val_rows,
        manifest=manifest,
    )


def _validation_rows(config: Config, manifest: dict, manifest_uri: str) -> tuple[str, int]:
    """(split, rows) for the validation loss: train.val_rows of data.val_split, rounded down to
    an equal share per worker; ("", 0) when turned off or the data set has no such split."""
    split, wanted, workers = config.data.val_split, config.train.val_rows, config.train.num_workers
    if not wanted:
        return "", 0
    if split not in manifest["splits"]:
        log.warning("no validation loss: %s has no %r split (data.val_split)", manifest_uri, split)
        return "", 0
    rows = min(wanted, int(manifest["splits"][split]["rows"])) // workers * workers
    return (split, rows) if rows else ("", 0)


def preflight(config: Config, manifest_uri: str, tracking_uri: str) -> ManifestSummary:
    """All checks, cheapest first. Config errors (unknown keys, bad values) were raised when the
    config was built; these are the checks that need storage and the manifest."""
    check_storage(config.storage.root, config, "storage.root", write=True)
    source = prepare_source(config, manifest_uri)
    check_tracking(tracking_uri)
    return source
