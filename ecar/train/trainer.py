"""Ray Train adapter: a TorchTrainer whose workers stream their shard of the latent data set
into the plain-torch loop over a DeepSpeed engine, checkpoint through `ray.train.report`, and
resume from the latest checkpoint (after a worker failure, or when a run is re-launched under
the same name).

    run folder  {storage.root}/runs/{name}/   checkpoint_00001000/ ...  (Ray Train's layout)
                {storage.root}/runs/{name}/export/   consolidated EMA (ecar.export format)
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ecar import storage
from ecar.config import Config, worker_bounds
from ecar.log import get_logger

log = get_logger(__name__)

# A worker returns {STOPPED_KEY: reason} (and reports it) when it ended the run on purpose (a
# non-finite loss); the driver turns it back into the error instead of a finished run.
STOPPED_KEY = "stopped"


@dataclass(frozen=True)
class ManifestSummary:
    """What the workers need to know about the latent data set: its manifest, read and checked
    once per launch (preflight) before any worker starts."""

    manifest_uri: str
    latent_shape: tuple[int, int, int]  # (C, H, W)
    latent_scale: float  # stored latents are scale * E(x); decode latents / scale
    num_rows: int
    class_names: tuple[str, ...] = ()
    val_split: str = ""  # held-out split for the validation loss ("": none)
    val_rows: int = 0  # how many of its rows (an equal share per worker)
    manifest: dict[str, Any] = dataclasses.field(default_factory=dict)  # as read: nobody reads it again
    manifest_sha256: str = ""  # `ecar.data.manifest.content_sha256`: saved with checkpoints, checked on resume

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ManifestSummary:
        """The inverse of dataclasses.asdict (JSON-safe through Ray: tuples come back as lists)."""
        return cls(
            **{**values, "latent_shape": tuple(values["latent_shape"]), "class_names": tuple(values["class_names"])}
        )


def run_uri(config: Config, name: str) -> str:
    return storage.join(config.storage.root, "runs", name)


def export_uri(config: Config, name: str) -> str:
    return storage.join(run_uri(config, name), "export")


# ----- inside each worker ---------------------------------------------------------------------
def train_worker(arguments: dict[str, Any]) -> dict[str, str] | None:
    """The per-worker function of the TorchTrainer (every rank runs it). Returns
    `{STOPPED_KEY: reason}` when the run stopped on purpose (rank 0's value reaches the driver as
    the result's return value; the result's metrics are only the last checkpoint's)."""
    import ray.train
    import ray.train.torch

    from ecar.data.reader import torch_batches
    from ecar.models import build_model
    from ecar.tracking import RankZeroTracker
    from ecar.train.ema import EMA
    from ecar.train.engine import DeepSpeedBackend
    from ecar.train.loop import NonFiniteLossError, train
    from ecar.train.streams import worker_epochs

    config = Config.from_dict(arguments["config"])
    data = ManifestSummary.from_dict(arguments["data"])
    if config.train.torch_threads:
        torch.set_num_threads(config.train.torch_threads)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device() if config.train.use_gpu else torch.device("cpu")

    tracker = RankZeroTracker(arguments["tracking_uri"], arguments["mlflow_run_id"], rank)
    tracker.start_system_metrics()
    tracker.set_phase("building the model and the DeepSpeed engine")
    torch.manual_seed(config.train.seed)  # every rank builds the same initial weights
    backend = DeepSpeedBackend(build_model(config), config, device)
    ema = EMA(backend.ema_sources(), config.train.ema_decay)
    events = RunEvents(config, data, backend, ema, arguments, rank, context.get_world_size(), tracker)
    state = events.restore(ray.train.get_checkpoint())
    tracker.set_phase(f"DeepSpeed ready; reading the first batches and running step {state.step + 1}")

    def open_stream(shard, stream: int, epoch: int):
        # Seeded by epoch and stream: the same order and mirror choices whenever an epoch is
        # replayed after a restart, at any world size; other ones in the next epoch.
        for batch in torch_batches(
            shard,
            config.train.micro_batch_size,
            config.data.shuffle_buffer_rows,
            config.train.seed,
            epoch=epoch,
            rank=stream,
            prefetch_batches=2,
        ):
            yield batch["latent"].reshape(-1, *data.latent_shape), batch["label"]

    open_epoch = worker_epochs(rank, context.get_world_size(), config.train, open_stream)
    events.memory.reset()  # from here on: training steps only, not model building and DeepSpeed's setup
    try:
        train(backend, config, open_epoch, state, ema, events)
    except NonFiniteLossError as error:
        # Every rank raises it at the same step (the check is a collective). Raised on, it would
        # count as a worker failure, and Ray Train would replay the same batches with the same
        # seeds from the same checkpoint into the same NaN, max_failures times (forever at -1).
        events.stop(state, str(error))
        return {STOPPED_KEY: str(error)}
    events.finish(state)
    return None


class RunEvents:
    """A worker's side of the run outside the loop: resume from a checkpoint, then after each
    step do what the loop's `Cadence` says is due (log, preview, evaluate, checkpoint and report
    to Ray Train), and at the end log peak memory and export the EMA weights. Every rank calls
    each method at the same steps: previews, evaluation and reports are collectives."""

    def __init__(
        self,
        config: Config,
        data: ManifestSummary,
        backend: Any,
        ema: Any,
        arguments: dict[str, Any],
        rank: int,
        world_size: int,
        tracker: Any,
    ) -> None:
        from ecar.train import checkpoint as ckpt
        from ecar.train.monitors import PeakMemory, Preview, Validator

        self.config, self.data, self.backend, self.ema, self.rank = config, data, backend, ema, rank
        self.export_uri, self.mlflow_run_id = arguments["export_uri"], arguments["mlflow_run_id"]
        self.tracker = tracker
        self.info = ckpt.RunInfo(
            world_size=world_size,
            zero_stage=config.train.zero_stage,
            manifest_uri=data.manifest_uri,
            mlflow_run_id=self.mlflow_run_id,
            manifest_sha256=data.manifest_sha256,
        )
        # an elastic run also checkpoints its optimizer whole, for a restart at another world size
        self.elastic = config.train.min_workers > 0
        self.memory = PeakMemory()
        self.preview = Preview(config, data, rank) if rank == 0 else None
        self.validator = Validator(config, data, rank, world_size) if data.val_rows else None
        self.last_metrics: dict[str, float] = {}

    def restore(self, checkpoint: Any) -> Any:
        """The TrainState to start from: fresh, or the latest checkpoint's (weights, optimizer,
        EMA, step and data position restored)."""
        from ecar.train import checkpoint as ckpt
        from ecar.train.loop import TrainState

        if checkpoint is None:
            return TrainState()
        from ecar.train.streams import rescale_position

        with checkpoint.as_directory() as directory:
            directory = Path(directory)
            state, saved = ckpt.read_state(directory)
            if ckpt.needs_repartition(saved, self.info.world_size, self.config.train.zero_stage, directory):
                self.backend.load_whole_state(ckpt.read_whole_state(directory))
                state = rescale_position(state, self.config.train, saved.world_size, self.info.world_size)
            else:
                self.backend.load(directory)
            self.ema.load_state_dict(self.backend.pieces_of(ckpt.read_ema(directory)))
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d) with %d workers (%d wrote it)",
            checkpoint.path,
            state.step,
            state.epoch,
            state.batches_in_epoch,
            self.info.world_size,
            saved.world_size,
        )
        self.tracker.log_metrics(state.step, {"resumed_at_step": float(state.step)})
        self.tracker.log_text(f"{checkpoint.path}\n", f"resumes/step_{state.step:08d}.txt")
        return state

    def __call__(self, state: Any, due: Any, metrics: dict[str, float] | None) -> None:
        import ray.train

        from ecar.train import checkpoint as ckpt

        if metrics is not None:
            self.last_metrics.update(metrics)
            self.tracker.log_metrics(state.step, metrics)
        self.memory.sample()
        if due.preview:
            whole = self.backend.gather(self.ema.shadow)  # a collective: every rank takes part
            if self.preview is not None:
                self.tracker.log_image(self.preview.figure(whole, state.step), "samples", state.step)
        if due.evaluate and self.validator is not None:
            values = self.validator(self.backend)  # a collective under ZeRO-3: every rank takes part
            self.last_metrics.update(values)
            self.tracker.log_metrics(state.step, values)
        # Every report carries the validation metrics, so Tune's scheduler sees them at each one.
        report = {"step": state.step, **{k: v for k, v in self.last_metrics.items() if k.startswith(("loss", "val_"))}}
        if due.checkpoint:
            # collectives: the EMA and (elastic runs) the optimizer gathered whole onto rank 0
            ema = self.backend.gather(self.ema.shadow)
            whole = self.backend.whole_state() if self.elastic else None
            with tempfile.TemporaryDirectory(prefix="ecar-ckpt-") as directory:
                self.backend.save(Path(directory))
                ckpt.save_local(Path(directory), state, ema, whole, self.info, self.config, self.rank)
                ray.train.report(
                    report,
                    checkpoint=ray.train.Checkpoint.from_directory(directory),
                    checkpoint_dir_name=f"checkpoint_{state.step:08d}",
                )
        elif due.evaluate:
            ray.train.report(report)  # a barrier too: every rank reports at the same steps
        self.memory.reset()

    def stop(self, state: Any, reason: str) -> None:
        """End the run without an export, telling the driver why (see `STOPPED_KEY`)."""
        import ray.train

        self.tracker.log_text(f"{reason}\n", "stopped.txt")
        self.tracker.close()  # the system metrics stop here too
        ray.train.report({"step": state.step, STOPPED_KEY: reason})

    def finish(self, state: Any) -> None:
        """Peak memory to MLflow (beside the system metrics, which stop here), then the
        consolidated EMA weights exported by rank 0."""
        from ecar.export import save_exported
        from ecar.models import build_model

        device = self.backend.device
        self.tracker.log_metrics(
            state.step, self.memory.metrics(device, self.backend.state_bytes(list(self.ema.shadow.values())))
        )
        self.tracker.close()
        whole = self.backend.gather(self.ema.shadow)
        if self.rank == 0:
            full = build_model(self.config).state_dict()
            full.update(whole)
            save_exported(
                full,
                self.config,
                self.export_uri,
                latent_scale=self.data.latent_scale,
                manifest_uri=self.data.manifest_uri,
                step=state.step,
                mlflow_run_id=self.mlflow_run_id,
            )
            log.info("exported the EMA weights at step %d to %s", state.step, self.export_uri)


# ----- on the driver --------------------------------------------------------------------------
@dataclass(frozen=True)
class FitResult:
    name: str
    run_uri: str
    export_uri: str
    mlflow_run_id: str
    checkpoint_uri: str | None
    metrics: dict[str, Any]
    model_uri: str = ""  # the registered model version of the export (models:/NAME/VERSION)


def worker_env(config: Config) -> dict[str, str]:
    """Storage settings the workers need that the config, not the environment, decided."""
    env = {}
    if config.storage.endpoint_url:
        env["AWS_ENDPOINT_URL"] = config.storage.endpoint_url
    if config.storage.region:
        env["AWS_REGION"] = config.storage.region
    return env


def fit(
    config: Config,
    source: ManifestSummary,
    dataset: Any,
    name: str,
    tracking_uri: str | None = None,
    parent_run_id: str = "",
    tags: dict[str, str] | None = None,
    callbacks: list[Any] | None = None,
) -> FitResult:
    """Train `config` on `dataset` (a Ray Dataset with columns `latent`, `label`) as run `name`.

    A run whose name already has checkpoints under the storage root resumes from the latest one
    and keeps its MLflow run. Ray must already be initialised. `parent_run_id` makes the MLflow
    run a child (a sweep's trial); `callbacks` go to Ray Train's RunConfig (e.g. Tune's
    TuneReportCallback, which forwards every `ray.train.report` to the trial). The export
    becomes the next version of the config's registered model (`ecar.tracking.register_export`).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from ecar.progress import training_progress
    from ecar.tracking import finish_run, open_run, redact, register_export, resolve_tracking_uri
    from ecar.train.streams import StreamSplit, datasets_for, stream_count

    tracking_uri = tracking_uri or resolve_tracking_uri(config)
    config = storage.with_absolute_root(config)
    mlflow_run_id, resumed = open_run(
        config,
        tracking_uri,
        name,
        "train",
        tags={"manifest_uri": source.manifest_uri, "run_uri": run_uri(config, name), **(tags or {})},
        parent_run_id=parent_run_id,
        note=f"E-CAR training run {name} ({config.preset})",
    )
    log.info("%s MLflow run %s at %s", "resuming" if resumed else "started", mlflow_run_id, redact(tracking_uri))
    train = config.train
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = 1
    options = ray.train.DataConfig.default_ingest_options()
    # Block order, and so each stream's rows, is then a function of the data alone: a replayed
    # epoch after a restart sees the same batches.
    options.preserve_order = True
    low, high = worker_bounds(train)
    storage_path, filesystem = storage.ray_storage(storage.join(config.storage.root, "runs"), config.storage)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config.to_dict(),
            "data": dataclasses.asdict(source),
            "tracking_uri": tracking_uri,
            "mlflow_run_id": mlflow_run_id,
            "export_uri": export_uri(config, name),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=(low, high) if low < high else high, use_gpu=train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.num_to_keep),
            worker_runtime_env={"env_vars": worker_env(config)} if worker_env(config) else None,
            callbacks=callbacks,
        ),
        datasets=datasets_for(dataset, train),
        dataset_config=StreamSplit(stream_count(train), options),
    )
    log.info(
        "starting %s training worker(s) (Ray Train, DeepSpeed ZeRO-%d, %g CPU each) for %d steps",
        f"{low}-{high}" if low < high else high,
        train.zero_stage,
        train.cpus_per_worker,
        train.steps,
    )
    uri = export_uri(config, name)
    try:
        with training_progress(tracking_uri, mlflow_run_id, train.steps, f"train {name}"):
            result = trainer.fit()
        stopped = (result.return_value or {}).get(STOPPED_KEY)
        if stopped:  # ended on purpose, without an export
            from ecar.train.loop import NonFiniteLossError

            raise NonFiniteLossError(stopped)
        registered = register_export(tracking_uri, mlflow_run_id, uri, config)
    except BaseException:
        finish_run(tracking_uri, mlflow_run_id, status="FAILED")
        raise
    log.info("registered the export as %s", registered.model_uri)
    finish_run(tracking_uri, mlflow_run_id, export_uri=uri)
    return FitResult(
        name=name,
        run_uri=run_uri(config, name),
        export_uri=uri,
        mlflow_run_id=mlflow_run_id,
        checkpoint_uri=result.checkpoint.path if result.checkpoint else None,
        metrics=dict(result.metrics or {}),
        model_uri=registered.model_uri,
    )
