"""Fixtures for the training integration tests: an MLflow tracking server on loopback and a small
synthetic latent data set (in the encode job's format) on the loopback S3 server.

`ray_cluster` and `s3_server` come from tests/conftest.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and local proxied artifacts; yields its
    URL. Several processes (driver, rank-0 worker, test client) write to it, which a bare
    SQLite file would not survive."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(root / "server.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    # the server runs in its own session (uvicorn/gunicorn children): end that group, by its id
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    log.close()


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
