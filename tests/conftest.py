"""Shared fixtures: one local Ray cluster per session, a loopback S3 server (moto), storage roots.

Test credentials go into the environment when this file is imported; the S3 endpoint when the
server has bound its port, which `ray_cluster` waits for (workers inherit the environment only
at `ray.init`).
"""

from __future__ import annotations

import os
import uuid

import pytest

# Keeps the one-node cluster on 127.0.0.1; read when ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

TEST_BUCKET = "ecar-test"

os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
)
for leaked in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
    os.environ.pop(leaked, None)


@pytest.fixture(scope="session")
def s3_server():
    """moto's threaded S3 server on loopback; yields its endpoint URL, with TEST_BUCKET created.

    The server binds port 0, so the port is the one it holds: nothing can take it between
    choosing and binding. The endpoint is in the environment from here to the session's end."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", endpoint)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=TEST_BUCKET)
        yield endpoint
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
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()
