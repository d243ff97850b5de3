"""Real Ray clusters started with `ray start` on 127.0.0.1 (token authentication on): a head node
for tests of job submission, and a head with worker nodes for node-loss tests (the loopback S3
server comes from tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

from ecar.tracking import free_port


class LocalCluster:
    """Ray nodes started with `ray start` on 127.0.0.1 under one private temp dir (token
    authentication on). Every process of the cluster names that dir, so `stop` ends exactly them:
    `ray stop` would also stop any other Ray on the machine."""

    def __init__(self, token_path, multi_node: bool = False) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="ecar-ray-", dir="/tmp")
        token_path.write_text(uuid.uuid4().hex)
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1: the suite's 0 (a one-node cluster) refuses a second node
        self.env = {
            **os.environ,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if multi_node else "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
        }
        # the client sends this cluster's token itself: Ray reads RAY_AUTH_MODE once per process,
        # so setting it here would be ignored after any earlier test of the session started Ray
        self.headers = {"Authorization": f"Bearer {token_path.read_text()}"}
        self.gcs_address = f"127.0.0.1:{free_port()}"  # what a driver passes as --address
        self.dashboard = f"http://127.0.0.1:{free_port()}"  # job submission

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers=self.headers)

    def ray_start(self, *args: str) -> None:
        started = subprocess.run(
            ["ray", "start", "--node-ip-address=127.0.0.1", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if started.returncode:
            raise RuntimeError(
                f"`ray start {' '.join(args)}` exited with {started.returncode}:\n"
                f"{(started.stdout + started.stderr)[-3000:]}"
            )

    def start_head(self, num_cpus: int) -> None:
        """The head (GCS and dashboard with its job API), answering before this returns."""
        self.ray_start(
            "--head",
            f"--port={self.gcs_address.rsplit(':', 1)[1]}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
            f"--num-cpus={num_cpus}",
            "--include-dashboard=true",
            # the agent's default port (52365) is taken by any other Ray on the machine
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
        )
        for _ in range(60):  # the dashboard's job API comes up a little after `ray start` returns
            try:
                self.client().list_jobs()
                return
            except Exception as error:  # noqa: BLE001 - not up yet
                last_error = error
                time.sleep(1)
        raise RuntimeError(f"the head's job API at {self.dashboard} did not answer within 60 s: {last_error!r}")

    def add_worker(self, name: str, num_cpus: int = 2) -> None:
        """A worker node named `name` joining the head."""
        self.ray_start(
            f"--address={self.gcs_address}",
            f"--num-cpus={num_cpus}",
            f"--node-name={name}",
            f"--dashboard-agent-listen-port={free_port()}",
        )

    def stop(self) -> None:
        subprocess.run(["pkill", "-TERM", "-f", self.temp_dir], capture_output=True)
        time.sleep(3)
        subprocess.run(["pkill", "-KILL", "-f", self.temp_dir], capture_output=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head_node(tmp_path_factory, s3_server):
    """A fresh 2-CPU head node on loopback (`client()`, `gcs_address`, `env`), torn down
    when the module's tests are done. Fails the tests that use it, naming the cause, when the
    head does not start or its job API does not answer; they never run against a half-started
    one. It waits for `s3_server` so that the head's processes see the S3 endpoint."""
    cluster = LocalCluster(tmp_path_factory.mktemp("ray") / "auth_token")
    try:
        cluster.start_head(num_cpus=2)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def two_nodes(tmp_path):
    """A head with no CPUs (the GCS, the driver's side, the train controller: 0-CPU actors) and a
    2-CPU worker node named "worker-a" that every CPU task and training worker lands on; the
    test may add more workers. Stops exactly this cluster's processes at the end."""
    cluster = LocalCluster(tmp_path / "auth_token", multi_node=True)
    try:
        cluster.start_head(num_cpus=0)
        cluster.add_worker("worker-a")
        yield cluster
    finally:
        cluster.stop()
