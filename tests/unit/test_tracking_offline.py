"""MLflow bookkeeping through ecar.tracking against an embedded SQLite store (no server, no Ray):
runs per job, the config sections each job logs, batched metrics, images by step, redaction."""

import json

import pytest
import torch

from ecar.figures import reconstruction_grid, sample_grid
from ecar.presets import get_config
from ecar.tracking import (
    JOB_TAG,
    RankZeroTracker,
    client,
    config_params,
    finish_run,
    logged_images,
    open_run,
    redact,
)

pytestmark = pytest.mark.unit


def test_one_mlflow_run_per_training_run_reopened_on_resume(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = get_config("ecar-debug", ["tracking.experiment_name=unit"])
    run_id, resumed = open_run(config, uri, "a", "train", tags={"manifest_uri": "s3://bucket/latents"})
    assert not resumed
    again, resumed = open_run(config, uri, "a", "train")
    assert resumed and again == run_id
    assert open_run(config, uri, "b", "train")[0] != run_id
    assert open_run(config, uri, "a", "evaluate")[0] != run_id  # another job's run of the same name

    RankZeroTracker(uri, run_id, rank=1).log_metrics(1, {"loss": 9.0})  # other ranks stay quiet
    tracker = RankZeroTracker(uri, run_id, rank=0)
    for step, loss in enumerate([1.0, 0.5, 0.25], start=1):
        tracker.log_metrics(step, {"loss": loss, "loss_stage0": loss / 2}, flush=step == 3)
        tracker.log_image(sample_grid(torch.randn(3, 4, 8, 8), torch.arange(3), f"step {step}"), "samples", step)
    finish_run(uri, run_id, export_uri="s3://bucket/runs/a/export")

    mlflow_client = client(uri)
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[JOB_TAG] == "train" and run.data.tags["preset"] == "ecar-debug"
    assert run.data.tags["manifest_uri"] == "s3://bucket/latents"
    assert run.data.tags["export_uri"] == "s3://bucket/runs/a/export"
    assert run.data.params["train.zero_stage"] == str(config.train.zero_stage)
    assert run.data.params["stages.grids"] == "[2, 4, 8]"
    # buffered steps arrive, in order, with the flushing call
    assert [(m.step, m.value) for m in mlflow_client.get_metric_history(run_id, "loss")] == [
        (1, 1.0),
        (2, 0.5),
        (3, 0.25),
    ]
    assert list(logged_images(uri, run_id, "samples")) == [1, 2, 3]
    assert {a.path for a in mlflow_client.list_artifacts(run_id)} >= {"config.json", "loss_curve.png", "export_uri.txt"}


def test_each_job_logs_the_config_sections_it_reads(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = get_config("ecar-debug", ["tracking.experiment_name=unit"])
    train_id, _ = open_run(config, uri, "t", "train")
    tokenizer_id, _ = open_run(config, uri, "k", "train-tokenizer")
    mlflow_client = client(uri)
    train = mlflow_client.get_run(train_id).data.params
    tokenizer = mlflow_client.get_run(tokenizer_id).data.params
    assert set(train) == {k for k in config.flat() if not k.startswith("tokenizer.")}
    assert {k.split(".")[0] for k in tokenizer} == {"preset", "tokenizer", "data", "model", "storage"}
    assert {k for k in tokenizer if k.startswith("model.")} == {"model.latent_channels", "model.latent_size"}
    logged = json.loads(open(mlflow_client.download_artifacts(tokenizer_id, "config.json", str(tmp_path))).read())
    assert set(logged) == {"preset", "tokenizer", "data", "model", "storage"}
    assert logged["model"] == {"latent_channels": 4, "latent_size": 8}


def test_credentials_in_uris_are_redacted():
    assert redact("s3://AKIA123:wJalr/Secret@minio.local:9000/bucket") == "s3://***@minio.local:9000/bucket"
    assert (
        redact("https://token@mlflow.example.com/ and http://u:p@h")
        == "https://***@mlflow.example.com/ and http://***@h"
    )
    assert redact("s3://bucket/path/file@2x.png") == "s3://bucket/path/file@2x.png"  # an @ in a path stays
    config = get_config("ecar-debug", ["storage.endpoint_url=http://key:secret@127.0.0.1:9000"])
    assert config_params(config, ("storage",))["storage.endpoint_url"] == "http://***@127.0.0.1:9000"


def test_sample_grid_labels_every_sample():
    figure = sample_grid(torch.randn(12, 4, 8, 8), torch.arange(12) % 10, "title", [f"c{k}" for k in range(10)])
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles[:3] == ["c0", "c1", "c2"] and len(titles) == 12


def test_reconstruction_grid_puts_originals_above_reconstructions():
    originals, reconstructions = torch.full((3, 1, 8, 8), -1.0), torch.full((3, 1, 8, 8), 1.0)
    figure = reconstruction_grid(originals, reconstructions, "title")
    rows = {}
    for ax in figure.axes:
        rows.setdefault(round(ax.get_position().y0, 3), []).append(float(ax.images[0].get_array().mean()))
    top, bottom = (rows[y] for y in sorted(rows, reverse=True))
    assert top == [0.0] * 3 and bottom == [1.0] * 3  # black originals on top, white reconstructions below


def test_an_export_registered_in_the_embedded_store_resolves_by_version_and_alias(tmp_path):
    from ecar.export import save_exported
    from ecar.models import build_model
    from ecar.tracking import register_export, resolve_export, set_alias

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = get_config("ecar-debug", ["tracking.experiment_name=unit"])
    run_id, _ = open_run(config, uri, "a", "train")
    export = str(tmp_path / "export")
    torch.manual_seed(0)
    save_exported(build_model(config).state_dict(), config, export, latent_scale=0.5, step=3)
    registered = register_export(uri, run_id, export, config)
    assert registered.model_uri == "models:/ecar-debug/1" and registered.run_id == run_id
    assert set_alias(uri, registered.model_uri, "champion").model_uri == registered.model_uri
    for name in ("models:/ecar-debug/1", "models:/ecar-debug@champion"):
        assert resolve_export(name, uri) == registered
    with pytest.raises(ValueError, match="has no version 2 \\(latest: 1\\)"):
        resolve_export("models:/ecar-debug/2", uri)
    with pytest.raises(ValueError, match="alias 'v1'"):
        set_alias(uri, registered.model_uri, "v1")  # MLflow reserves v<N> for versions
    # an export replaced after registration no longer passes for the registered model
    save_exported(build_model(config).state_dict(), config, export, latent_scale=0.5, step=4)
    with pytest.raises(ValueError, match="replaced after registration"):
        resolve_export("models:/ecar-debug@champion", uri)
