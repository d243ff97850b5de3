"""Running sweeps on Ray Tune, tracked as one MLflow parent run with a child run per trial.

Training sweeps (Ray Train V2 pattern): each trial is a Tune function trainable that builds
and fits its own `TorchTrainer` (through `ecar.train.trainer.fit`), with Tune's
`TuneReportCallback` forwarding every `ray.train.report` to the trial. The workers report the
held-out flow loss (`val_loss`, per stage `val_loss_stageS`) at every `train.eval_every` steps
and at checkpoints; ASHA stops trials whose validation loss trails at a rung. A finished trial
then gets its sampling FLOPs per image and, with `fid_images`, a small FID.

Each training trial's export is a version of the registered model (`ecar.tracking`); with
`alias`, the best trial's version gets that alias (e.g. `champion`).

Sampling sweeps: each trial samples from one exported checkpoint (a path or `models:/...`) with
its own steps per stage or guidance schedule and scores the images (FID, precision/recall,
FLOPs, latency), logged as metrics of the checkpoint's registered model too.

When trials run in parallel against the embedded SQLite store, an `mlflow server` on 127.0.0.1
is started over that store for the sweep's duration (SQLite alone races with several writers).
Re-running a sweep under the same `name` restores the Tune experiment: finished trials are
kept, unfinished ones resume from their last training checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecar import storage
from ecar.config import Config, ConfigError
from ecar.log import get_logger
from ecar.sweeps import Space, Sweep, grid_size, resolve, smoke_space, trial_overrides

log = get_logger(__name__)

SWEEP_RUN_TAG = "ecar.sweep_run"  # on the parent run: the sweep run's name
TRIAL_TAG = "ecar.trial_id"  # on each child run: the Tune trial id
STOPPED_EARLY_TAG = "ecar.stopped_early"
TRIAL_MEMORY_BYTES = 2**20  # a training trial's token resource request (see _run_training)

# Small enough to smoke-test any sweep in a couple of minutes: a few steps, one worker.
SMOKE_OVERRIDES = {
    "train.steps": 6,
    "train.eval_every": 2,
    "train.checkpoint_every": 6,
    "train.log_every": 2,
    "train.sample_every": 1000,
    "train.num_workers": 1,
    "train.cpus_per_worker": 0.5,
    "train.global_batch_size": 8,
    "train.micro_batch_size": 8,
    "train.warmup_steps": 1,
    "train.val_rows": 32,
}


@dataclass(frozen=True)
class SweepOptions:
    name: str = ""  # the sweep run's name; the same name resumes it (default: SWEEP-TIMESTAMP)
    manifest_uri: str = ""  # training sweeps: the latent data set (default: data.manifest_uri)
    checkpoint_uri: str = ""  # sampling sweeps: the exported checkpoint
    overrides: tuple[str, ...] = ()  # applied to the base config of every trial
    num_samples: int = 1  # repeats of the grid (samples of the random domains)
    max_concurrent_trials: int = 1
    grace_period: int = 0  # ASHA: steps before a trial may be stopped (0: one evaluation interval)
    reduction_factor: int = 2
    fid_images: int = 0  # per finished trial (training sweeps) or per trial (sampling sweeps)
    latency_batches: tuple[int, ...] = ()
    smoke_test: bool = False
    address: str | None = None
    tracking_uri: str = ""
    report_dir: str = ""  # default: STORAGE_ROOT/sweeps/NAME/report (local) or outputs/sweeps/NAME/report
    alias: str = ""  # training sweeps: point this alias at the best trial's model version


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    tracking_uri: str  # the store the runs live in (the embedded one, not a temporary server)
    experiment: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    report_files: dict[str, str] = field(default_factory=dict)
    report_markdown: str = ""


# ----- inside a trial -------------------------------------------------------------------------
def training_trial(
    trial_space: dict[str, Any],
    *,
    base: dict[str, Any],
    source: dict[str, Any],
    tracking_uri: str,
    parent_run_id: str,
    sweep_run: str,
    fid_images: int,
) -> None:
    """One training trial: fit the trial's config on Ray Train, reporting to Tune as it goes,
    then report the final metrics (sampling FLOPs; FID on `fid_images` when asked)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ecar.data.reader import latent_dataset
    from ecar.evaluation.evaluate import evaluate_checkpoint, sampling_cost
    from ecar.tracking import log_metrics
    from ecar.train.trainer import ManifestSummary, fit

    overrides = trial_overrides(trial_space)
    config = Config.from_dict(base).override(overrides)
    manifest_summary = ManifestSummary.from_dict(source)
    trial_id = tune.get_context().get_trial_id()
    dataset = latent_dataset(manifest_summary.manifest, "train", config.storage, seed=config.train.seed, validate=False)
    tags = {"ecar.sweep": sweep_run, TRIAL_TAG: trial_id, "ecar.trial_overrides": json.dumps(overrides)}
    result = fit(
        config,
        manifest_summary,
        dataset,
        f"{sweep_run}-{trial_id}",
        tracking_uri,
        parent_run_id=parent_run_id,
        tags=tags,
        callbacks=[TuneReportCallback()],
    )
    final: dict[str, Any] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    final["step"] = config.train.steps
    final.update(sampling_cost(config))
    if fid_images:
        quality = evaluate_checkpoint(result.export_uri, fid_images, split=config.data.val_split)
        final.update({k: quality[k] for k in ("fid", "precision", "recall", "fake_images")})
    final["steps_trained"] = config.train.steps
    log_metrics(tracking_uri, result.mlflow_run_id, final, config.train.steps)
    tune.report(final)


def sampling_trial(
    trial_space: dict[str, Any],
    *,
    base: dict[str, Any],
    model: dict[str, str],
    tracking_uri: str,
    parent_run_id: str,
    sweep_run: str,
    fid_images: int,
    latency_batches: tuple[int, ...],
    split: str,
) -> None:
    """One sampling trial: `fid_images` images from the checkpoint (`model`, an
    `ecar.tracking.RegisteredExport` as a dict) under the trial's schedule, scored and logged as a
    child run; with a registered model, the scores are also that model's metrics."""
    from ray import tune

    from ecar.evaluation.evaluate import evaluate_checkpoint
    from ecar.tracking import RegisteredExport, finish_run, log_metrics, open_run

    checkpoint = RegisteredExport(**model)
    overrides = trial_overrides(trial_space)
    items = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    trial_id = tune.get_context().get_trial_id()
    tags = {
        "ecar.sweep": sweep_run,
        TRIAL_TAG: trial_id,
        "ecar.checkpoint_uri": checkpoint.export_uri,
        "ecar.trial_overrides": json.dumps(overrides),
    }
    if checkpoint.model_uri:
        tags["ecar.model_uri"] = checkpoint.model_uri
    run_id, _ = open_run(
        Config.from_dict(base).override(items),
        tracking_uri,
        f"{sweep_run}-{trial_id}",
        "evaluate",
        tags=tags,
        parent_run_id=parent_run_id,
        params=overrides,
    )
    try:
        metrics = evaluate_checkpoint(checkpoint.export_uri, fid_images, items, split, latency_batches)
    except BaseException:
        finish_run(tracking_uri, run_id, status="FAILED")
        raise
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    log_metrics(tracking_uri, run_id, numbers, 0, model_id=checkpoint.model_id or None)
    finish_run(tracking_uri, run_id)
    tune.report(numbers)


# ----- on the driver --------------------------------------------------------------------------
def _check_tracking_reach(tracking_uri: str) -> None:
    """Trials on other nodes cannot write to this machine's SQLite file (nor to a server on its
    loopback): a multi-node cluster needs a tracking server every node reaches."""
    import ray

    from ecar.tracking import redact

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) > 1 and not tracking_uri.startswith(("http://", "https://")):
        raise ConfigError(
            f"tracking.tracking_uri: {redact(tracking_uri)} lives on this machine, but the Ray cluster has "
            f"{len(nodes)} nodes; set MLFLOW_TRACKING_URI or tracking.tracking_uri to an MLflow server"
        )


@contextlib.contextmanager
def _writable_tracking(tracking_uri: str, parallel: bool) -> Iterator[str]:
    """The URI trials write to: a loopback server over the SQLite store when trials run in
    parallel, else the store itself."""
    if parallel and tracking_uri.startswith("sqlite:///"):
        from ecar.tracking import local_tracking_server

        database = Path(tracking_uri.removeprefix("sqlite:///"))
        with local_tracking_server(tracking_uri, str(database.parent / "mlartifacts")) as url:
            log.info("trials run in parallel: MLflow server %s over %s", url, tracking_uri)
            yield url
    else:
        yield tracking_uri


def _parent_run(
    tracking_uri: str, name: str, sweep: Sweep, base: Config, space: Space, options: SweepOptions
) -> tuple[str, bool]:
    """(run id, resumed): the sweep's parent run, found again by name when the sweep resumes."""
    from ecar.tracking import log_text, open_run

    params = {
        "sweep": sweep.name,
        "kind": sweep.kind,
        "preset": base.preset,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "grid_size": grid_size(space),
        "num_samples": options.num_samples,
        "max_concurrent_trials": options.max_concurrent_trials,
        "smoke_test": options.smoke_test,
        "fid_images": options.fid_images,
        "overrides": json.dumps(list(options.overrides)),
        "manifest_uri": options.manifest_uri or base.data.manifest_uri,
        "checkpoint_uri": options.checkpoint_uri,
        "alias": options.alias,
    }
    run_id, resumed = open_run(
        base,
        tracking_uri,
        name,
        "tune",
        tags={SWEEP_RUN_TAG: name, "ecar.sweep": sweep.name, "ecar.sweep_kind": sweep.kind},
        params=params,
        note=f"sweep {sweep.name}: {sweep.description}",
    )
    if not resumed:
        log_text(tracking_uri, run_id, json.dumps(space, indent=2, default=repr), "search_space.json")
    return run_id, resumed


def _smoke_base(sweep: Sweep, base: Config, manifest_uri: str, overrides: list[str]) -> tuple[Config, str]:
    """A smoke test's config and data: tiny settings (the user's own overrides still win), and
    synthetic latents of the preset's shape under the storage root when no data set is given."""
    config = base.override(SMOKE_OVERRIDES).override(overrides)
    if not manifest_uri and not config.data.manifest_uri:
        from ecar.train.synthetic import write_synthetic_latents

        model = config.model
        manifest_uri = storage.join(config.storage.root, "smoke-latents")
        if not storage.exists(storage.join(manifest_uri, "manifest.json"), config.storage):
            write_synthetic_latents(
                manifest_uri,
                config.storage,
                rows=128,
                shape=(model.latent_channels, model.latent_size, model.latent_size),
                shards=2,
                num_classes=model.num_classes,
                test_rows=32,
            )
    return config, manifest_uri or config.data.manifest_uri


def run_sweep(sweep: Sweep, options: SweepOptions) -> SweepResult:
    """Validate, then run `sweep` on Ray Tune and write its report (see the module docstring)."""
    from ecar.export import read_config
    from ecar.tracking import is_model_uri, resolve_export

    if sweep.kind == "sample":
        if not options.checkpoint_uri:
            raise ConfigError(
                f"sweep {sweep.name} varies the sampling schedule of a trained model: pass --checkpoint (an "
                "exported checkpoint, e.g. outputs/quickstart/runs/quickstart/export, or models:/NAME@ALIAS)"
            )
        if options.alias:
            raise ConfigError("--alias: a sampling sweep compares schedules of one model; alias it with `ecar alias`")
        if is_model_uri(options.checkpoint_uri):
            found = resolve_export(
                options.checkpoint_uri, _tracking_base(options, Config().override(_store_keys(options)))
            )
            options = dataclasses.replace(options, checkpoint_uri=found.export_uri)
        base, space, _ = resolve(sweep, overrides=list(options.overrides), base=read_config(options.checkpoint_uri))
    else:
        base, space, _ = resolve(sweep, options.smoke_test, list(options.overrides))
    manifest_uri = options.manifest_uri
    num_samples = options.num_samples
    if options.smoke_test:
        space, num_samples = smoke_space(space)
        if sweep.kind == "train":
            base, manifest_uri = _smoke_base(sweep, base, manifest_uri, list(options.overrides))
    name = options.name or f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Trials run in other processes (and Tune may move them into their own folders): local
    # paths must not be relative. Tune's chdir into the trial folder is off for the same reason.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    base = storage.with_absolute_root(base)
    manifest_uri = storage.absolute(manifest_uri)
    options = dataclasses.replace(options, checkpoint_uri=storage.absolute(options.checkpoint_uri))
    if sweep.kind == "train":
        return _run_training(sweep, options, base, space, num_samples, name, manifest_uri or base.data.manifest_uri)
    return _run_sampling(sweep, options, base, space, num_samples, name)


def _tracking_base(options: SweepOptions, base: Config) -> str:
    from ecar.tracking import resolve_tracking_uri

    return options.tracking_uri or resolve_tracking_uri(base)


def _store_keys(options: SweepOptions) -> list[str]:
    """The overrides that decide where the tracking store is (before a checkpoint's config is read)."""
    return [item for item in options.overrides if item.startswith(("storage.", "tracking."))]


def _run_training(
    sweep: Sweep, options: SweepOptions, base: Config, space: Space, num_samples: int, name: str, manifest_uri: str
) -> SweepResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from ecar.runtime import init_ray
    from ecar.train.preflight import preflight

    base = base.override({"data.manifest_uri": manifest_uri})
    if sweep.metric == "fid" and not options.fid_images:
        log.warning("sweep %s ranks by FID, but --fid-images is 0: ranking by val_loss instead", sweep.name)
    tracking_uri = _tracking_base(options, base)
    source = preflight(base, manifest_uri, tracking_uri)
    if not source.val_rows:
        raise ConfigError(
            f"data.val_split: a training sweep ranks trials by the held-out loss, but {manifest_uri} "
            f"has no {base.data.val_split!r} split (or train.val_rows is 0)"
        )
    train = base.train
    interval = train.eval_every or train.checkpoint_every
    scheduler = None
    if sweep.early_stopping:
        scheduler = ASHAScheduler(
            time_attr="step",
            metric="val_loss",
            mode="min",
            max_t=train.steps,
            grace_period=min(options.grace_period or interval, train.steps),
            reduction_factor=options.reduction_factor,
            stop_last_trials=False,
        )
    else:
        log.info("sweep %s: no early stopping (its trials' held-out losses are not comparable)", sweep.name)
    init_ray(options.address)
    _check_tracking_reach(tracking_uri)
    parallel = options.max_concurrent_trials > 1
    with _writable_tracking(tracking_uri, parallel) as writer:
        parent_run_id, resumed = _parent_run(writer, name, sweep, base, space, options)
        log.info("%s sweep %s: MLflow parent run %s", "resuming" if resumed else "starting", name, parent_run_id)
        trainable = tune.with_parameters(
            training_trial,
            base=base.to_dict(),
            source=dataclasses.asdict(source),
            tracking_uri=writer,
            parent_run_id=parent_run_id,
            sweep_run=name,
            fid_images=options.fid_images,
        )
        # The trial itself only drives the trainer (its workers ask for their own CPUs). It holds
        # no CPU at all: even 0.01 leaves 0.99 of a small cluster's last CPU, and Ray Data's
        # 1-CPU read tasks for the trial's own workers never start. The FID sampling it runs at
        # the end happens after the workers are gone. (Tune takes CPU 0 along with memory.)
        trainable = tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_MEMORY_BYTES})
        results = _fit(trainable, space, num_samples, scheduler, options, base, name)
        return _finish(sweep, options, base, name, tracking_uri, writer, parent_run_id, results, max_step=train.steps)


def _run_sampling(
    sweep: Sweep, options: SweepOptions, base: Config, space: Space, num_samples: int, name: str
) -> SweepResult:
    from ray import tune

    from ecar.runtime import init_ray
    from ecar.tracking import find_registered

    tracking_uri = _tracking_base(options, base)
    fid_images = options.fid_images or (32 if options.smoke_test else 1000)
    init_ray(options.address)
    _check_tracking_reach(tracking_uri)
    with _writable_tracking(tracking_uri, options.max_concurrent_trials > 1) as writer:
        parent_run_id, _ = _parent_run(
            writer, name, sweep, base, space, dataclasses.replace(options, fid_images=fid_images)
        )
        trainable = tune.with_parameters(
            sampling_trial,
            base=base.to_dict(),
            model=dataclasses.asdict(find_registered(writer, options.checkpoint_uri)),
            tracking_uri=writer,
            parent_run_id=parent_run_id,
            sweep_run=name,
            fid_images=fid_images,
            latency_batches=tuple(options.latency_batches),
            split=base.data.val_split,
        )
        trainable = tune.with_resources(trainable, {"CPU": 1.0})
        results = _fit(trainable, space, num_samples, None, options, base, name)
        return _finish(sweep, options, base, name, tracking_uri, writer, parent_run_id, results, max_step=None)


def _fit(trainable, space: Space, num_samples: int, scheduler, options: SweepOptions, base: Config, name: str):
    from ray import tune

    storage_path, filesystem = storage.ray_storage(storage.join(base.storage.root, "tune"), base.storage)
    experiment_path = f"{storage_path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
        log.info("restoring the Tune experiment %s: finished trials are kept", experiment_path)
        tuner = tune.Tuner.restore(
            experiment_path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            param_space=space,
            storage_filesystem=filesystem,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                num_samples=num_samples, scheduler=scheduler, max_concurrent_trials=options.max_concurrent_trials
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    return tuner.fit()


def _finish(
    sweep: Sweep,
    options: SweepOptions,
    base: Config,
    name: str,
    tracking_uri: str,
    writer: str,
    parent_run_id: str,
    results,
    max_step: int | None,
) -> SweepResult:
    """Settle every child run's status (a trial ASHA stopped was killed mid-run), rank the
    trials, point the alias at the best trial's model, write the report into the parent run and
    close it."""
    from ecar.report import build_report, load_runs, log_report
    from ecar.tracking import MODEL_URI_TAG, client, log_metrics, set_alias, set_tags

    mlflow_client = client(writer)
    parent = mlflow_client.get_run(parent_run_id)
    children = {
        run.data.tags.get(TRIAL_TAG): run
        for run in mlflow_client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
            max_results=1000,
        )
    }
    trials = []
    for result in results:
        trial_id = _trial_id(result, children)
        metrics = dict(result.metrics or {})
        step = metrics.get("step")
        stopped = result.error is None and max_step is not None and (step is None or step < max_step)
        status = "FAILED" if result.error is not None else ("KILLED" if stopped else "FINISHED")
        run = children.get(trial_id)
        if run is not None:
            set_tags(writer, run.info.run_id, {STOPPED_EARLY_TAG: str(stopped).lower()})
            if stopped:
                # what it stopped at, and what it would cost to sample: it still belongs on the Pareto plot
                set_tags(writer, run.info.run_id, {"ecar.stopped_at_step": str(step)})
                log_metrics(
                    writer, run.info.run_id, {"steps_trained": step or 0, **_sampling_cost(base, result.config)}
                )
            if run.info.status != status:
                mlflow_client.set_terminated(run.info.run_id, status=status)
        trials.append(
            {
                "trial_id": trial_id,
                "status": status,
                "stopped_early": stopped,
                "mlflow_run_id": run.info.run_id if run else "",
                "model_uri": run.data.tags.get(MODEL_URI_TAG, "") if run else "",
                "config": result.config,
                "error": str(result.error) if result.error else "",
                **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            }
        )
    out = SweepResult(
        name=name,
        parent_run_id=parent_run_id,
        tracking_uri=tracking_uri,
        experiment=base.tracking.experiment_name,
        trials=trials,
    )
    ranked = [t for t in trials if isinstance(t.get(sweep.metric), (int, float))]
    counts = {status: sum(t["status"] == status for t in trials) for status in ("FINISHED", "KILLED", "FAILED")}
    figures = {f"trials_{status.lower()}": count for status, count in counts.items()}
    if ranked:
        best = (min if sweep.mode == "min" else max)(ranked, key=lambda t: t[sweep.metric])
        out.best = best
        figures[f"best_{sweep.metric}"] = best[sweep.metric]
        set_tags(writer, parent_run_id, {"ecar.best_trial": best["trial_id"], "ecar.best_model_uri": best["model_uri"]})
        if options.alias and best["model_uri"]:
            set_alias(writer, best["model_uri"], options.alias)
            log.info("sweep %s: %s@%s -> best trial %s", name, best["model_uri"], options.alias, best["trial_id"])
    if options.alias and not ranked:
        log.warning("sweep %s: no trial logged %s, so alias %s was not set", name, sweep.metric, options.alias)
    log_metrics(writer, parent_run_id, figures)
    quality = sweep.metric if any(sweep.metric in t for t in trials) else "val_loss"
    report_dir = Path(options.report_dir or _default_report_dir(base, name))
    try:
        report = build_report(
            load_runs(writer, base.tracking.experiment_name, parent_run_id),
            report_dir,
            quality,
            sweep.mode,
            title=f"sweep {name}",
        )
        log_report(writer, parent_run_id, report)
        out.report_files = {k: str(v) for k, v in report.files.items()}
        out.report_markdown = report.markdown
    except ValueError as error:  # no trial produced the metric: say so, keep the runs
        log.warning("no report for sweep %s: %s", name, error)
    mlflow_client.set_terminated(parent_run_id, status="FAILED" if counts["FAILED"] == len(trials) else "FINISHED")
    return out


def _sampling_cost(base: Config, trial_space: dict[str, Any] | None) -> dict[str, float]:
    from ecar.evaluation.evaluate import sampling_cost

    return sampling_cost(base.override(trial_overrides(trial_space or {})))


def _trial_id(result, children: dict[str, Any]) -> str:
    """The Tune trial id of a Result: Tune adds it to every reported result; a trial that
    failed before its first report is matched to its child run by its overrides."""
    metrics = result.metrics or {}
    if "trial_id" in metrics:
        return str(metrics["trial_id"])
    wanted = json.dumps(trial_overrides(result.config or {}))
    return next((trial for trial, run in children.items() if run.data.tags.get("ecar.trial_overrides") == wanted), "")


def _default_report_dir(base: Config, name: str) -> str:
    root = base.storage.root
    return str(Path(root if not storage.is_remote(root) else "outputs") / "sweeps" / name / "report")
