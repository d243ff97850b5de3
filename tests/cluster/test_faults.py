"""Real faults, as they happen on a cluster: a job's driver process SIGKILLed mid-run (the encode
and sampling jobs, a Tune sweep), and the object store going away mid-write and coming back.
Each job runs as a user runs it (`python -m jobs.X --address` against a `ray start --head`
cluster on loopback), and each re-run must end with exactly the output of an uninterrupted run:
the right counts, no duplicate row, no partial or stray shard.

Slow tier: every test starts Ray drivers as subprocesses and waits for them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ecar import storage
from ecar.tracking import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

SPLITS = ("train", "test")


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(job: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = job.communicate(timeout=timeout)
    assert job.returncode == 0, out[-5000:]
    return out


def _run(command: list[str], env: dict[str, str], timeout: float = 600) -> str:
    return _finish(_start(command, env), timeout)


def _wait_until(job: subprocess.Popen, ready, what: str, timeout: float = 600) -> None:
    """Return once `ready()` is true while the job still runs; fail if it ends first or never."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.poll() is None:
        if ready():
            return
        time.sleep(0.1)
    out = job.stdout.read() if job.poll() is not None else ""
    pytest.fail(f"the job ended before {what} (or it never happened):\n{out[-3000:]}")


def _kill_when(job: subprocess.Popen, ready, what: str) -> None:
    """SIGKILL the job's driver (no handler runs, nothing is flushed) once `ready()` is true."""
    _wait_until(job, ready, what)
    job.send_signal(signal.SIGKILL)
    job.wait(30)


def _shards(prefix: str) -> list[str]:
    """The Parquet shards written so far under PREFIX/train and PREFIX/test."""
    return [uri for split in SPLITS for uri in storage.list_files(storage.join(prefix, split), ".parquet")]


def _files(root: str) -> set[str]:
    """Every object under `root` (recursively), relative to it."""
    fs, path = storage.fsspec_fs(root)
    return {found.removeprefix(path.rstrip("/") + "/") for found in fs.find(path)}


@pytest.fixture(scope="module")
def many_images(ray_cluster, tmp_path_factory) -> str:
    """640 + 640 Fashion-MNIST images at 16x16 in shards of 16 (40 + 40 shards): enough shards
    that a kill lands while some are written and others are not."""
    from ecar.data.prepare import prepare_images
    from ecar.presets import get_config

    uri = str(tmp_path_factory.mktemp("images"))
    prepare_images(get_config("ecar-debug", {"data.shard_rows": 16}), uri, limit_per_split=640)
    return uri


# ----- prepare ----------------------------------------------------------------------------------
def test_a_prepare_driver_killed_mid_run_reruns_to_the_uninterrupted_output(head_node, many_images, tmp_path):
    from ecar.data.shards import read_table

    output = str(tmp_path / "images")
    command = [
        "jobs.prepare", "--preset", "ecar-debug", "--output", output, "--limit", "640",
        "--address", head_node.gcs_address, "data.shard_rows=16",
    ]  # fmt: skip
    job = _start(command, head_node.env)
    _kill_when(job, lambda: len(_shards(output)) >= 8, "8 of 80 shards were written")
    assert not storage.exists(storage.join(output, "images.json"))
    _run(command, head_node.env)

    # `many_images` is the same data set prepared in one uninterrupted run
    assert _files(output) == _files(many_images)  # no partial or stray shard
    for name in sorted(_files(many_images)):
        if name.endswith(".parquet"):
            assert read_table(storage.join(output, name)).equals(read_table(storage.join(many_images, name))), name


# ----- encode -------------------------------------------------------------------------------------
def _encode(images: str, output: str, tokenizer: str, address: str, *extra: str) -> list[str]:
    return [
        "jobs.encode", "--preset", "ecar-debug", "--images", images, "--output", output, "--address", address,
        "--no-track", f"tokenizer.checkpoint_uri={tokenizer}", "data.encode_batch_size=16", *extra,
    ]  # fmt: skip


def _ids(shards: list[str]) -> list[str]:
    from ecar.data.shards import read_table

    return [i for uri in shards for i in read_table(uri, columns=["id"]).column("id").to_pylist()]


def _assert_exact_latents(images: str, output: str) -> None:
    """Every source image encoded exactly once (or quarantined), and nothing on storage but the
    manifest's shards, their quarantine files and the job's own records."""
    from ecar.data.manifest import read_manifest, shard_uris
    from ecar.data.prepare import image_shard_uris, read_images_manifest
    from ecar.data.reader import validate_latents
    from ecar.presets import get_config

    manifest, prepared = read_manifest(output), read_images_manifest(images, get_config("ecar-debug"))
    listed = {"manifest.json", "encode.json"}  # encode.json: the job's claim on its output
    for split in SPLITS:
        ids = _ids(shard_uris(manifest, split))
        assert len(ids) == len(set(ids)) == manifest["splits"][split]["rows"]
        assert sorted(ids) == sorted(_ids(image_shard_uris(images, split, prepared)))  # random images: none quarantined
        listed |= {f"latents/{split}/{shard['name']}" for shard in manifest["splits"][split]["shards"]}
    stray = {f for f in _files(output) - listed if not f.startswith("quarantine/")}
    assert not stray, f"files no manifest names: {sorted(stray)}"
    validate_latents(output)


def test_an_encode_driver_killed_mid_run_reruns_to_exact_counts(head_node, many_images, random_tokenizer, tmp_path):
    output = str(tmp_path / "latents")
    command = _encode(many_images, output, random_tokenizer, head_node.gcs_address)
    job = _start(command, head_node.env)
    latents = storage.join(output, "latents")
    _kill_when(job, lambda: len(_shards(latents)) >= 8, "8 of 80 shards were written")
    assert not storage.exists(storage.join(output, "manifest.json"))
    time.sleep(5)  # the dead driver's encoders are torn down with its job; a write in flight lands whole or not at all
    done = {uri: storage.read_bytes(uri) for uri in _shards(latents)}
    assert 8 <= len(done) < 80

    out = _run(command, head_node.env)
    assert "encoded into" in out
    assert all(storage.read_bytes(uri) == blob for uri, blob in done.items())  # finished shards untouched
    _assert_exact_latents(many_images, output)


# ----- object storage gone mid-write ------------------------------------------------------------
class Outage:
    """A second endpoint of the loopback S3 store (moto keeps its buckets in this process, so a
    server stopped and started again on the same port serves the same objects)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


def test_an_object_store_that_goes_away_mid_write_and_returns_lets_the_rerun_complete(
    head_node, s3_server, s3_prefix, many_images, random_tokenizer
):
    import boto3

    outage = Outage()
    outage.start()
    output = s3_prefix
    bucket, prefix = s3_prefix.removeprefix("s3://").split("/", 1)
    command = _encode(
        many_images, output, random_tokenizer, head_node.gcs_address, f"storage.endpoint_url={outage.endpoint}"
    )
    client = boto3.client("s3", endpoint_url=s3_server)  # the same objects, through the server that stays up

    def shards_on_s3() -> int:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/latents/")
        return sum(obj["Key"].endswith(".parquet") for obj in listed.get("Contents", []))

    job = _start(command, head_node.env)
    try:
        _wait_until(job, lambda: shards_on_s3() >= 6, "6 of 80 shards were on S3")
        outage.stop()
        down_at = shards_on_s3()
        out, _ = job.communicate(timeout=600)  # the job fails: its writes have nowhere to go
        assert job.returncode != 0, out[-3000:]
        assert "manifest.json" not in {
            obj["Key"].rsplit("/", 1)[-1]
            for obj in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/").get("Contents", [])
        }
        assert 6 <= down_at < 80
    finally:
        if job.poll() is None:
            job.kill()
    outage.start()  # the store is back, with what it held
    try:
        _run(command, head_node.env)
    finally:
        outage.stop()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", s3_server)
        _assert_exact_latents(many_images, output)


# ----- sampling -----------------------------------------------------------------------------------
def _sample(export: str, output: str, address: str) -> list[str]:
    return [
        "jobs.sample", "--checkpoint", export, "--output", output, "--num-images", "96", "--shard-size", "4",
        "--batch-size", "4", "--actors", "1", "--address", address, "flow.steps_per_stage=[2,2,2]",
    ]  # fmt: skip


def test_a_sampling_driver_killed_mid_run_reruns_to_the_uninterrupted_output(head_node, decodable_checkpoint, tmp_path):
    from ecar.sampler import read_samples

    reference, output = str(tmp_path / "reference"), str(tmp_path / "samples")
    _run(_sample(decodable_checkpoint, reference, head_node.gcs_address), head_node.env)

    command = _sample(decodable_checkpoint, output, head_node.gcs_address)
    job = _start(command, head_node.env)
    shards = storage.join(output, "shards")
    _kill_when(job, lambda: len(storage.list_files(shards)) >= 4, "4 of 24 shards were written")
    assert not storage.exists(storage.join(output, "manifest.json"))
    _run(command, head_node.env)

    manifest = json.loads(storage.read_text(storage.join(output, "manifest.json")))
    assert sum(shard["count"] for shard in manifest["shards"]) == 96
    assert {f"shards/{shard['name']}" for shard in manifest["shards"]} == {
        f for f in _files(output) if f.startswith("shards/")
    }  # no partial or stray shard
    again, expected = read_samples(output, "images"), read_samples(reference, "images")
    np.testing.assert_array_equal(again["index"], np.arange(96))
    for key in ("label", "seed", "images"):
        np.testing.assert_array_equal(again[key], expected[key])  # bit for bit the uninterrupted run


# ----- a Tune sweep -------------------------------------------------------------------------------
def test_a_sweep_driver_killed_mid_run_is_restored_by_its_rerun(head_node, tmp_path):
    from mlflow.tracking import MlflowClient

    from ecar.sweeps.runner import STOPPED_EARLY_TAG
    from ecar.train.synthetic import write_synthetic_latents

    latents = write_synthetic_latents(str(tmp_path / "latents"))
    output, tracking = str(tmp_path / "out"), f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        "jobs.tune", "lr", "--smoke-test", "--manifest", latents, "--output", output, "--name", "killed",
        "--address", head_node.gcs_address, "--tracking-uri", tracking, "--report-dir", str(tmp_path / "report"),
        "train.steps=12", "train.checkpoint_every=3",  # a trial checkpoints before it ends
    ]  # fmt: skip

    def a_trial_checkpointed() -> bool:
        runs = storage.join(output, "runs")
        return storage.exists(runs) and any("checkpoint_" in found for found in _files(runs))

    job = _start(command, head_node.env)
    _kill_when(job, a_trial_checkpointed, "a trial wrote its first checkpoint")
    time.sleep(5)  # the dead driver's trials are torn down with its job
    out = _run(command, head_node.env)
    summary = json.loads(out[out.rindex("\n{") :])
    assert sum(summary["trials"].values()) == 2 and summary["trials"]["FAILED"] == 0, summary

    client = MlflowClient(tracking)
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("ecar").experiment_id], filter_string="tags.`ecar.sweep_run` = 'killed'"
    )
    assert parent.info.run_id == summary["parent_run_id"]  # the same parent run, resumed
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 2  # one child run per trial: the restored trial went on in its own run
    for child in children:
        assert child.info.status in ("FINISHED", "KILLED")
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert sorted(set(steps)) == list(range(2, max(steps) + 1, 2)), steps  # logged every 2 steps, no gap
        if child.data.tags[STOPPED_EARLY_TAG] == "false":
            assert max(steps) == 12
    assert os.path.exists(tmp_path / "report" / "report.md")
