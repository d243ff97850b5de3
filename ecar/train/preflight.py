"""Checks that run on the driver before any Ray resource is taken: storage reachable and
writable, the latent manifest present and matching the model, the tracking server answering.
Each failure is a `PreflightError` (a ValueError) whose message names the key, URI or file.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from ecar import storage
from ecar.config import Config
from ecar.log import get_logger
from ecar.train.trainer import ManifestSummary

log = get_logger(__name__)

PROBE_TIMEOUT_S = storage.PROBE_TIMEOUT_S


class PreflightError(ValueError):
    """The run cannot start; the message names what is wrong and where."""


def check_storage(uri: str, config: Config, key: str, write: bool) -> None:
    """`storage.check_access`, failing as a PreflightError."""
    try:
        storage.check_access(uri, key, write, config.storage)
    except storage.StorageAccessError as error:
        raise PreflightError(str(error)) from None


def check_tracking(tracking_uri: str) -> None:
    """A tracking server must answer its health endpoint (an embedded SQLite store needs no check)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S) as response:
            response.read()
    except (urllib.error.URLError, OSError) as error:
        from ecar.tracking import redact

        raise PreflightError(
            f"tracking.tracking_uri: the MLflow server at {redact(tracking_uri)} does not answer: "
            f"{getattr(error, 'reason', error)}"
        ) from None


def prepare_source(config: Config, manifest_uri: str, split: str = "train") -> ManifestSummary:
    """Read and check the latent manifest against the config; the shard footers are checked
    too (cheap: no data pages), so a broken data set fails here, not inside a worker."""
    from ecar.data.manifest import content_sha256, read_manifest
    from ecar.data.reader import LatentValidationError, validate_latents
    from ecar.data.shards import ShardError

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
    val_split, val_rows = _validation_rows(config, manifest, manifest_uri)
    # Values too (data.verify_values): a NaN latent, a label outside [0, num_classes) (one equal
    # to num_classes would train silently as the null class) or an unreadable page fails here,
    # naming the file and row, instead of inside a worker after the cluster has started.
    try:
        validate_latents(
            manifest, [split, *([val_split] if val_split else [])], config.storage, values=config.data.verify_values
        )
    except (LatentValidationError, ShardError) as error:
        raise PreflightError(f"data.manifest_uri: {error}") from None
    return ManifestSummary(
        manifest_uri=storage.absolute(manifest_uri),  # recorded in the export, read from anywhere
        latent_shape=tuple(manifest["latent_shape"]),
        latent_scale=float(manifest["latent_scale"]),
        num_rows=rows,
        class_names=tuple(manifest.get("class_names") or ()),
        val_split=val_split,
        val_rows=val_rows,
        manifest=manifest,
        manifest_sha256=content_sha256(manifest),
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


# What a resumed run may change freely: how it is operated, stored, tracked, previewed, and how
# long it runs. Everything else the checkpoint's weights were trained under (model, stages,
# flow, optimizer, batch, seed, data order) must match, or `--allow-changes` must say so.
OPERATIONAL_PREFIXES = ("storage.", "tracking.", "sampling.", "tokenizer.")
OPERATIONAL_KEYS = {
    "preset",
    "train.steps",
    "train.log_every",
    "train.sample_every",
    "train.checkpoint_every",
    "train.eval_every",
    "train.val_rows",
    "train.num_to_keep",
    "train.max_failures",
    "train.wait_for_resources",
    "train.cpus_per_worker",
    "train.torch_threads",
    "train.num_workers",  # DeepSpeed's shards decide whether it may change (checked in the workers)
    "train.min_workers",
    "train.use_gpu",
}
TRAINING_DATA_KEYS = {"data.shuffle_buffer_rows", "data.val_split"}  # the rest of data.* is prepare/encode's


def _matters(key: str) -> bool:
    if key.startswith("data."):
        return key in TRAINING_DATA_KEYS
    return key not in OPERATIONAL_KEYS and not key.startswith(OPERATIONAL_PREFIXES)


def _as_trained(config: Config) -> dict[str, Any]:
    """The flat settings, with the per-stage loss weights as training uses them: explicit
    weights and the growth rule that gives the same weights are the same setting."""
    flat = config.flat()
    del flat["stages.loss_weight_growth"]
    flat["stages.loss_weights"] = list(config.stages.stage_loss_weights())
    return flat


def config_changes(saved: Config, config: Config) -> list[str]:
    """Every setting ("key: saved -> new") in which `config` differs from the `saved` one."""
    old, new = _as_trained(saved), _as_trained(storage.with_absolute_root(config))
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(new) if old.get(key) != new.get(key)]


def training_changes(saved: Config, config: Config) -> list[str]:
    """The changes between `saved` and `config` that change what a model learns (see
    OPERATIONAL_KEYS): a checkpoint or export trained under `saved` is not one of `config`."""
    return [change for change in config_changes(saved, config) if _matters(change.split(":", 1)[0])]


def latest_checkpoint(run_uri: str, config: Config) -> str | None:
    """The checkpoint Ray Train resumes run `run_uri` from (its snapshot's latest), or None."""
    snapshot = storage.join(run_uri, "checkpoint_manager_snapshot.json")
    if not storage.exists(snapshot, config.storage):
        return None
    latest = json.loads(storage.read_text(snapshot, config.storage)).get("latest_checkpoint_result")
    return storage.join(run_uri, latest["checkpoint_dir_name"]) if latest else None


def check_resume(config: Config, run_uri: str, source: ManifestSummary, allow_changes: bool = False) -> list[str]:
    """If run `run_uri` has a checkpoint, the changes ("key: old -> new") between the config and
    data set it was trained under and this launch's. A change that matters for the training
    (see OPERATIONAL_KEYS) is refused unless `allow_changes`; the list is what the caller logs."""
    from ecar.train import checkpoint as ckpt

    checkpoint = latest_checkpoint(run_uri, config)
    if checkpoint is None:
        return []
    try:
        saved = Config.from_text(storage.read_text(storage.join(checkpoint, ckpt.CONFIG_FILE), config.storage))
        state = json.loads(storage.read_text(storage.join(checkpoint, ckpt.STATE_FILE), config.storage))
    except (FileNotFoundError, ValueError) as error:
        raise PreflightError(f"--name: the run's latest checkpoint {checkpoint} cannot be read: {error}") from None
    changes = config_changes(saved, config)
    refused = training_changes(saved, config)
    recorded = state.get("manifest_sha256", "")
    if recorded and recorded != source.manifest_sha256:
        refused.append(
            f"data set: {state.get('manifest_uri')} (sha256 {recorded[:12]}) -> {source.manifest_uri} "
            f"(sha256 {source.manifest_sha256[:12]})"
        )
        changes.append(refused[-1])
    if refused and not allow_changes:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise PreflightError(
            f"--name: resuming {checkpoint} with a changed {refused[0]}{more}; use the checkpoint's settings, "
            "a new --name, or --allow-changes to resume under the new ones"
        )
    return changes


def check_cluster(config: Config) -> None:
    """Refuse a request the connected cluster cannot meet as it is (unless
    train.wait_for_resources): Ray would wait for it without a word. The training workers must
    fit on the nodes (each worker on one node), and leave at least one CPU for Ray Data's read
    tasks, which take one CPU each and are kept off the workers' share. An elastic run needs its
    fewest workers (train.min_workers) to fit."""
    import ray

    from ecar.config import worker_bounds

    train = config.train
    if train.wait_for_resources:
        return
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    total = sum(node.get("CPU", 0.0) for node in nodes)
    workers = worker_bounds(train)[0]
    asked = workers * train.cpus_per_worker
    request = f"{workers} worker(s) x {train.cpus_per_worker:g} CPU{' + 1 GPU' if train.use_gpu else ''}"
    hint = "ask for less, or set train.wait_for_resources=true on a cluster that autoscales"
    if total - asked < 1:
        raise PreflightError(
            f"train.num_workers/train.cpus_per_worker: {request} take {asked:g} of the cluster's {total:g} CPUs and "
            f"leave {max(total - asked, 0):g}, but the data reads need 1; {hint}"
        )
    placeable = 0
    for node in nodes:
        fits = int(node.get("CPU", 0.0) // train.cpus_per_worker)
        if train.use_gpu:
            fits = min(fits, int(node.get("GPU", 0.0)))
        placeable += fits
    if placeable < workers:
        raise PreflightError(
            f"train.num_workers: the cluster's {len(nodes)} node(s) fit {placeable} of the {request}; {hint}"
        )


def preflight(config: Config, manifest_uri: str, tracking_uri: str) -> ManifestSummary:
    """All checks, cheapest first. Config errors (unknown keys, bad values) were raised when the
    config was built; these are the checks that need storage and the manifest."""
    check_storage(config.storage.root, config, "storage.root", write=True)
    source = prepare_source(config, manifest_uri)
    check_tracking(tracking_uri)
    return source
