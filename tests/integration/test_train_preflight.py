"""A bad config or data set fails in `ecar train` before Ray or any worker starts, with one line
that names the key, URI or file (exit code 2)."""

from __future__ import annotations

import pytest

from ecar.tracking import free_port
from jobs.train import main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test if the job gets as far as starting Ray or a trainer."""
    import ecar.runtime
    import ecar.train.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the job started Ray despite a bad config")

    monkeypatch.setattr(ecar.runtime, "init_ray", refuse)
    monkeypatch.setattr(ecar.train.trainer, "fit", refuse)


def _train(capsys, manifest, output, *overrides):
    """`ecar train` of the debug preset, which must refuse with one line and exit code 2."""
    code = main(["--preset", "ecar-debug", "--manifest", str(manifest), "--output", str(output), *overrides])
    error = capsys.readouterr().err
    assert code == 2, error
    assert error.startswith("ecar train: ") and error.count("\n") == 1, error  # one line, no traceback
    return error


def test_unknown_key(no_workers, capsys, s3_latents, tmp_path):
    error = _train(capsys, s3_latents, tmp_path, "train.learning_rate=1e-3")
    assert "unknown config key train.learning_rate" in error


def test_latent_shape_that_does_not_fit_the_model(no_workers, capsys, s3_latents, tmp_path):
    error = _train(capsys, s3_latents, tmp_path, "model.latent_channels=8")
    assert "model.latent_channels" in error and "[8, 8, 8]" in error and "[4, 8, 8]" in error
    assert s3_latents in error


def test_a_data_set_smaller_than_one_global_batch(no_workers, capsys, s3_latents, tmp_path):
    """Every stream (ecar.train.streams) needs a micro-batch: the set must hold a global batch."""
    error = _train(capsys, s3_latents, tmp_path, "train.global_batch_size=512", "train.micro_batch_size=8")
    assert "train.global_batch_size: 256 train rows" in error and "global batch of 512" in error


def test_missing_manifest(no_workers, capsys, s3_latents, tmp_path):
    missing = s3_latents.rsplit("/", 1)[0] + "/no-latents-here"
    error = _train(capsys, missing, tmp_path)
    assert "data.manifest_uri" in error and f"{missing}/manifest.json" in error


def test_unreachable_storage(no_workers, capsys, s3_latents):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens once free_port has closed its socket
    error = _train(capsys, s3_latents, "s3://ecar-test/out", f"storage.endpoint_url={endpoint}")
    assert "storage.root" in error and "cannot reach" in error and endpoint in error


@pytest.mark.parametrize(
    "defect, expected",
    [
        ("nan", "shard-00001.parquet: row 5 (id 'row-69') has a NaN or Inf in `latent`"),
        ("label", "shard-00001.parquet: row 3 has label 10, not in [0, 10)"),
        ("corrupt", "shard-00001.parquet: not a readable Parquet shard"),
    ],
)
def test_bad_latent_values_fail_before_any_worker(no_workers, capsys, tampered_latents, tmp_path, defect, expected):
    prefix = tampered_latents[defect]
    error = _train(capsys, prefix, tmp_path)
    assert "data.manifest_uri" in error and f"{prefix}/latents/train/{expected}" in error


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.num_workers=1", "train.cpus_per_worker=2"], "take 2 of the cluster's 2 CPUs and leave 0"),
        (["train.num_workers=2", "train.cpus_per_worker=1"], "take 2 of the cluster's 2 CPUs and leave 0"),
        (["train.num_workers=1", "train.use_gpu=true"], "fit 0 of the 1 worker(s) x 0.5 CPU + 1 GPU"),
    ],
)
def test_a_request_the_cluster_cannot_meet_is_refused_before_training(
    ray_cluster, monkeypatch, capsys, s3_latents, tmp_path, overrides, expected
):
    """As a new user tried it: one worker holding both CPUs of a 2-CPU cluster left the data
    reads waiting forever after "started MLflow run"."""
    import ecar.train.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the job started training despite an unsatisfiable request")

    monkeypatch.setattr(ecar.train.trainer, "fit", refuse)
    error = _train(capsys, s3_latents, tmp_path, *overrides)
    assert expected in error and "train.wait_for_resources=true" in error


def test_an_unreachable_tracking_server_is_named_without_its_credentials(no_workers, capsys, s3_latents, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    error = _train(capsys, s3_latents, tmp_path, f"tracking.tracking_uri=http://alice:s3cret@{address}")
    assert "tracking.tracking_uri" in error and address in error
    assert "s3cret" not in error and "alice" not in error
