"""MLflow as the place to compare, pick and ship a model, against a real `mlflow server` on
127.0.0.1: an export registered and read back by a separate client, an alias set from the CLI,
`ecar sample` by alias giving the export path's images, `ecar evaluate` linking its metrics and
sample grid to the model, credentials kept out of tracking, and the `mlflow` CLI listing runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from ecar.export import read_config, read_metadata, save_exported
from ecar.sampler import read_samples
from ecar.tracking import finish_run, logged_images, open_run, register_export

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

EXPERIMENT = "ecar-tracking-tests"
MODEL = "ecar-tracking-test"  # this module's registered model (tracking.registered_model)


def _client(mlflow_server):
    """A separate client: reads only what the jobs wrote to the server."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server)


@pytest.fixture(scope="module")
def trained(mlflow_server, decodable_checkpoint):
    """(training run id, model URI): the export registered from a training run, as `fit` does."""
    config = read_config(decodable_checkpoint).override(
        {"tracking.experiment_name": EXPERIMENT, "tracking.registered_model": MODEL}
    )
    run_id, _ = open_run(config, mlflow_server, f"trained-{uuid.uuid4().hex[:6]}", "train")
    registered = register_export(mlflow_server, run_id, decodable_checkpoint, config)
    finish_run(mlflow_server, run_id, export_uri=decodable_checkpoint)
    return run_id, registered.model_uri


@pytest.fixture(scope="module")
def champion(trained, mlflow_server):
    """The alias `champion` set from the CLI on the registered version."""
    from ecar.cli import main

    assert main(["alias", trained[1], "champion", "--tracking-uri", mlflow_server]) == 0
    return f"models:/{MODEL}@champion"


@pytest.fixture(scope="module")
def alias_samples(ray_cluster, champion, mlflow_server, tmp_path_factory):
    from jobs.sample import main

    out = str(tmp_path_factory.mktemp("samples") / "by-alias")
    arguments = ["--num-images", "8", "--shard-size", "4", "--cpus-per-actor", "0.5"]
    assert main(["--checkpoint", champion, "--output", out, "--tracking-uri", mlflow_server, *arguments]) == 0
    return out


def test_an_export_is_a_model_version_linked_to_its_training_run(
    trained, champion, mlflow_server, decodable_checkpoint
):
    run_id, model_uri = trained
    client = _client(mlflow_server)
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert f"models:/{MODEL}/{version.version}" == model_uri
    assert client.get_registered_model(MODEL).aliases == {"champion": version.version}
    assert version.run_id == run_id
    metadata = read_metadata(decodable_checkpoint)
    assert version.tags["ecar.export_uri"] == decodable_checkpoint
    assert version.tags["ecar.content_sha256"] == metadata["content_sha256"]
    assert version.tags["ecar.weights_sha256"] == metadata["weights_sha256"]
    # the version is MLflow 3's logged model of the run: external, pointing at the export
    model_id = version.tags["ecar.model_id"]
    assert version.source == f"models:/{model_id}"
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == run_id and logged.tags["mlflow.model.isExternal"] == "true"
    assert logged.tags["ecar.export_uri"] == decodable_checkpoint
    assert logged.params["model.width"] == str(read_config(decodable_checkpoint).model.width)
    assert {a.path for a in client.list_logged_model_artifacts(model_id)} == {"export.json", "config.json"}
    run = client.get_run(run_id)
    assert run.data.tags["ecar.model_uri"] == model_uri and run.data.tags["ecar.job"] == "train"
    assert [output.model_id for output in run.outputs.model_outputs] == [model_id]
    # registering the same export of the same run again finds its version
    config = read_config(decodable_checkpoint).override({"tracking.registered_model": MODEL})
    assert register_export(mlflow_server, run_id, decodable_checkpoint, config).model_uri == model_uri
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 1


def test_sampling_by_alias_gives_the_images_of_the_export_path(
    alias_samples, decodable_checkpoint, trained, mlflow_server, tmp_path, capsys
):
    from ecar.sampler import Shard, ShardSampler, shard_rows, tokenizer_decoder
    from jobs.sample import main

    # what a sampling actor makes of rows 0..7 when given the export's path
    sampler = ShardSampler(decodable_checkpoint, "", [], None, 8, tokenizer_decoder)
    by_path = sampler.generate(shard_rows(Shard(0, 8), None, 10, sampler.config.sampling.seed))
    by_alias = read_samples(alias_samples, "images")
    assert by_alias["images"].shape == (8, 16, 16, 1)
    assert np.array_equal(by_alias["images"], by_path["images"]) and np.array_equal(by_alias["label"], by_path["label"])
    manifest = json.loads(open(os.path.join(alias_samples, "manifest.json")).read())
    assert manifest["checkpoint_uri"] == decodable_checkpoint and manifest["model_uri"] == trained[1]

    # an unknown alias is a user error, found before Ray starts or the output is claimed
    missing = str(tmp_path / "never")
    arguments = ["--output", missing, "--num-images", "8", "--tracking-uri", mlflow_server]
    code = main(["--checkpoint", f"models:/{MODEL}@nope", *arguments])
    error = capsys.readouterr().err
    assert code == 2 and f"models:/{MODEL}@nope: model '{MODEL}' has no alias 'nope'" in error
    assert "@champion" in error and not os.path.exists(missing)


def test_evaluation_is_logged_with_its_grid_and_linked_to_the_model(alias_samples, trained, mlflow_server):
    from jobs.evaluate import main

    run_id, model_uri = trained
    assert main(["--samples", alias_samples, "--tracking-uri", mlflow_server, "--latency-batches", ""]) == 0
    client = _client(mlflow_server)
    run = client.get_run(run_id)
    assert "fid" in run.data.metrics and not any(key.startswith("eval/") for key in run.data.metrics)
    version = client.get_model_version(MODEL, model_uri.rsplit("/", 1)[1])
    model_metrics = {m.key: m.value for m in client.get_logged_model(version.tags["ecar.model_id"]).metrics}
    assert model_metrics["fid"] == run.data.metrics["fid"] > 0
    assert model_metrics["fake_images"] == 8
    assert list(logged_images(mlflow_server, run_id, "evaluation")) == [0]  # at the export's training step


def test_credentials_in_uris_stay_out_of_params_tags_and_artifacts(mlflow_server, tmp_path):
    from mlflow.artifacts import download_artifacts

    from ecar.models import build_model
    from ecar.presets import get_config

    secret = "wJalrXUtnFEMI/K7MDENG"
    config = get_config(
        "ecar-debug",
        {
            "storage.endpoint_url": f"http://AKIAKEY:{secret}@127.0.0.1:9000",
            "data.manifest_uri": f"s3://AKIAKEY:{secret}@bucket/latents",
            "tracking.experiment_name": EXPERIMENT,
            "tracking.registered_model": "ecar-redaction-test",
        },
    )
    run_id, _ = open_run(
        config, mlflow_server, "with-credentials", "train", tags={"manifest_uri": config.data.manifest_uri}
    )
    export = str(tmp_path / "export")
    save_exported(build_model(config).state_dict(), config, export, 1.0, manifest_uri=config.data.manifest_uri)
    registered = register_export(mlflow_server, run_id, export, config)

    client = _client(mlflow_server)
    run = client.get_run(run_id)
    version = client.get_model_version("ecar-redaction-test", registered.model_uri.rsplit("/", 1)[1])
    logged = client.get_logged_model(registered.model_id)
    texts = [
        *run.data.params.values(),
        *run.data.tags.values(),
        *version.tags.values(),
        version.description,
        *logged.tags.values(),
        *logged.params.values(),
        open(client.download_artifacts(run_id, "config.json", str(tmp_path))).read(),
    ]
    for name in ("export.json", "config.json"):
        local = download_artifacts(
            f"{logged.artifact_location}/{name}", dst_path=str(tmp_path / "model"), tracking_uri=mlflow_server
        )
        texts.append(open(local).read())
    assert not [text for text in texts if secret in text or "AKIAKEY" in text]
    assert run.data.params["storage.endpoint_url"] == "http://***@127.0.0.1:9000"
    assert run.data.tags["manifest_uri"] == "s3://***@bucket/latents"
    assert version.tags["ecar.latent_manifest"] == "s3://***@bucket/latents"


def test_the_mlflow_cli_lists_the_runs_of_an_experiment(trained, mlflow_server):
    experiment = _client(mlflow_server).get_experiment_by_name(EXPERIMENT).experiment_id
    listed = subprocess.run(
        [sys.executable, "-m", "mlflow", "runs", "list", "--experiment-id", experiment],
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert trained[0] in listed.stdout


@pytest.mark.timeout(900)
def test_tokenizer_training_logs_its_loss_per_step_and_a_reconstruction_grid(ray_cluster, mlflow_server, tmp_path):
    from ecar.data.prepare import prepare_images
    from ecar.presets import get_config
    from ecar.train.tokenizer import train_tokenizer

    config = get_config(
        "ecar-debug",
        {
            "tokenizer.steps": 12,
            "tokenizer.batch_size": 8,
            "tokenizer.eval_images": 8,
            "tokenizer.fid_images": 0,
            "tokenizer.cpus_per_worker": 0.5,
            "tracking.experiment_name": EXPERIMENT,
        },
    )
    images = str(tmp_path / "images")
    prepare_images(config, images, limit_per_split=16)
    train_tokenizer(config, images, str(tmp_path / "tokenizer"), eval_split="test", tracking_uri=mlflow_server)

    client = _client(mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (run,) = client.search_runs([experiment], "tags.`ecar.job` = 'train-tokenizer'")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 13))
    assert run.data.metrics["psnr"] > 0 and "tokenizer.steps" in run.data.params and "train.lr" not in run.data.params
    assert list(logged_images(mlflow_server, run.info.run_id, "reconstructions")) == [12]
