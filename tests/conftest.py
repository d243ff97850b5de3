"""Shared fixtures: one local Ray cluster per session, a loopback S3 server (moto), storage roots.

The S3 endpoint and test credentials go into the environment when this file is imported, so
that they are in place before any fixture starts Ray (workers inherit the environment only at
`ray.init`). The server itself starts on first use of `s3_server`.
"""

from __future__ import annotations

import os
import uuid

import pytest

from ecar.tracking import free_port

# Keeps the one-node cluster on 127.0.0.1; read when ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

TEST_BUCKET = "ecar-test"


S3_PORT = free_port()
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
os.environ.update({
    "AWS_ENDPOINT_URL": S3_ENDPOINT,
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
})
for leaked in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_SECURITY_TOKEN"):
    os.environ.pop(leaked, None)


@pytest.fixture(scope="session")
def s3_server():
    """moto's threaded S3 server on loopback; yields its endpoint URL, with TEST_BUCKET created."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    boto3.client("s3", endpoint_url=S3_ENDPOINT).create_bucket(Bucket=TEST_BUCKET)
    yield S3_ENDPOINT
    server.stop()


@pytest.fixture
def s3_prefix(s3_server) -> str:
    """A fresh s3://ecar-test/<unique> prefix."""
    return f"s3://{TEST_BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def tmp_storage(tmp_path) -> str:
    """A fresh local storage root (a path string, as a user would give one)."""
    root = tmp_path / "storage"
    root.mkdir()
    return str(root)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the whole session (each ray.init costs seconds). It depends on
    the S3 server only so that the endpoint is serving before any worker tries it."""
    import ray

    if not ray.is_initialized():
        # the dashboard (on loopback) lets Ray Train clean up after a controller Tune stopped
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=False)
    yield ray
    ray.shutdown()
