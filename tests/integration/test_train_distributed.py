"""Distributed training on a local Ray cluster: 2 CPU workers (0.5 CPU each) under DeepSpeed
ZeRO-2 and ZeRO-3, latents streamed from the loopback S3 server, checkpoints written back to it,
metrics, sample grids by step, system metrics and the registered export on a loopback MLflow
server queried by a separate client.

Each fit costs tens of seconds on 2 cores, so the runs are shared: the ZeRO-2 run is also the
uninterrupted reference of the resume test.
"""

from __future__ import annotations

import re
import threading
import time
import uuid

import psutil
import pytest
import torch
from safetensors.torch import load as load_safetensors

from ecar import storage
from ecar.export import load_exported, read_metadata
from ecar.tracking import logged_images
from jobs.train import resolve_config, train_job

pytestmark = [pytest.mark.integration]

# Same model, data and schedule for every run; constant LR after a 2-step warm-up so that a
# run cut short (train.steps=3) and then extended follows the same schedule as a full one.
BASE = [
    "train.num_workers=2",
    "train.cpus_per_worker=0.5",
    "train.global_batch_size=16",
    "train.micro_batch_size=8",
    "train.steps=6",
    "train.lr_schedule=constant",
    "train.warmup_steps=2",
    "train.lr=2e-3",
    "train.log_every=1",
    "train.sample_every=3",
    "train.checkpoint_every=3",
    "train.num_to_keep=1",
    "data.shuffle_buffer_rows=32",
    "tracking.experiment_name=ecar-train-tests",
    # one retry from the latest checkpoint: an overloaded shared machine has crashed Ray
    # workers (SIGABRT inside Ray's core) that had nothing to do with the code under test
    "train.max_failures=1",
]
# Replayed steps must give the same loss: same data order, noise seeds, weights and optimizer
# state. Reductions run in the same order, so the only slack needed is float32 round-off.
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def output_root(s3_latents):
    return f"{s3_latents.rsplit('/', 1)[0]}/runs-{uuid.uuid4().hex[:8]}"


def _config(s3_latents, output_root, mlflow_server, *extra):
    return resolve_config(
        "ecar-debug", [*BASE, f"tracking.tracking_uri={mlflow_server}", *extra], manifest=s3_latents, output=output_root
    )


def _run(mlflow_server, name):
    """A separate client's view of run `name`: (client, run)."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(
        experiment_names=["ecar-train-tests"], filter_string=f"tags.`ecar.run_name` = '{name}'", output_format="list"
    )
    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_server)
    assert len(runs) == 1, f"expected one MLflow run named {name}, found {len(runs)}"
    return client, runs[0]


def _last_logged_step(mlflow_server, name) -> int:
    """The highest step with a logged loss in run `name` (0 before its first)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("ecar-train-tests")
    if experiment is None:
        return 0
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`ecar.run_name` = '{name}'")
    return max((m.step for run in runs for m in client.get_metric_history(run.info.run_id, "loss")), default=0)


def _losses(client, run_id):
    """step -> every logged total loss at that step (a replayed step is logged twice)."""
    history: dict[int, list[float]] = {}
    for metric in client.get_metric_history(run_id, "loss"):
        history.setdefault(metric.step, []).append(metric.value)
    return history


@pytest.fixture(scope="module")
def zero2_run(ray_cluster, s3_latents, output_root, mlflow_server):
    config = _config(s3_latents, output_root, mlflow_server, "train.zero_stage=2")
    return config, train_job(config, "zero2")


@pytest.mark.timeout(420)  # includes the session's set-up: Ray, the MLflow server, the data
def test_zero2_streams_from_s3_checkpoints_to_it_and_logs_to_mlflow(zero2_run, mlflow_server, output_root, tmp_path):
    config, result = zero2_run
    assert result.metrics["step"] == 6
    # num_to_keep=1: only the last checkpoint is left on S3, with every rank's shards in it
    run_files = storage.list_files(result.run_uri)
    checkpoints = sorted(u.rsplit("/", 1)[-1] for u in run_files if "/checkpoint_0" in u)
    assert checkpoints == ["checkpoint_00000006"]
    names = {u.rsplit("/", 1)[-1] for u in storage.list_files(f"{result.run_uri}/checkpoint_00000006")}
    assert {"train_state.json", "config.json", "ema.safetensors"} <= names
    shards = {u.rsplit("/", 1)[-1] for u in storage.list_files(f"{result.run_uri}/checkpoint_00000006/deepspeed")}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= shards

    client, run = _run(mlflow_server, "zero2")
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["preset"] == "ecar-debug"
    assert run.data.tags["manifest_uri"] == config.data.manifest_uri and run.data.tags["git_commit"]
    for key in (
        "loss",
        "loss_stage0",
        "loss_stage1",
        "loss_stage2",
        "grad_norm",
        "lr",
        "samples_per_s_per_worker",
        "tokens_per_s_per_worker",
        "data_wait_fraction",
    ):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 6
    # previews by training step, each a PNG readable through the client API
    previews = logged_images(mlflow_server, run.info.run_id, "samples")
    assert list(previews) == [3, 6]
    with open(client.download_artifacts(run.info.run_id, previews[6], str(tmp_path)), "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    # MLflow's system metrics beside the peak-memory figures
    assert "system/cpu_utilization_percentage" in run.data.metrics and "peak_rss_mib_max_worker" in run.data.metrics
    assert run.data.tags["ecar.job"] == "train" and "tokenizer.steps" not in run.data.params
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "loss_curve.png", "export_uri.txt"} <= top
    assert run.data.tags["export_uri"] == result.export_uri
    # the export is a version of the preset's registered model, linked to this run
    assert run.data.tags["ecar.model_uri"] == result.model_uri and result.model_uri.startswith("models:/ecar-debug/")
    version = client.get_model_version("ecar-debug", result.model_uri.rsplit("/", 1)[1])
    assert version.run_id == run.info.run_id and version.tags["ecar.export_uri"] == result.export_uri
    assert version.tags["ecar.content_sha256"] == read_metadata(result.export_uri)["content_sha256"]

    # the exported EMA loads in one process, whatever the training world size was, and holds
    # exactly the EMA of the last checkpoint
    exported = load_exported(result.export_uri)
    assert exported.step == 6 and exported.config.train.zero_stage == 2
    ema = load_safetensors(storage.read_bytes(f"{result.run_uri}/checkpoint_00000006/ema.safetensors"))
    weights = exported.model.state_dict()
    assert ema.keys() == {name for name, _ in exported.model.named_parameters()}
    for name, tensor in ema.items():
        assert torch.equal(weights[name], tensor), name
    # the export names its training run, so a later evaluation logs into it
    assert read_metadata(result.export_uri)["mlflow_run_id"] == result.mlflow_run_id
    latents = exported.model.generate(torch.arange(2), generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()


@pytest.mark.timeout(240)
def test_zero3_trains_and_exports_gathered_ema(ray_cluster, s3_latents, output_root, mlflow_server, zero2_run):
    config = _config(s3_latents, output_root, mlflow_server, "train.zero_stage=3")
    result = train_job(config, "zero3")
    assert result.metrics["step"] == 6
    names = {u.rsplit("/", 1)[-1] for u in storage.list_files(f"{result.run_uri}/checkpoint_00000006")}
    assert "ema.safetensors" in names  # the partitioned EMA, gathered whole
    exported = load_exported(result.export_uri)
    reference = load_exported(zero2_run[1].export_uri)
    # ZeRO-3 partitions the same AdamW update: the gathered EMA matches ZeRO-2's
    for name, tensor in reference.model.state_dict().items():
        torch.testing.assert_close(exported.model.state_dict()[name], tensor, rtol=1e-3, atol=1e-5)
    client, run = _run(mlflow_server, "zero3")
    assert run.data.params["train.zero_stage"] == "3"
    assert list(logged_images(mlflow_server, run.info.run_id, "samples")) == [3, 6]


@pytest.mark.timeout(300)
def test_relaunch_with_the_same_name_resumes_and_matches_the_uninterrupted_run(
    ray_cluster, s3_latents, output_root, mlflow_server, zero2_run
):
    first = train_job(_config(s3_latents, output_root, mlflow_server, "train.zero_stage=2", "train.steps=3"), "resumed")
    assert first.metrics["step"] == 3
    second = train_job(_config(s3_latents, output_root, mlflow_server, "train.zero_stage=2"), "resumed")
    assert second.metrics["step"] == 6 and second.mlflow_run_id == first.mlflow_run_id
    client, run = _run(mlflow_server, "resumed")
    assert run.data.metrics["resumed_at_step"] == 3
    resumed = _losses(client, run.info.run_id)
    _, reference_run = _run(mlflow_server, "zero2")
    reference = _losses(client, reference_run.info.run_id)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):  # steps 4-6 ran after the resume
        assert resumed[step][-1] == pytest.approx(reference[step][-1], rel=LOSS_RTOL), step


@pytest.mark.timeout(420)
def test_a_resume_with_changed_settings_or_data_is_refused_unless_allowed(
    ray_cluster, s3_latents, output_root, mlflow_server, capsys
):
    from ecar.train.synthetic import write_synthetic_latents
    from jobs.train import main

    base = _config(s3_latents, output_root, mlflow_server, "train.zero_stage=2", "train.steps=2")
    first = train_job(base, "changed")
    capsys.readouterr()  # the first run's own log lines (MLflow's among them)

    def argv(manifest, *extra):  # the options first: argparse takes the overrides as one trailing list
        options = ["--preset", "ecar-debug", "--output", output_root, "--name", "changed", "--manifest", manifest]
        return [
            *options,
            *BASE,
            "train.zero_stage=2",
            f"tracking.tracking_uri={mlflow_server}",
            "train.steps=3",
            *extra,
        ]

    # train.steps may change (the run goes on), the learning rate may not
    assert main(argv(s3_latents, "train.lr=1e-3")) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "train.lr: 0.002 -> 0.001" in error and "--allow-changes" in error
    # the same shapes, other values: only the manifest's content hash tells them apart
    other = write_synthetic_latents(f"{s3_latents.rsplit('/', 1)[0]}/other-latents", seed=1)
    assert main(argv(other)) == 2
    error = capsys.readouterr().err
    assert "data set:" in error and other in error
    assert storage.list_files(storage.join(first.run_uri, "checkpoint_00000003")) == []  # nothing ran

    changed = base.override({"train.lr": 1e-3, "train.steps": 3})
    result = train_job(changed, "changed", allow_changes=True)
    assert result.metrics["step"] == 3 and result.mlflow_run_id == first.mlflow_run_id
    _, run = _run(mlflow_server, "changed")
    assert "train.lr: 0.002 -> 0.001" in run.data.tags["ecar.resume_changes"]
    assert run.data.params["train.lr"] == "0.002"  # params are what the run started with


@pytest.mark.timeout(300)
def test_a_nonfinite_loss_stops_the_run_instead_of_replaying_it(ray_cluster, tampered_latents, mlflow_server, tmp_path):
    from ecar.train.loop import NonFiniteLossError

    overrides = [*BASE, f"tracking.tracking_uri={mlflow_server}", "train.zero_stage=2", "train.steps=20"]
    # one epoch is 16 steps, so the NaN latent is met; restarts allowed, and none may happen
    overrides += ["train.max_failures=3", "train.checkpoint_every=1", "data.verify_values=false"]
    config = resolve_config("ecar-debug", overrides, manifest=tampered_latents["nan"], output=str(tmp_path))
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step"):
        train_job(config, "nonfinite")
    client, run = _run(mlflow_server, "nonfinite")
    assert run.info.status == "FAILED"
    assert "resumed_at_step" not in run.data.metrics  # the group was not restarted into the same NaN
    assert [a.path for a in client.list_artifacts(run.info.run_id) if a.path == "stopped.txt"] == ["stopped.txt"]
    assert not storage.exists(storage.join(str(tmp_path), "runs", "nonfinite", "export", "export.json"))


# A resize changes how the global batch is reduced (two ranks' gradients averaged by DeepSpeed's
# reduce-scatter vs. two micro-batches accumulated on one rank), so later steps differ by float32
# round-off that AdamW carries forward; the first step after the resume starts from the same
# weights, batches and noise, and differs only in how the two micro-batch losses are averaged.
ELASTIC_LOSS_RTOL = {"first": 1e-6, "later": 1e-4}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_checkpointed_at_n_workers_resumes_at_m_on_the_same_batches(
    ray_cluster, s3_latents, output_root, mlflow_server, zero2_run, before, after
):
    """Elastic resume through the whole path (Ray Train workers, DeepSpeed ZeRO-2, S3): 3 steps
    at `before` workers, then the same run relaunched at `after` (as an elastic 1-2 worker run
    where it grows, so Ray Train's elastic scaling picks the size) continues at step 4 with the
    losses of the uninterrupted 2-worker run."""
    name = f"elastic-{before}-to-{after}"

    def workers(count):  # an elastic run: min_workers > 0 (checkpoints carry the whole optimizer state)
        return [f"train.num_workers={count}", f"train.min_workers={1 if count > before else count}"]

    first = train_job(
        _config(s3_latents, output_root, mlflow_server, "train.zero_stage=2", "train.steps=3", *workers(before)), name
    )
    saved = storage.read_text(f"{first.run_uri}/checkpoint_00000003/train_state.json")
    assert f'"world_size": {before}' in saved
    assert storage.exists(f"{first.run_uri}/checkpoint_00000003/optimizer.safetensors")
    second = train_job(_config(s3_latents, output_root, mlflow_server, "train.zero_stage=2", *workers(after)), name)
    assert second.metrics["step"] == 6 and second.mlflow_run_id == first.mlflow_run_id
    resized = storage.read_text(f"{second.run_uri}/checkpoint_00000006/train_state.json")
    assert f'"world_size": {after}' in resized  # Ray Train ran it at the new size
    client, run = _run(mlflow_server, name)
    assert run.data.metrics["resumed_at_step"] == 3
    resumed = _losses(client, run.info.run_id)
    _, reference_run = _run(mlflow_server, "zero2")
    reference = _losses(client, reference_run.info.run_id)
    differences = {step: abs(resumed[step][-1] / reference[step][-1] - 1) for step in range(1, 7)}
    print(f"{before} -> {after} workers: relative loss difference to the uninterrupted run by step {differences}")
    assert resumed[4][-1] == pytest.approx(reference[4][-1], rel=ELASTIC_LOSS_RTOL["first"])
    for step in (1, 2, 3, 5, 6):
        assert resumed[step][-1] == pytest.approx(reference[step][-1], rel=ELASTIC_LOSS_RTOL["later"]), step


def _train_workers() -> list[psutil.Process]:
    """This test session's Ray Train worker processes (descendants of this process)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


# slow tier (~4 min on 2 cores): the default tier keeps the relaunch-resume test, the slow tier
# also has a whole worker node lost (tests/cluster/test_node_failure.py)
@pytest.mark.slow
@pytest.mark.timeout(360)
def test_a_killed_worker_restarts_the_group_from_the_latest_checkpoint(
    ray_cluster, s3_latents, output_root, mlflow_server
):
    config = _config(
        s3_latents,
        output_root,
        mlflow_server,
        "train.zero_stage=2",
        "train.steps=20",
        "train.checkpoint_every=5",
        "train.sample_every=100",
        "train.max_failures=2",
    )
    run_uri = storage.join(config.storage.root, "runs", "killed")
    killed: list[int] = []

    def kill_past_a_checkpoint():
        # Ray lists a checkpoint in its snapshot (the latest only) after the upload: kill only
        # then, so the restart has something to resume from, and only once a logged step lies
        # past it and 1-3 steps past a multiple of 5, so the next save is not under way and
        # some steps run both before the kill and after the resume.
        snapshot = storage.join(run_uri, "checkpoint_manager_snapshot.json")
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            listed = storage.read_text(snapshot) if storage.exists(snapshot) else ""
            registered = [int(step) for step in re.findall(r"checkpoint_(\d{8})", listed)]
            logged = _last_logged_step(mlflow_server, "killed") if registered else 0
            if registered and logged > max(registered) and logged % 5 in (1, 2, 3):
                workers = _train_workers()
                if workers:
                    victim = workers[-1]
                    killed.append(victim.pid)
                    victim.kill()  # SIGKILL: no cleanup, like a lost node
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_past_a_checkpoint, daemon=True)
    killer.start()
    result = train_job(config, "killed")
    killer.join(timeout=5)
    assert killed, "no worker was killed (the run finished before a checkpoint was registered?)"
    assert result.metrics["step"] == 20
    client, run = _run(mlflow_server, "killed")
    resumed_at = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_at_step")]
    assert resumed_at and resumed_at[0] >= 5 and resumed_at[0] % 5 == 0
    # loss continuity: steps run before the kill and replayed after it give the same loss
    history = _losses(client, run.info.run_id)
    replayed = {step: values for step, values in history.items() if len(values) > 1}
    assert replayed, f"no step was logged both before the kill and after the resume: {history}"
    for step, values in replayed.items():
        assert values[-1] == pytest.approx(values[0], rel=LOSS_RTOL), step
    assert sorted(history) == list(range(1, 21))
    print(
        f"killed pid {killed[0]}; resumed at step {int(resumed_at[0])}; {len(replayed)} replayed steps "
        f"matched within rel {LOSS_RTOL}"
    )
