"""The one place that talks to MLflow: where runs go, experiments, runs (open, child, finish),
metrics, images and system metrics, registered models and `models:/` URIs.

Everything goes through an explicit `MlflowClient(tracking_uri)` and run id, never MLflow's
global tracking URI or "active run", so that the driver, the rank-0 worker and a sweep's trials
cannot disagree about where things land.

One vocabulary for every job. Each run carries the tag `ecar.job` (`train`, `train-tokenizer`,
`encode`, `evaluate`, `tune`) and, as params, only the config sections its job reads
(`JOB_SECTIONS`); metrics have one name wherever they come from: `fid`, `precision`, `recall`,
`classifier_score`, `sampling_gflops`, `latency_s_per_image_bN` from evaluation, in sweeps too;
`loss`, `loss_stageS`, `val_loss`, `grad_norm`, `lr` from training; `rfid` and `psnr` for the
tokenizer's reconstructions (another quantity than a generator's `fid`). Metrics are sent in
batches. Credentials written into a URI (`scheme://user:password@host`) never reach params,
tags or text artifacts (`redact`).

Registered models. Every training export becomes a version of a registered model (default: the
preset's name, `tracking.registered_model` to choose) through an MLflow 3 *external* logged
model that points at the export on storage: its tags carry the export URI and its weights,
config and content hashes, its params the model's config, its artifacts `export.json` and the
config; the logged model and the model version name the training run. A pyfunc wrapper was the
alternative; it is not used because (1) the export on storage is already the artifact, checked
against its hashes on every load, and a pyfunc would copy the weights (GBs at ImageNet size)
into MLflow's artifact store; (2) sampling is a Ray Data job over an actor pool writing shards,
which a `predict` in one process would duplicate more slowly; (3) loading a pyfunc unpickles
code from the artifact store, where ecar loads safetensors only. `resolve_export` turns
`models:/NAME/VERSION` or `models:/NAME@ALIAS` back into the export URI and refuses an export
whose content no longer matches the registered hash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecar.config import Config

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

JOB_TAG = "ecar.job"
RUN_NAME_TAG = "ecar.run_name"
PHASE_TAG = "ecar.phase"  # what a training run's workers do before the first logged step
MODEL_URI_TAG = "ecar.model_uri"  # on a training run: the model version its export became
EXPORT_URI_TAG = "ecar.export_uri"
CONTENT_TAG = "ecar.content_sha256"
MODEL_ID_TAG = "ecar.model_id"

# The config sections (or single keys) each job reads: its params and its config artifact.
JOB_SECTIONS: dict[str, tuple[str, ...]] = {
    "train": ("preset", "model", "stages", "flow", "sampling", "train", "data", "storage", "tracking"),
    "train-tokenizer": ("preset", "tokenizer", "data", "model.latent_channels", "model.latent_size", "storage"),
    "encode": ("preset", "tokenizer", "data", "model.latent_channels", "model.latent_size", "storage"),
    "evaluate": ("preset", "sampling", "flow.steps_per_stage", "data.val_split", "storage"),
}
JOB_SECTIONS["tune"] = JOB_SECTIONS["train"]  # a sweep's parent keeps its trials' base config
MODEL_SECTIONS = ("preset", "model", "stages", "flow")  # what a registered model's params describe
SYSTEM_METRICS_INTERVAL_S = 10.0

# user[:password]@ after a scheme; a password may hold a raw "/" (AWS secret keys do), so with a
# ":" everything up to the "@" counts: a port followed by a path with an "@" is over-redacted,
# which is the safe side.
_USERINFO = re.compile(r"(?<=://)[^/@:\s\"']+(?::[^@\s\"']*)?@")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))$")


# ----- where runs go -------------------------------------------------------------------------
def resolve_tracking_uri(config: Config) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else an embedded store. MLflow 3 refuses a
    plain file store, so the embedded default is an absolute SQLite path under the (local)
    storage root; with object storage as the root, set a tracking server."""
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = config.storage.root
    if "://" in root:
        return f"sqlite:///{Path('outputs/mlflow.db').resolve()}"
    return f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"


def client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it hidden: `s3://key:secret@host/x` and
    `https://token@host` become `s3://***@host/x` and `https://***@host`."""
    return _USERINFO.sub("***@", text)


def experiment_id(mlflow_client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of experiment `name`, created if missing. An embedded store keeps artifacts next to
    its database (absolute, so that workers in another working directory write to the same
    place); a server decides for itself."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    """The source tree's commit (with "-dirty" when it has local changes), or "unknown"."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


# ----- runs ------------------------------------------------------------------------------------
def _selected(key: str, sections: tuple[str, ...]) -> bool:
    return any(key == section or key.startswith(section + ".") for section in sections)


def _param(value: Any) -> str:
    """A param's text: lists and mappings as JSON, credentials redacted."""
    return redact(json.dumps(value) if isinstance(value, (list, dict)) else str(value))


def config_params(config: Config, sections: tuple[str, ...]) -> dict[str, str]:
    """The flattened config keys under `sections`, as MLflow param strings."""
    return {key: _param(value) for key, value in config.flat().items() if _selected(key, sections)}


def config_text(config: Config, sections: tuple[str, ...]) -> str:
    """The config as JSON, cut to `sections` (nested as in the config), credentials redacted."""
    kept: dict[str, Any] = {}
    for key, value in config.flat().items():
        if _selected(key, sections):
            *parents, leaf = key.split(".")
            node = kept
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return redact(json.dumps(kept, indent=2))


def _find_run(mlflow_client: MlflowClient, experiment: str, name: str, job: str) -> Any | None:
    """The run of job `job` named `name` (runs written before the job tag existed match too)."""
    found = mlflow_client.search_runs([experiment], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'", max_results=20)
    return next((run for run in found if run.data.tags.get(JOB_TAG, job) == job), None)


def open_run(
    config: Config,
    tracking_uri: str,
    name: str,
    job: str,
    tags: dict[str, str] | None = None,
    parent_run_id: str = "",
    params: dict[str, Any] | None = None,
    note: str = "",
) -> tuple[str, bool]:
    """(run id, resumed): the MLflow run of job `job` named `name` in the config's experiment,
    found again when the job resumes under the same name, else created with tags, params (the
    config sections the job reads, unless `params` are given) and those sections as the
    artifact `config.json`. With `parent_run_id` it is that run's child (a sweep's trial)."""
    from mlflow.entities import Param

    mlflow_client = client(tracking_uri)
    experiment = experiment_id(mlflow_client, config.tracking.experiment_name, tracking_uri)
    found = _find_run(mlflow_client, experiment, name, job)
    if found is not None:
        mlflow_client.update_run(found.info.run_id, status="RUNNING")
        for key, value in (tags or {}).items():  # e.g. what a resume changed (params stay as first logged)
            mlflow_client.set_tag(found.info.run_id, key, redact(str(value)))
        return found.info.run_id, True
    all_tags = {RUN_NAME_TAG: name, JOB_TAG: job, "preset": config.preset, "git_commit": git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if note:
        all_tags["mlflow.note.content"] = note
    run_id = mlflow_client.create_run(
        experiment, run_name=name, tags={key: redact(str(value)) for key, value in all_tags.items()}
    ).info.run_id
    sections = JOB_SECTIONS[job]
    values = config_params(config, sections) if params is None else {k: _param(v) for k, v in params.items()}
    entries = [Param(key, value) for key, value in values.items()]
    for start in range(0, len(entries), 100):  # MLflow takes at most 100 params per batch
        mlflow_client.log_batch(run_id, params=entries[start : start + 100])
    mlflow_client.log_text(run_id, config_text(config, sections), "config.json")
    return run_id, False


def log_metrics(
    tracking_uri: str, run_id: str, metrics: dict[str, Any], step: int = 0, model_id: str | None = None
) -> None:
    """The numbers among `metrics` in one batch (other values are skipped); with `model_id` they
    are also the metrics of that logged model."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    numbers = [
        Metric(key, float(value), now, step, model_id=model_id)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    if numbers:
        client(tracking_uri).log_batch(run_id, metrics=numbers)


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    client(tracking_uri).log_batch(run_id, tags=[RunTag(key, redact(str(value))) for key, value in tags.items()])


def log_text(tracking_uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(tracking_uri).log_text(run_id, redact(text), artifact_file)


def _image(figure):
    """A matplotlib figure as a PIL image (the figure is closed)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def log_image(tracking_uri: str, run_id: str, figure, key: str, step: int) -> None:
    """A figure as image `key` at `step`: the UI's image view steps through a key's images by
    step; `logged_images` reads them back."""
    client(tracking_uri).log_image(run_id, _image(figure), key=key, step=step)


def logged_images(tracking_uri: str, run_id: str, key: str) -> dict[int, str]:
    """{step: artifact path of the full-size PNG} of image `key` in a run. MLflow stores images
    by key under `images/KEY+step+STEP+timestamp+...` (`%` in older versions); the path opens
    with `download_artifacts`."""
    name = re.escape(key.replace("/", "~"))
    pattern = re.compile(rf"^images/{name}[+%]step[+%](\d+)[+%]timestamp[+%]\d+[+%][0-9a-f-]+\.png$")
    found = {}
    for entry in client(tracking_uri).list_artifacts(run_id, "images"):
        match = pattern.match(entry.path)
        if match:
            found[int(match.group(1))] = entry.path
    return dict(sorted(found.items()))


def run_exists(tracking_uri: str, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client(tracking_uri).get_run(run_id)
    except MlflowException:
        return False
    return True


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED", export_uri: str | None = None) -> None:
    """The loss-curve plot from the logged history (when there is a `loss`), the exported
    checkpoint's URI, the run status."""
    from ecar.figures import loss_curve

    mlflow_client = client(tracking_uri)
    keys = [k for k in mlflow_client.get_run(run_id).data.metrics if k == "loss" or k.startswith("loss_stage")]
    if "loss" in keys:
        history = {k: [(m.step, m.value) for m in mlflow_client.get_metric_history(run_id, k)] for k in keys}
        mlflow_client.log_image(run_id, _image(loss_curve(history)), artifact_file="loss_curve.png")
    if export_uri:
        set_tags(tracking_uri, run_id, {"export_uri": export_uri})
        log_text(tracking_uri, run_id, export_uri + "\n", "export_uri.txt")
    mlflow_client.set_terminated(run_id, status=status)


def search_runs(tracking_uri: str, experiment: str, filter_string: str = "") -> pd.DataFrame:
    """The runs of experiment `experiment` (a name) matching `filter_string`, one row each:
    run_id, status, and columns `metrics.K`, `params.K`, `tags.K` (as `mlflow.search_runs`
    gives them, without its global tracking URI)."""
    import pandas as pd

    mlflow_client = client(tracking_uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment named {experiment!r} at {redact(tracking_uri)}")
    rows, token = [], None
    while True:
        page = mlflow_client.search_runs([found.experiment_id], filter_string, max_results=1000, page_token=token)
        for run in page:
            row = {"run_id": run.info.run_id, "status": run.info.status, "start_time": run.info.start_time}
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
            row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
            rows.append(row)
        token = page.token
        if not token:
            return pd.DataFrame(rows)


# ----- inside the workers -----------------------------------------------------------------------
class RankZeroTracker:
    """Metrics, images and system metrics of one MLflow run, written by rank 0; a no-op on other
    ranks (or without a run id)."""

    def __init__(self, tracking_uri: str, run_id: str, rank: int) -> None:
        self.enabled = rank == 0 and bool(run_id)
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.pending: list[Any] = []
        self.monitor = None

    def log_metrics(self, step: int, metrics: dict[str, float], flush: bool = True) -> None:
        """Logs `metrics` at `step`; with `flush=False` they wait for the next flushing call and
        go in its batch."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), now, step) for key, value in metrics.items()]
        if flush:
            client(self.tracking_uri).log_batch(self.run_id, metrics=self.pending)
            self.pending = []

    def log_image(self, figure, key: str, step: int) -> None:
        if self.enabled:
            log_image(self.tracking_uri, self.run_id, figure, key, step)
        else:
            import matplotlib.pyplot as plt

            plt.close(figure)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            log_text(self.tracking_uri, self.run_id, text, artifact_file)

    def set_phase(self, phase: str) -> None:
        """What the workers are doing before the first logged step (the `ecar.phase` tag, which
        the driver's progress display reads), so that a slow start is never silent."""
        if self.enabled:
            set_tags(self.tracking_uri, self.run_id, {PHASE_TAG: phase})

    def start_system_metrics(self) -> None:
        """MLflow's system-metrics monitor (CPU, memory, disk, network; GPU when there is one)
        on this worker's machine, logged as `system/...` every SYSTEM_METRICS_INTERVAL_S; a
        resumed run continues its steps."""
        if not self.enabled or self.monitor is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=SYSTEM_METRICS_INTERVAL_S,
            resume_logging=True,
            tracking_uri=self.tracking_uri,
        )
        self.monitor.start()

    def close(self) -> None:
        """Sends what is pending and stops the system-metrics monitor (after its last batch)."""
        if self.pending:
            self.log_metrics(self.pending[-1].step, {})
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None


# ----- registered models ----------------------------------------------------------------------
@dataclass(frozen=True)
class RegisteredExport:
    """An export and, when it is registered, its model version."""

    export_uri: str
    model_uri: str = ""  # models:/NAME/VERSION (a version, never an alias: aliases move)
    model_id: str = ""  # the MLflow 3 logged model
    run_id: str = ""  # the training run
    content_sha256: str = ""  # what was registered (ecar.export's hash of weights and config)


def is_model_uri(uri: str) -> bool:
    return uri.startswith("models:/")


def registered_model_name(config: Config) -> str:
    return config.tracking.registered_model or config.preset


def register_export(tracking_uri: str, run_id: str, export_uri: str, config: Config) -> RegisteredExport:
    """Registers the export at `export_uri`, trained in run `run_id`, as the next version of the
    config's registered model (see the module docstring); a re-run that exports the same content
    again gets the version it already has. The run is tagged with the version's URI."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    from ecar.export import read_metadata

    mlflow_client = client(tracking_uri)
    metadata = read_metadata(export_uri)
    name = registered_model_name(config)
    known = _version_with_content(mlflow_client, name, metadata["content_sha256"], run_id)
    if known is not None:
        return known
    tags = {
        EXPORT_URI_TAG: redact(export_uri),
        CONTENT_TAG: metadata["content_sha256"],
        "ecar.weights_sha256": metadata["weights_sha256"],
        "ecar.config_sha256": metadata.get("config_sha256", ""),
        "ecar.step": str(metadata["step"]),
        "ecar.latent_manifest": redact(metadata["manifest_uri"]),
    }
    run = mlflow_client.get_run(run_id)
    model = mlflow_client.create_logged_model(
        run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        tags={**tags, MLFLOW_MODEL_IS_EXTERNAL: "true"},
        params=config_params(config, MODEL_SECTIONS),
        model_type=f"ecar/{config.model.kind}",
    )
    with tempfile.TemporaryDirectory(prefix="ecar-model-") as folder:
        (Path(folder) / "export.json").write_text(redact(json.dumps({**metadata, "export_uri": export_uri}, indent=2)))
        (Path(folder) / "config.json").write_text(redact(config.to_json()))
        mlflow_client.log_model_artifacts(model.model_id, folder)
    mlflow_client.finalize_logged_model(model.model_id, "READY")
    mlflow_client.log_outputs(run_id, [LoggedModelOutput(model.model_id, int(metadata["step"]))])
    _ensure_registered_model(mlflow_client, name)
    # A server resolves `models:/MODEL_ID` (MLflow's own lineage, which the UI links); the
    # embedded store would look it up through MLflow's global tracking URI, so it gets the
    # logged model's artifact location instead. Both name the model id in a tag.
    source = f"models:/{model.model_id}" if tracking_uri.startswith(("http://", "https://")) else None
    version = mlflow_client.create_model_version(
        name,
        source=source or model.artifact_location,
        run_id=run_id,
        tags={**tags, MODEL_ID_TAG: model.model_id},
        description=f"{run.info.run_name} at step {metadata['step']}: {redact(export_uri)}",
        model_id=model.model_id,
    )
    registered = RegisteredExport(
        export_uri, f"models:/{name}/{version.version}", model.model_id, run_id, metadata["content_sha256"]
    )
    set_tags(tracking_uri, run_id, {MODEL_URI_TAG: registered.model_uri, MODEL_ID_TAG: model.model_id})
    return registered


def _ensure_registered_model(mlflow_client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(name, description="E-CAR exports: one version per training run's export")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":  # a parallel trial registered it first
            raise


def _version_with_content(
    mlflow_client: MlflowClient, name: str, content_sha256: str, run_id: str = ""
) -> RegisteredExport | None:
    """The newest version of `name` (or of any model, without a name) holding this content
    (from `run_id` when given)."""
    query = f"tags.`{CONTENT_TAG}` = '{content_sha256}'" + (f" and name = '{name}'" if name else "")
    versions = [v for v in mlflow_client.search_model_versions(query) if not run_id or v.run_id == run_id]
    if not versions:
        return None
    return _registered(max(versions, key=lambda v: int(v.version)))


def _registered(version) -> RegisteredExport:
    """What a model version (an MLflow ModelVersion) registered."""
    return RegisteredExport(
        version.tags.get(EXPORT_URI_TAG, ""),
        f"models:/{version.name}/{version.version}",
        version.tags.get(MODEL_ID_TAG, ""),
        version.run_id or "",
        version.tags.get(CONTENT_TAG, ""),
    )


def find_registered(tracking_uri: str, export_uri: str) -> RegisteredExport:
    """The export with its newest model version holding the same content, if there is one (an
    export given by path still links its evaluation to its model)."""
    from ecar.export import read_metadata

    found = _version_with_content(client(tracking_uri), "", read_metadata(export_uri)["content_sha256"])
    return RegisteredExport(export_uri) if found is None else dataclasses.replace(found, export_uri=export_uri)


def _model_version(mlflow_client: MlflowClient, uri: str, tracking_uri: str):
    """The model version `models:/NAME/VERSION` or `models:/NAME@ALIAS` names; ValueError naming
    what is missing (the model, the version or the alias)."""
    from mlflow.exceptions import MlflowException

    match = _MODEL_URI.match(uri)
    if match is None:
        raise ValueError(f"{uri}: a registered model is models:/NAME/VERSION or models:/NAME@ALIAS")
    name, version, alias = match.group("name", "version", "alias")
    where = redact(tracking_uri)
    try:
        model = mlflow_client.get_registered_model(name)
    except MlflowException:
        raise ValueError(f"{uri}: no registered model {name!r} at {where}") from None
    if alias is not None:
        if alias not in model.aliases:
            have = ", ".join(f"@{a} -> {v}" for a, v in sorted(model.aliases.items())) or "none"
            raise ValueError(f"{uri}: model {name!r} has no alias {alias!r} (aliases: {have})")
        version = model.aliases[alias]
    try:
        return mlflow_client.get_model_version(name, str(version))
    except MlflowException:
        latest = max((int(v.version) for v in mlflow_client.search_model_versions(f"name = '{name}'")), default=0)
        raise ValueError(f"{uri}: model {name!r} has no version {version} (latest: {latest})") from None


def resolve_export(uri: str, tracking_uri: str) -> RegisteredExport:
    """A `models:/` URI as the export it registered, checked: the export must still hold the
    registered content. Any other URI is an export path, returned as it is."""
    if not is_model_uri(uri):
        return RegisteredExport(uri)
    from ecar.export import read_metadata
    from ecar.train.preflight import check_tracking

    check_tracking(tracking_uri)  # an unreachable server fails in seconds, not after MLflow's retries
    registered = _registered(_model_version(client(tracking_uri), uri, tracking_uri))
    content = read_metadata(registered.export_uri)["content_sha256"]
    if content != registered.content_sha256:
        raise ValueError(
            f"{uri}: the export at {registered.export_uri} no longer holds the registered weights and "
            "config (its content hash differs): it was replaced after registration"
        )
    return registered


def set_alias(tracking_uri: str, uri: str, alias: str) -> RegisteredExport:
    """Points `alias` of a registered model at the version `uri` names (`models:/NAME/VERSION`,
    or another alias's version with `models:/NAME@OTHER`)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", alias) or re.fullmatch(r"[vV]\d+|latest", alias):
        raise ValueError(f"alias {alias!r}: letters, digits, '_' and '-', starting with a letter (not v1, latest)")
    from ecar.train.preflight import check_tracking

    check_tracking(tracking_uri)
    mlflow_client = client(tracking_uri)
    version = _model_version(mlflow_client, uri, tracking_uri)
    mlflow_client.set_registered_model_alias(version.name, alias, str(version.version))
    return _registered(version)


# ----- a local tracking server ---------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_tracking_server(backend_uri: str, artifacts_dir: str, timeout_s: float = 120.0) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 over an existing SQLite store, for the length of the block;
    yields its http:// URI. Several processes writing at once (parallel sweep trials, rank-0
    workers) go through it: a bare SQLite file does not survive concurrent writers."""
    port = free_port()
    Path(artifacts_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(artifacts_dir).parent / f"mlflow-server-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                backend_uri,
                "--artifacts-destination",
                artifacts_dir,
                "--workers",
                "1",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the MLflow server for {backend_uri} did not start; its log "
                        f"{log_path}:\n{log_path.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        # uvicorn/gunicorn children live in the server's own session: end that group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
