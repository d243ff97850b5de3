"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`): the
node that runs the training workers is killed mid-run (SIGKILL of its raylet and every process
under it, as when a machine is lost), a replacement node joins, and the run resumes from the
latest checkpoint with the step count continuing, through `ecar train` as a user runs it.

Slow tier: two clusters' worth of processes and a DeepSpeed restart take minutes on 2 cores.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import psutil
import pytest

from ecar import storage
from ecar.tracking import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]


def _ray_start(env: dict[str, str], *args: str) -> None:
    started = subprocess.run(["ray", "start", *args], env=env, capture_output=True, text=True, timeout=180)
    if started.returncode:
        raise RuntimeError(f"`ray start {' '.join(args)}` failed:\n{(started.stdout + started.stderr)[-3000:]}")


def _node_processes(node_name: str) -> list[psutil.Process]:
    """The raylet started for `node_name` and every process under it (its workers)."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "raylet" in cmdline and (f"node_name={node_name}" in cmdline or f"node-name={node_name}" in cmdline):
            return [process, *process.children(recursive=True)]
    return []


def _worker_node_args(address: str, name: str) -> list[str]:
    return [
        f"--address={address}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        f"--node-name={name}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]


@pytest.fixture
def two_nodes(tmp_path):
    """A head with no CPUs (the GCS, the driver's side, the train controller: 0-CPU actors) and a
    2-CPU worker node named "worker-a" that every CPU task and training worker lands on.
    Yields (GCS address, env, temp dir); stops exactly this cluster's processes at the end."""
    temp_dir = tempfile.mkdtemp(prefix="ecar-2n-", dir="/tmp")
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1: the suite's 0 (a one-node cluster) refuses a second node
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "token"}
    token = tmp_path / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    address = f"127.0.0.1:{free_port()}"
    try:
        _ray_start(
            env,
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={address.rsplit(':', 1)[1]}",
            "--num-cpus=0",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",  # its default is taken by any other Ray here
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        )
        _ray_start(env, *_worker_node_args(address, "worker-a"))
        yield address, env, temp_dir
    finally:
        subprocess.run(["pkill", "-TERM", "-f", temp_dir], capture_output=True)
        time.sleep(3)
        subprocess.run(["pkill", "-KILL", "-f", temp_dir], capture_output=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_lost_worker_node_is_replaced_and_the_run_resumes_from_its_checkpoint(two_nodes, tmp_path):
    address, env, _ = two_nodes
    from ecar.train.synthetic import write_synthetic_latents

    latents = write_synthetic_latents(str(tmp_path / "latents"))
    output = tmp_path / "out"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps = 30
    command = [
        sys.executable, "-m", "jobs.train", "--preset", "ecar-debug", "--manifest", latents,
        "--output", str(output), "--name", "lost-node", "--address", address,
        "train.num_workers=2", "train.cpus_per_worker=0.5", "train.global_batch_size=16",
        "train.micro_batch_size=8", f"train.steps={steps}", "train.lr_schedule=constant", "train.warmup_steps=2",
        "train.log_every=1", "train.sample_every=1000", "train.checkpoint_every=5", "train.num_to_keep=2",
        "train.max_failures=3", f"tracking.tracking_uri={tracking}",
    ]  # fmt: skip
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_uri = str(output / "runs" / "lost-node")
    snapshot = storage.join(run_uri, "checkpoint_manager_snapshot.json")
    killed_after = None
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and job.poll() is None:
        listed = storage.read_text(snapshot) if storage.exists(snapshot) else ""
        registered = [int(step) for step in re.findall(r"checkpoint_(\d{8})", listed)]
        if registered and max(registered) >= 10:  # a checkpoint past the first, then the node goes
            killed_after = max(registered)
            victims = _node_processes("worker-a")
            assert victims, "the worker node's raylet was not found"
            for process in victims:
                try:
                    process.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            break
        time.sleep(0.2)
    assert killed_after is not None, f"no checkpoint registered before the job ended:\n{job.stdout.read()[-3000:]}"
    time.sleep(5)  # the head notices the dead node, Ray Train the dead workers
    _ray_start(env, *_worker_node_args(address, "worker-b"))
    out, _ = job.communicate(timeout=900)
    assert job.returncode == 0, out[-5000:]
    assert f"run lost-node: {steps} steps" in out

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("ecar").experiment_id], filter_string="tags.`ecar.run_name` = 'lost-node'"
    )
    resumed = [int(m.value) for m in client.get_metric_history(run.info.run_id, "resumed_at_step")]
    assert resumed and resumed[0] >= killed_after and resumed[0] % 5 == 0, resumed
    logged = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert logged == list(range(1, steps + 1))  # the step count continued to the end, none skipped
    assert storage.exists(str(output / "runs" / "lost-node" / "export" / "export.json"))
