"""Fixtures for the training integration tests: an MLflow tracking server on loopback and a small
synthetic latent data set (in the encode job's format) on the loopback S3 server.

`ray_cluster` and `s3_server` come from tests/conftest.py.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and local proxied artifacts; yields its
    URL. Several processes (driver, rank-0 worker, test client) write to it, which a bare
    SQLite file would not survive."""
    from ecar.tracking import local_tracking_server

    root = tmp_path_factory.mktemp("mlflow")
    with local_tracking_server(f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"), timeout_s=90) as url:
        yield url


@pytest.fixture(scope="session")
def s3_latents(s3_server) -> str:
    """The synthetic latent set on the loopback S3 server; returns its s3:// prefix."""
    from ecar.train.synthetic import write_synthetic_latents

    return write_synthetic_latents(f"{_bucket_uri(s3_server)}/latents")


def _bucket_uri(s3_server: str) -> str:
    """s3://BUCKET: the bucket the `s3_server` fixture created at its endpoint."""
    import boto3

    buckets = boto3.client("s3", endpoint_url=s3_server).list_buckets()["Buckets"]
    return f"s3://{sorted(b['Name'] for b in buckets)[0]}"
