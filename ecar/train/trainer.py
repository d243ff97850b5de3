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
from ecar.config import Config
from ecar.log import get_logger

log = get_logger(__name__)

DATASET_NAME = "train"
PREVIEW_SEED = 1234  # the same noise at every preview, so grids compare across steps


@dataclass(frozen=True)
class ManifestSummary:
    """What the workers need to know about the latent data set: its manifest, read and checked
    once per launch (preflight) before any worker starts."""

    manifest_uri: str
    latent_shape: tuple[int, int, int]  # (C, H, W)
    latent_scale: float  # stored latents are scale * E(x); decode latents / scale
    num_rows: int
    class_names: tuple[str, ...] = ()
    tokenizer_uri: str = ""  # a trained tokenizer for decoding previews, if the data names one
    val_split: str = ""  # held-out split for the validation loss ("": none)
    val_rows: int = 0  # how many of its rows (an equal share per worker)


def run_uri(config: Config, name: str) -> str:
    return storage.join(config.storage.root, "runs", name)


def export_uri(config: Config, name: str) -> str:
    return storage.join(run_uri(config, name), "export")


# ----- inside each worker ---------------------------------------------------------------------
def train_worker(arguments: dict[str, Any]) -> None:
    """The per-worker function of the TorchTrainer (every rank runs it)."""
    import ray.train
    import ray.train.torch

    from ecar.data.reader import torch_batches
    from ecar.models import build_model
    from ecar.train import checkpoint as ckpt
    from ecar.train.ema import EMA
    from ecar.train.engine import DeepSpeedBackend
    from ecar.train.loop import TrainState, train
    from ecar.train.tracking import RankZeroTracker

    config = Config.from_dict(arguments["config"])
    if config.train.torch_threads:
        torch.set_num_threads(config.train.torch_threads)
    source = ManifestSummary(**{**arguments["source"], "latent_shape": tuple(arguments["source"]["latent_shape"]),
                             "class_names": tuple(arguments["source"]["class_names"])})
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if config.train.use_gpu else torch.device("cpu")
    memory = PeakMemory()
    torch.manual_seed(config.train.seed)  # every rank builds the same initial weights
    model = build_model(config)
    backend = DeepSpeedBackend(model, config, device)
    ema = EMA(backend.ema_sources(), config.train.ema_decay)
    tracker = RankZeroTracker(arguments["tracking_uri"], arguments["mlflow_run_id"], rank)
    info = ckpt.RunInfo(world_size=world_size, zero_stage=config.train.zero_stage,
                        manifest_uri=source.manifest_uri, mlflow_run_id=arguments["mlflow_run_id"])

    state = TrainState()
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            directory = Path(directory)
            state, saved = ckpt.read_state(directory)
            ckpt.check_compatible(saved, world_size, config.train.zero_stage)
            backend.load(directory)
            ema.load_state_dict(ckpt.read_ema(directory, config.train.zero_stage, rank))
        log.info("resumed from %s at step %d (epoch %d, batch %d)", restored.path, state.step,
                 state.epoch, state.batches_in_epoch)
        tracker.log_metrics(state.step, {"resumed_at_step": float(state.step)})
        tracker.log_text(f"{restored.path}\n", f"resumes/step_{state.step:08d}.txt")

    shard = ray.train.get_dataset_shard(DATASET_NAME)
    shape = source.latent_shape

    def open_epoch(epoch: int):
        # Seeded by epoch: the same order and mirror choices whenever an epoch is replayed after
        # a restart, other ones in the next epoch.
        for batch in torch_batches(shard, config.train.micro_batch_size, config.data.shuffle_buffer_rows,
                                   config.train.seed, epoch=epoch, rank=rank, prefetch_batches=2):
            yield batch["latent"].reshape(-1, *shape), batch["label"]

    preview = Preview(config, source, rank) if rank == 0 else None
    validator = Validator(config, source, rank, world_size) if source.val_rows else None
    last_metrics: dict[str, float] = {}

    def on_step(state: TrainState, metrics: dict[str, float] | None) -> None:
        final = state.step == config.train.steps
        if metrics is not None:
            last_metrics.update(metrics)
            tracker.log_metrics(state.step, metrics)
        memory.sample()
        if state.step % config.train.sample_every == 0:
            whole = backend.gather(ema.shadow)  # a collective: every rank takes part
            if preview is not None:
                tracker.log_figure(preview.figure(whole, state.step), f"samples/step_{state.step:08d}.png")
        save = state.step % config.train.checkpoint_every == 0 or final
        validate = bool(config.train.eval_every) and state.step % config.train.eval_every == 0
        if validator is not None and (save or validate):
            values = validator(backend)  # a collective under ZeRO-3: every rank takes part
            last_metrics.update(values)
            tracker.log_metrics(state.step, values)
        # Every report carries the validation metrics, so Tune's scheduler sees them at each one.
        report = {"step": state.step, **{k: v for k, v in last_metrics.items() if k.startswith(("loss", "val_"))}}
        if save:
            with tempfile.TemporaryDirectory(prefix="ecar-ckpt-") as directory:
                backend.save(Path(directory))
                ckpt.save_local(Path(directory), state, ema.state_dict(), info, config, rank)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory),
                                 checkpoint_dir_name=f"checkpoint_{state.step:08d}")
        elif validate:
            ray.train.report(report)  # a barrier too: every rank reports at the same steps
        memory.reset()

    memory.reset()  # from here on: training steps only, not model building and DeepSpeed's setup
    train(backend, config, open_epoch, state, ema, on_step)
    tracker.log_metrics(state.step, memory.metrics(device, backend.state_bytes(list(ema.shadow.values()))))

    whole = backend.gather(ema.shadow)
    if rank == 0:
        from ecar.export import save_exported

        full = build_model(config).state_dict()
        full.update(whole)
        uri = arguments["export_uri"]
        save_exported(full, config, uri, latent_scale=source.latent_scale,
                      manifest_uri=source.manifest_uri, step=state.step, mlflow_run_id=arguments["mlflow_run_id"])
        log.info("exported the EMA weights at step %d to %s", state.step, uri)


class Validator:
    """The flow-matching loss (total and per stage) of the current weights on a fixed held-out
    set with fixed noise, so values compare across steps and across trials of a sweep. Each
    rank evaluates its equal slice of the set; the means are averaged over ranks."""

    def __init__(self, config: Config, source: ManifestSummary, rank: int, world_size: int) -> None:
        self.config, self.source, self.rank = config, source, rank
        self.per_rank = source.val_rows // world_size
        self.batch = min(config.train.micro_batch_size, self.per_rank)
        self.data: tuple[torch.Tensor, torch.Tensor] | None = None

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        from ecar.data.reader import read_latents

        if self.data is None:
            latents, labels = read_latents(self.source.manifest_uri, self.source.val_split, self.source.val_rows,
                                           self.config.storage)
            part = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
            self.data = latents[part], labels[part]
        return self.data

    @torch.no_grad()
    def __call__(self, backend) -> dict[str, float]:
        from ecar.seeds import derived_seed

        latents, labels = self._load()
        sums: dict[str, float] = {}
        batches = self.per_rank // self.batch
        for index in range(batches):
            part = slice(index * self.batch, (index + 1) * self.batch)
            generator = torch.Generator(device=backend.device)
            # the same draws at every evaluation: a function of the seed and the row position only
            generator.manual_seed(derived_seed(self.config.train.seed, -1, index, self.rank))
            losses = backend.forward(latents[part].to(backend.device, backend.dtype),
                                     labels[part].to(backend.device), generator)
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value) / batches
        keys = sorted(sums)
        return {f"val_{key}": value for key, value in zip(keys, backend.mean([sums[k] for k in keys]))}


class PeakMemory:
    """Peak resident memory of this worker during training steps, leaving out checkpoint
    writes and previews (which copy whole tensors once in a while): the kernel's high-water mark
    (VmHWM) is read before each of those and reset after them (/proc/self/clear_refs)."""

    def __init__(self) -> None:
        self.baseline = self._read("VmRSS")  # imports done, no model yet
        self.peak = 0

    @staticmethod
    def _read(field: str) -> int:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def sample(self) -> None:
        self.peak = max(self.peak, self._read("VmHWM"))

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass

    def metrics(self, device: torch.device, state_bytes: int) -> dict[str, float]:
        """Maxima over workers, in MiB (a collective: every rank calls it): peak RSS during
        training steps, its growth over the imports-only baseline, and the bytes of the model
        state (weights, optimizer, EMA) the worker holds between steps."""
        import torch.distributed as dist

        self.sample()
        values = torch.tensor([self.peak, self.peak - self.baseline, state_bytes], dtype=torch.float64,
                              device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        metrics = {"peak_rss_mib_max_worker": values[0].item() / 2**20,
                   "peak_rss_growth_mib_max_worker": values[1].item() / 2**20,
                   "model_state_mib_max_worker": values[2].item() / 2**20}
        if device.type == "cuda":
            metrics["peak_gpu_mib_this_worker"] = torch.cuda.max_memory_allocated(device) / 2**20
        return metrics


class Preview:
    """Sample grids on rank 0 from the consolidated EMA weights, through the shared
    `model.generate()`: one sample per class (up to 10), decoded with the data's tokenizer when
    the manifest names one, else the latents' first channels."""

    def __init__(self, config: Config, source: ManifestSummary, rank: int) -> None:
        self.config, self.source = config, source
        self.model = None  # built on first use: a whole copy of the weights on rank 0
        self.decoder = _load_decoder(source.tokenizer_uri, config) if source.tokenizer_uri else None
        classes = min(config.model.num_classes, 10)
        self.labels = torch.arange(classes)

    @torch.no_grad()
    def figure(self, ema_weights: dict[str, torch.Tensor], step: int):
        from ecar.models import build_model
        from ecar.train.tracking import sample_grid

        if self.model is None:
            self.model = build_model(self.config).eval()
        state = self.model.state_dict()
        state.update(ema_weights)
        self.model.load_state_dict(state)
        generator = torch.Generator().manual_seed(PREVIEW_SEED)
        latents = self.model.generate(self.labels, generator=generator)
        if self.decoder is not None:
            images, what = self.decoder(latents / self.source.latent_scale), "decoded by the tokenizer"
        else:
            images, what = latents, "latent channels 0-2 (no tokenizer to decode)"
        return sample_grid(images, self.labels, f"EMA samples, step {step}: {what}",
                           list(self.source.class_names) or None)


def _load_decoder(tokenizer_uri: str, config: Config):
    """The tokenizer's decoder, or None (with a warning) if it cannot be loaded: previews must
    never stop training."""
    try:
        from ecar.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.override({"tokenizer.checkpoint_uri": tokenizer_uri})).model
        return lambda latents: tokenizer.decode(latents).clamp(-1.0, 1.0)
    except Exception as error:  # noqa: BLE001 - any failure falls back to showing latents
        log.warning("previews show latents: cannot load the tokenizer at %s (%s)", tokenizer_uri, error)
        return None


# ----- on the driver --------------------------------------------------------------------------
@dataclass(frozen=True)
class FitResult:
    name: str
    run_uri: str
    export_uri: str
    mlflow_run_id: str
    checkpoint_uri: str | None
    metrics: dict[str, Any]


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
    TuneReportCallback, which forwards every `ray.train.report` to the trial).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from ecar.progress import training_progress
    from ecar.tracking import resolve_tracking_uri
    from ecar.train.tracking import finish_run, open_run

    tracking_uri = tracking_uri or resolve_tracking_uri(config)
    config = storage.with_absolute_root(config)
    mlflow_run_id, resumed = open_run(config, tracking_uri, name, source.manifest_uri, run_uri(config, name),
                                      parent_run_id=parent_run_id, tags=tags)
    log.info("%s MLflow run %s at %s", "resuming" if resumed else "started", mlflow_run_id, tracking_uri)
    train = config.train
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = 1
    options = ray.train.DataConfig.default_ingest_options()
    # Block order, and so each worker's split, is then a function of the data alone: a replayed
    # epoch after a restart sees the same batches.
    options.preserve_order = True
    storage_path, filesystem = storage.ray_storage(storage.join(config.storage.root, "runs"), config.storage)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config.to_dict(),
            "source": dataclasses.asdict(source),
            "tracking_uri": tracking_uri,
            "mlflow_run_id": mlflow_run_id,
            "export_uri": export_uri(config, name),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.num_to_keep),
            worker_runtime_env={"env_vars": worker_env(config)} if worker_env(config) else None,
            callbacks=callbacks,
        ),
        datasets={DATASET_NAME: dataset},
        dataset_config=ray.train.DataConfig(execution_options=options),
    )
    try:
        with training_progress(tracking_uri, mlflow_run_id, train.steps, f"train {name}"):
            result = trainer.fit()
    except BaseException:
        finish_run(tracking_uri, mlflow_run_id, None, status="FAILED")
        raise
    uri = export_uri(config, name)
    finish_run(tracking_uri, mlflow_run_id, uri)
    return FitResult(name=name, run_uri=run_uri(config, name), export_uri=uri, mlflow_run_id=mlflow_run_id,
                     checkpoint_uri=result.checkpoint.path if result.checkpoint else None,
                     metrics=dict(result.metrics or {}))
