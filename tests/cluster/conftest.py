"""A real `ray start --head` cluster on 127.0.0.1 (token authentication on), for tests of job
submission (the loopback S3 server comes from tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass

import pytest

from ecar.tracking import free_port


@dataclass(frozen=True)
class HeadNode:
    address: str  # the dashboard's (job submission)
    headers: dict[str, str]
    gcs_address: str  # what a driver passes as --address
    env: dict[str, str]  # a driver's environment for this cluster (its auth token)

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers=self.headers)


@pytest.fixture(scope="module")
def head_node(tmp_path_factory, s3_server):
    """A fresh head node on loopback (its dashboard address and auth headers), torn down when
    the module's tests are done. Fails the tests that use it, naming the cause, when the head
    does not start or its job API does not answer; they never run against a half-started one.
    It waits for `s3_server` so that the head's processes see the S3 endpoint."""
    dashboard = free_port()
    # a short private temp dir: every process of this cluster names it, so teardown can stop
    # exactly them (`ray stop` would also stop any other Ray on the machine)
    temp_dir = tempfile.mkdtemp(prefix="ecar-ray-", dir="/tmp")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    token = tmp_path_factory.mktemp("ray") / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    address = f"http://127.0.0.1:{dashboard}"
    gcs_port = free_port()
    # the client sends this cluster's token itself: Ray reads RAY_AUTH_MODE once per process,
    # so setting it here would be ignored after any earlier test of the session started Ray
    headers = {"Authorization": f"Bearer {token.read_text()}"}
    try:
        started = subprocess.run(
            [
                "ray",
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                "--num-cpus=2",
                "--include-dashboard=true",
                # the agent's default port (52365) is taken by any other Ray on the machine
                f"--dashboard-agent-listen-port={free_port()}",
                "--disable-usage-stats",
                f"--temp-dir={temp_dir}",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if started.returncode:
            raise RuntimeError(
                f"`ray start --head` exited with {started.returncode}:\n{(started.stdout + started.stderr)[-3000:]}"
            )
        from ray.job_submission import JobSubmissionClient

        for _ in range(60):  # the dashboard's job API comes up a little after `ray start` returns
            try:
                JobSubmissionClient(address, headers=headers).list_jobs()
                break
            except Exception as error:  # noqa: BLE001 - not up yet
                last_error = error
                time.sleep(1)
        else:
            raise RuntimeError(f"the head's job API at {address} did not answer within 60 s: {last_error!r}")
        yield HeadNode(address, headers, f"127.0.0.1:{gcs_port}", env)
    finally:
        subprocess.run(["pkill", "-TERM", "-f", temp_dir], capture_output=True)
        time.sleep(3)
        subprocess.run(["pkill", "-KILL", "-f", temp_dir], capture_output=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
