"""A training job submitted to a running cluster the way users do it: through the job API, with
credentials passed in the job's runtime_env, reading latents from and checkpointing to S3."""

import os
import time

import pytest

from ecar.train.synthetic import write_synthetic_latents

# In the default run (CI): ~1.5 minutes on an idle 2-core machine; the head's job agent can
# take minutes to come up on a heavily loaded one, which `submit` waits out.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def submit(client, **job):
    """Submit, retrying while the head's job agent is still starting ("No available agent")."""
    for _ in range(150):
        try:
            return client.submit_job(**job)
        except RuntimeError as error:
            if "No available agent" not in str(error):
                raise
            time.sleep(2)
    return client.submit_job(**job)


def job_env():
    """What the job needs of this machine's environment: the S3 endpoint and credentials."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def wait(client, job_id, limit_s=600):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(2)
    client.stop_job(job_id)
    raise TimeoutError(f"job {job_id} still {status} after {limit_s} s")


def test_a_submitted_training_job_trains_and_checkpoints_to_s3(head_node, s3_prefix):
    import boto3
    from ray.job_submission import JobStatus

    latents = write_synthetic_latents(f"{s3_prefix}/latents", rows=64, shape=(4, 8, 8), shards=2)
    client = head_node.client()
    entrypoint = (
        f"python -m jobs.train --preset ecar-debug --manifest {latents} --output {s3_prefix} "
        "--name submitted train.steps=4 train.checkpoint_every=2 train.sample_every=4 "
        "train.log_every=2 train.num_workers=1 train.global_batch_size=8"
    )
    job_id = submit(
        client,
        entrypoint=entrypoint,
        runtime_env={"working_dir": ".", "excludes": ["outputs", "*.db"], "env_vars": job_env()},
    )
    status = wait(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "run submitted: 4 steps" in logs
    bucket, prefix = s3_prefix.removeprefix("s3://").split("/", 1)
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/runs/submitted/")
    keys = [item["Key"] for item in listing["Contents"]]
    assert any(key.endswith("export/export.json") for key in keys)
    assert any("checkpoint" in key for key in keys)


def test_a_job_with_a_bad_preset_fails_with_one_clear_line(head_node):
    from ray.job_submission import JobStatus

    client = head_node.client()
    job_id = submit(
        client,
        entrypoint="python -m jobs.train --preset ecar-huge --manifest s3://ecar-test/x",
        runtime_env={"working_dir": ".", "excludes": ["outputs", "*.db"]},
    )
    assert wait(client, job_id, 300) == JobStatus.FAILED
    logs = client.get_job_logs(job_id)
    assert "unknown preset 'ecar-huge'" in logs and "Traceback" not in logs
