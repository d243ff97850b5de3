"""A sweep end to end on the local Ray cluster: trials train on Ray Train + DeepSpeed from latents
on the loopback S3 server, ASHA stops the trial that does not learn, and the parent run, the
child runs and the report are read back from the MLflow server by a separate client."""

import csv
import io
import json

import pytest
from ray import tune

from ecar.config import ConfigError
from ecar.sweeps import Sweep
from ecar.sweeps.runner import STOPPED_EARLY_TAG, SweepOptions, run_sweep

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

GOOD_LR, STALLED_LR = 3e-3, 1e-9


def learning_or_not(base):
    # the second trial barely moves its weights: its held-out loss stays at the initial one
    return {"train.lr": tune.grid_search([GOOD_LR, STALLED_LR])}


SWEEP = Sweep(name="learns", preset="ecar-debug", space=learning_or_not, description="test sweep")


def test_smoke_sweep_stops_the_stalled_trial_and_reports_to_mlflow(
    ray_cluster, s3_latents, s3_prefix, mlflow_server, tmp_path
):
    from mlflow.tracking import MlflowClient

    options = SweepOptions(
        name="learns-e2e",
        manifest_uri=s3_latents,
        smoke_test=True,
        overrides=(f"storage.root={s3_prefix}", "train.min_lr=0"),
        tracking_uri=mlflow_server,
        report_dir=str(tmp_path / "report"),
    )
    result = run_sweep(SWEEP, options)

    by_lr = {trial["config"]["train.lr"]: trial for trial in result.trials}
    assert set(by_lr) == {GOOD_LR, STALLED_LR}
    assert by_lr[GOOD_LR]["status"] == "FINISHED" and by_lr[GOOD_LR]["step"] == 6
    assert by_lr[STALLED_LR]["status"] == "KILLED" and by_lr[STALLED_LR]["stopped_early"]
    assert by_lr[STALLED_LR]["step"] < 6
    assert result.best["trial_id"] == by_lr[GOOD_LR]["trial_id"]

    client = MlflowClient(mlflow_server)  # a separate client, reading what the sweep wrote
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["ecar.sweep_run"] == "learns-e2e"
    assert parent.data.metrics["trials_killed"] == 1.0
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
    )
    assert {c.data.params["train.lr"] for c in children} == {str(GOOD_LR), str(STALLED_LR)}
    statuses = {c.data.params["train.lr"]: (c.info.status, c.data.tags[STOPPED_EARLY_TAG]) for c in children}
    assert statuses == {str(GOOD_LR): ("FINISHED", "false"), str(STALLED_LR): ("KILLED", "true")}
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_loss")
        assert [m.step for m in history][:1] == [2]  # the held-out loss at every evaluation
        assert child.data.metrics["sampling_gflops"] > 0
    good = next(c for c in children if c.data.params["train.lr"] == str(GOOD_LR))
    assert good.data.metrics["val_loss"] < client.get_metric_history(good.info.run_id, "val_loss")[0].value

    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert artifacts == {"report/report.md", "report/report.csv", "report/pareto.png"}
    local = client.download_artifacts(result.parent_run_id, "report/report.csv", str(tmp_path / "download"))
    rows = list(csv.DictReader(io.StringIO(open(local).read())))
    assert [float(r["train.lr"]) for r in rows] == [GOOD_LR, STALLED_LR]  # ranked by val_loss
    assert [r["status"] for r in rows] == ["FINISHED", "KILLED"]


def test_search_space_errors_stop_the_sweep_before_anything_starts(tmp_path):
    bad_key = Sweep(name="bad", preset="ecar-debug", space=lambda base: {"train.lrate": tune.grid_search([1e-3])})
    with pytest.raises(ConfigError, match="train.lrate"):
        run_sweep(bad_key, SweepOptions(overrides=(f"storage.root={tmp_path}",)))
    bad_value = Sweep(
        name="bad", preset="ecar-debug", space=lambda base: {"train.zero_stage": tune.grid_search([2, 5])}
    )
    with pytest.raises(ConfigError, match="train.zero_stage"):
        run_sweep(bad_value, SweepOptions(overrides=(f"storage.root={tmp_path}",)))
    sampling = Sweep(
        name="bad",
        preset="ecar-debug",
        kind="sample",
        space=lambda base: {"sampling.cfg_scale": tune.grid_search([1.0, 2.0])},
    )
    with pytest.raises(ConfigError, match="--checkpoint"):
        run_sweep(sampling, SweepOptions())
    assert not (tmp_path / "tune").exists()


@pytest.fixture(scope="module")
def decodable_checkpoint(ray_cluster, tmp_path_factory):
    """An ecar-debug export whose latent manifest names a (fresh) KL-VAE tokenizer and real
    Fashion-MNIST test images: everything a sampling trial needs for FID."""
    import torch

    from ecar.data.manifest import SCHEMA_VERSION, write_manifest
    from ecar.data.prepare import prepare_images
    from ecar.export import save_exported
    from ecar.models import build_model
    from ecar.presets import get_config
    from ecar.tokenizer.vae import KLVAE, save_vae, vae_shape

    root = tmp_path_factory.mktemp("sampling-sweep")
    config = get_config("ecar-debug")
    images_uri = str(root / "images")
    prepare_images(config, images_uri, splits=["test"], limit_per_split=16)
    torch.manual_seed(0)
    tokenizer_uri = str(root / "tokenizer")
    described = save_vae(KLVAE(vae_shape(config)), tokenizer_uri, config.data.image_size)
    latents = str(root / "latents")
    write_manifest(
        latents,
        {
            "schema_version": SCHEMA_VERSION,
            "kind": "latents",
            "splits": {},
            "source": {"images_uri": images_uri},
            "tokenizer": {"kind": "kl_vae", "uri": tokenizer_uri, "sha256": described["weights_sha256"]},
            "latent_shape": [config.model.latent_channels, config.model.latent_size, config.model.latent_size],
            "latent_dtype": "float32",
            "latent_scale": 1.0,
            "num_classes": config.model.num_classes,
            "flip_augment": False,
        },
    )
    model = build_model(config)
    with torch.no_grad():  # off the zero-initialised outputs, so that the schedule matters
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    export = str(root / "export")
    save_exported(model.state_dict(), config, export, latent_scale=1.0, manifest_uri=latents)
    return export


def test_sampling_sweep_scores_each_schedule_of_one_checkpoint(ray_cluster, decodable_checkpoint, tmp_path):
    from mlflow.tracking import MlflowClient

    sweep = Sweep(
        name="few-steps",
        preset="ecar-debug",
        kind="sample",
        metric="fid",
        space=lambda base: {"flow.steps_per_stage": tune.grid_search([[1, 1, 1], [3, 3, 3]])},
    )
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_sweep(
        sweep,
        SweepOptions(
            name="few-steps-e2e",
            checkpoint_uri=decodable_checkpoint,
            fid_images=12,
            overrides=(f"storage.root={tmp_path}",),
            tracking_uri=tracking,
            report_dir=str(tmp_path / "report"),
        ),
    )
    assert [t["status"] for t in result.trials] == ["FINISHED", "FINISHED"]
    by_steps = {json.dumps(t["config"]["flow.steps_per_stage"]): t for t in result.trials}
    # three times the flow steps, the same AR passes: more than 1x and less than 3x the FLOPs
    ratio = by_steps["[3, 3, 3]"]["sampling_gflops"] / by_steps["[1, 1, 1]"]["sampling_gflops"]
    assert 1.5 < ratio < 3
    assert all(t["fake_images"] == 12 and t["fid"] > 0 for t in result.trials)

    client = MlflowClient(tracking)
    children = client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
    )
    assert sorted(c.data.params["flow.steps_per_stage"] for c in children) == ["[1, 1, 1]", "[3, 3, 3]"]
    assert all(c.info.status == "FINISHED" and "fid" in c.data.metrics for c in children)
    assert {a.path for a in client.list_artifacts(result.parent_run_id, "report")} >= {"report/report.md"}
    assert "ranked by `fid` (min)" in result.report_markdown
