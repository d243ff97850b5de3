"""MLflow for a training run: the driver opens (or re-opens) one run per training run and closes
it; inside the worker group only rank 0 writes metrics and sample grids to it.

Everything goes through an explicit `MlflowClient(tracking_uri)` and run id, never MLflow's
global "active run", so driver and worker cannot disagree about where things land.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch

from ecar.config import Config

RUN_NAME_TAG = "ecar.run_name"


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def git_commit() -> str:
    """The source tree's commit (with "-dirty" when it has local changes), or "unknown"."""
    root = Path(__file__).resolve().parents[2]
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


def _experiment_id(client, config: Config, tracking_uri: str) -> str:
    name = config.tracking.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # An embedded store keeps artifacts next to the database (absolute, so that workers
        # with another working directory write to the same place).
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def open_run(
    config: Config,
    tracking_uri: str,
    name: str,
    manifest_uri: str,
    run_uri: str,
    parent_run_id: str = "",
    tags: dict[str, str] | None = None,
) -> tuple[str, bool]:
    """(run id, resumed): the MLflow run of training run `name`, created with params (the
    flattened config), tags and the config artifact, or found again when the run resumes.
    With `parent_run_id` it is created as that run's child (a sweep's trial)."""
    from mlflow.entities import Param

    client = _client(tracking_uri)
    experiment_id = _experiment_id(client, config, tracking_uri)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        for key, value in (tags or {}).items():  # e.g. what a resume changed (params stay as first logged)
            client.set_tag(run_id, key, value)
        return run_id, True
    tags = {
        RUN_NAME_TAG: name,
        "preset": config.preset,
        "git_commit": git_commit(),
        "manifest_uri": manifest_uri,
        "run_uri": run_uri,
        **(tags or {}),
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    params = [
        Param(key, json.dumps(value) if isinstance(value, (list, dict)) else str(value))
        for key, value in config.flat().items()
    ]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[start : start + 100])
    client.log_text(run_id, config.to_json(), "config.json")
    client.set_tag(run_id, "mlflow.note.content", f"E-CAR training run {name} ({config.preset})")
    return run_id, False


def finish_run(tracking_uri: str, run_id: str, export_uri: str | None, status: str = "FINISHED") -> None:
    """Loss-curve plot from the logged history, the exported checkpoint's URI, the run status."""
    client = _client(tracking_uri)
    history = {key: client.get_metric_history(run_id, key) for key in _loss_keys(client, run_id)}
    if history.get("loss"):
        client.log_figure(run_id, loss_curve(history), "loss_curve.png")
    if export_uri:
        client.set_tag(run_id, "export_uri", export_uri)
        client.log_text(run_id, export_uri + "\n", "export_uri.txt")
    client.set_terminated(run_id, status=status)


def _loss_keys(client, run_id: str) -> list[str]:
    metrics = client.get_run(run_id).data.metrics
    return sorted(key for key in metrics if key == "loss" or key.startswith("loss_stage"))


def loss_curve(history: dict[str, list]):
    """A figure of total and per-stage loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for key, points in sorted(history.items()):
        points = sorted(points, key=lambda m: m.step)
        axes.plot(
            [m.step for m in points], [m.value for m in points], label=key, linewidth=2.0 if key == "loss" else 1.0
        )
    axes.set_xlabel("step")
    axes.set_ylabel("flow-matching loss")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    return figure


def sample_grid(images_BCHW: torch.Tensor, labels_B: torch.Tensor, title: str, class_names: list[str] | None = None):
    """One column per sample, labelled by class. `images_BCHW` are decoded images in [-1, 1]
    with 1 or 3 channels, or latents whose first channel(s) are shown (normalised per image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = images_BCHW.shape[0]
    columns = min(count, 10)
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.5 * rows + 0.4), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index >= count:
            continue
        image = images_BCHW[index].float()
        image = image[:3] if image.shape[0] >= 3 else image[:1]
        low, high = image.amin(), image.amax()
        image = ((image - low) / (high - low + 1e-8)).permute(1, 2, 0).numpy()
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
        label = int(labels_B[index])
        ax.set_title(class_names[label] if class_names and label < len(class_names) else f"class {label}", fontsize=7)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    return figure


PHASE_TAG = "ecar.phase"


class RankZeroTracker:
    """Metrics and images of one MLflow run, written by rank 0; a no-op on other ranks."""

    def __init__(self, tracking_uri: str, run_id: str, rank: int) -> None:
        self.enabled = rank == 0 and bool(run_id)
        self.run_id = run_id
        self.client = _client(tracking_uri) if self.enabled else None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_figure(self, figure, artifact_file: str) -> None:
        if not self.enabled:
            return
        import matplotlib.pyplot as plt

        self.client.log_figure(self.run_id, figure, artifact_file)
        plt.close(figure)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)

    def set_phase(self, phase: str) -> None:
        """What the workers are doing before the first logged step (the `ecar.phase` tag, which
        the driver's progress display reads), so that a slow start is never silent."""
        if self.enabled:
            self.client.set_tag(self.run_id, PHASE_TAG, phase)
