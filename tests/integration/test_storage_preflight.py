"""Every job that reads or writes object storage checks it first: an unreachable endpoint or
missing credentials give one line naming the flag and the endpoint (exit code 2) in seconds,
before Ray starts, instead of botocore's retries and a 70-line traceback."""

from __future__ import annotations

import pytest

from ecar.tracking import free_port
from jobs import encode, evaluate, prepare, sample, train_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def no_ray(monkeypatch):
    import ecar.runtime

    def refuse(*args, **kwargs):
        raise AssertionError("the job started Ray before checking its storage")

    monkeypatch.setattr(ecar.runtime, "init_ray", refuse)
    for module in (encode, train_tokenizer, sample):
        monkeypatch.setattr(module, "init_ray", refuse)


def _closed_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens once free_port has closed its socket


# job, its arguments, the flag named in the error (its first storage location)
JOBS = {
    "prepare": (prepare.main, ["--output", "s3://ecar-test/images"], "--output"),
    "encode": (encode.main, ["--images", "s3://ecar-test/images", "--output", "s3://ecar-test/latents"], "--images"),
    "train-tokenizer": (
        train_tokenizer.main,
        ["--images", "s3://ecar-test/images", "--output", "s3://ecar-test/tok"],
        "--images",
    ),
    "sample": (
        sample.main,
        ["--checkpoint", "s3://ecar-test/runs/a/export", "--output", "s3://ecar-test/s", "--num-images", "8"],
        "--output",  # checked first: a models:/ checkpoint is resolved through the tracking server
    ),
    "evaluate": (evaluate.main, ["--samples", "s3://ecar-test/s", "--no-mlflow"], "--samples"),
}


@pytest.mark.parametrize("job", list(JOBS))
def test_an_unreachable_endpoint_is_one_line_before_ray(job, no_ray, monkeypatch, capsys):
    main, argv, flag = JOBS[job]
    endpoint = _closed_endpoint()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # what the jobs without a config read
    assert main([*argv, *([] if job in ("sample", "evaluate") else [f"storage.endpoint_url={endpoint}"])]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert f"{flag}: cannot reach storage for s3://ecar-test/" in error and endpoint in error


@pytest.mark.parametrize("job", ["prepare", "sample"])
def test_missing_credentials_are_one_line_before_ray(job, no_ray, s3_server, monkeypatch, capsys, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    main, argv, flag = JOBS[job]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{flag}: " in error and "credentials" in error, error
