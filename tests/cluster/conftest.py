"""A real `ray start --head` cluster on 127.0.0.1 (token authentication on), for tests of job
submission (the loopback S3 server comes from tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

from ecar.tracking import free_port


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """The dashboard address of a fresh head node on loopback, torn down (and the environment
    restored) when the module's tests are done."""
    dashboard = free_port()
    # a short private temp dir: every process of this cluster names it, so teardown can stop
    # exactly them (`ray stop` would also stop any other Ray on the machine)
    temp_dir = tempfile.mkdtemp(prefix="ecar-ray-", dir="/tmp")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    token = tmp_path_factory.mktemp("ray") / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    subprocess.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                    "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                   env=env, check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dashboard}"
    # the job client sends this cluster's token; restored afterwards, so that later local
    # clusters of the same test session start as they would without this one
    saved = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    try:
        from ray.job_submission import JobSubmissionClient

        for _ in range(60):  # the dashboard's job API comes up a little after `ray start` returns
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(1)
        yield address
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        subprocess.run(["pkill", "-TERM", "-f", temp_dir], capture_output=True)
        time.sleep(3)
        subprocess.run(["pkill", "-KILL", "-f", temp_dir], capture_output=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
