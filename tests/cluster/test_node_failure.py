"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`): the
node that runs the training workers is killed mid-run (SIGKILL of its raylet and every process
under it, as when a machine is lost), a replacement node joins, and the run resumes from the
latest checkpoint with the step count continuing, through `ecar train` as a user runs it.

Slow tier: two clusters' worth of processes and a DeepSpeed restart take minutes on 2 cores.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from ecar import storage

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]


def _node_processes(node_name: str) -> list[psutil.Process]:
    """The raylet started for `node_name` and every process under it (its workers)."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "raylet" in cmdline and (f"node_name={node_name}" in cmdline or f"node-name={node_name}" in cmdline):
            return [process, *process.children(recursive=True)]
    return []


def test_a_lost_worker_node_is_replaced_and_the_run_resumes_from_its_checkpoint(two_nodes, tmp_path):
    address, env = two_nodes.gcs_address, two_nodes.env
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
    two_nodes.add_worker("worker-b")
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
