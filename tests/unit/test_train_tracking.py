"""MLflow bookkeeping of a training run against an embedded SQLite store (no server, no Ray)."""

import pytest
import torch

from ecar.presets import get_config
from ecar.train.tracking import RankZeroTracker, finish_run, open_run, sample_grid

pytestmark = pytest.mark.unit


def test_one_mlflow_run_per_training_run_reopened_on_resume(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = get_config("ecar-debug", ["tracking.experiment_name=unit"])
    run_id, resumed = open_run(config, uri, "a", "s3://bucket/latents", str(tmp_path / "runs" / "a"))
    assert not resumed
    again, resumed = open_run(config, uri, "a", "s3://bucket/latents", str(tmp_path / "runs" / "a"))
    assert resumed and again == run_id
    assert open_run(config, uri, "b", "", "")[0] != run_id

    RankZeroTracker(uri, run_id, rank=1).log_metrics(1, {"loss": 9.0})  # other ranks stay quiet
    tracker = RankZeroTracker(uri, run_id, rank=0)
    for step, loss in enumerate([1.0, 0.5, 0.25], start=1):
        tracker.log_metrics(step, {"loss": loss, "loss_stage0": loss / 2})
    finish_run(uri, run_id, "s3://bucket/runs/a/export")

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == str(config.train.zero_stage)
    assert run.data.params["stages.grids"] == "[2, 4, 8]"
    assert run.data.tags["preset"] == "ecar-debug" and run.data.tags["manifest_uri"] == "s3://bucket/latents"
    assert run.data.tags["export_uri"] == "s3://bucket/runs/a/export"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0, 0.5, 0.25]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.json", "loss_curve.png", "export_uri.txt"}
    # every config key is a param, so runs compare in the UI
    assert set(config.flat()) <= set(run.data.params)


def test_sample_grid_labels_every_sample():
    figure = sample_grid(torch.randn(12, 4, 8, 8), torch.arange(12) % 10, "title", [f"c{k}" for k in range(10)])
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles[:3] == ["c0", "c1", "c2"] and len(titles) == 12
