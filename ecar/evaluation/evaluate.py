"""Judging a sample set against the data: FID, precision/recall, a classifier score (the
Inception Score's formula with EfficientNet-Lite0, next to the real images' score), and the
cost of sampling.

Reference features and class probabilities of the real images are computed once per (split,
count) and cached on storage next to the latent manifest (`PREFIX/reference/inception-SPLIT-N.npz`,
`classifier-SPLIT-N.npz`), so every evaluation against that data set reuses them; a finished
sample set's Inception features are cached beside it (`SAMPLES/features/inception.npz`). FID on
a few thousand images is biased upwards against FID-50k: compare only numbers measured with the
same N (it is recorded).
"""

from __future__ import annotations

import hashlib
import io
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ecar import storage
from ecar.config import Config, StorageConfig
from ecar.data.manifest import read_manifest
from ecar.data.prepare import read_image_split
from ecar.evaluation.classifier import classifier_probabilities, classifier_score
from ecar.evaluation.fid import feature_statistics, frechet_distance, inception_features
from ecar.evaluation.manifold import precision_recall
from ecar.export import load_exported
from ecar.log import get_logger
from ecar.sampler import read_samples, read_samples_manifest, sampling_config
from ecar.tracking import RegisteredExport

log = get_logger(__name__)


def device_name() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _read_values(uri: str, storage_config: StorageConfig | None) -> tuple[np.ndarray, dict[str, str]] | None:
    """A cached array (float64) and the strings stored beside it, or None where there is no cache."""
    if not storage.exists(uri, storage_config):
        return None
    with np.load(io.BytesIO(storage.read_bytes(uri, storage_config))) as data:
        # caches written before the classifier score held Inception features under "features"
        values = data["values" if "values" in data else "features"].astype(np.float64)
        return values, {key: str(data[key]) for key in data.files if key not in ("values", "features")}


def _write_values(uri: str, values: np.ndarray, storage_config: StorageConfig | None, **strings: str) -> np.ndarray:
    """Cache `values` as float32 and return them as read back (float64), so a first computation
    and every later read of the cache give the same numbers."""
    values = values.astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, values=values, **strings)
    storage.write_bytes_atomic(uri, buffer.getvalue(), storage_config)
    return values.astype(np.float64)


def _cached_reference(
    manifest_uri: str,
    split: str,
    num_images: int,
    config: Config,
    kind: str,
    compute: Callable[[torch.Tensor], np.ndarray],
) -> np.ndarray:
    """`compute` of the first N real images of `split`, cached on storage next to the latent
    manifest as PREFIX/reference/KIND-SPLIT-N.npz (float32)."""
    manifest = read_manifest(manifest_uri, config.storage)
    cache = storage.join(manifest["prefix"], "reference", f"{kind}-{split}-{num_images}.npz")
    cached = _read_values(cache, config.storage)
    if cached is not None:
        log.info("reference %s from the cache %s", kind, cache)
        return cached[0]
    images_uri = manifest["source"]["images_uri"]
    images = read_image_split(images_uri, split, num_images, config)
    if images.shape[0] < num_images:
        raise ValueError(f"{images_uri}/{split} holds {images.shape[0]} images, fewer than the {num_images} asked for")
    values = _write_values(cache, compute(images), config.storage, split=split, images_uri=images_uri)
    log.info("cached reference %s of %d %s images at %s", kind, num_images, split, cache)
    return values


def sample_features(samples_uri: str, images_NCHW: torch.Tensor) -> np.ndarray:
    """Inception features of a finished sample set (its images in [-1, 1]), computed once and
    cached beside it as SAMPLES/features/inception.npz under the hash of its manifest.json (a
    sample set is final once that is written; a set sampled again gets a new manifest), so
    scoring the set again, or FID between two sets, reuses them."""
    key = hashlib.sha256(storage.read_bytes(storage.join(samples_uri, "manifest.json"))).hexdigest()
    cache = storage.join(samples_uri, "features", "inception.npz")
    cached = _read_values(cache, None)
    if cached is not None and cached[1].get("manifest_sha256") == key and len(cached[0]) == len(images_NCHW):
        log.info("sample features from the cache %s", cache)
        return cached[0]
    return _write_values(cache, inception_features(images_NCHW, device=device_name()), None, manifest_sha256=key)


def reference_features(manifest_uri: str, split: str, num_images: int, config: Config) -> np.ndarray:
    """(N, 2048) Inception features of the first N real images of `split`, cached on storage."""
    return _cached_reference(
        manifest_uri,
        split,
        num_images,
        config,
        "inception",
        lambda images: inception_features(images, device=device_name()),
    )


def reference_probabilities(manifest_uri: str, split: str, num_images: int, config: Config) -> np.ndarray:
    """(N, 1000) EfficientNet-Lite0 class probabilities of the same real images, cached likewise."""
    return _cached_reference(
        manifest_uri,
        split,
        num_images,
        config,
        "classifier",
        lambda images: classifier_probabilities(images, device=device_name()),
    )


def classifier_metrics(real_NK: np.ndarray, fake_MK: np.ndarray) -> dict[str, float]:
    """The classifier score of the samples and, for scale, of the real images at the same N."""
    score, spread = classifier_score(fake_MK)
    real_score, real_spread = classifier_score(real_NK)
    return {
        "classifier_score": score,
        "classifier_score_std": spread,
        "real_classifier_score": real_score,
        "real_classifier_score_std": real_spread,
    }


def quality_metrics(real_ND: np.ndarray, fake_MD: np.ndarray, k: int = 3) -> dict[str, float]:
    """FID, precision and recall of generated features against real ones."""
    fid = frechet_distance(*feature_statistics(real_ND), *feature_statistics(fake_MD))
    manifold = precision_recall(torch.from_numpy(real_ND), torch.from_numpy(fake_MD), k)
    return {"fid": fid, **manifold, "real_images": int(real_ND.shape[0]), "fake_images": int(fake_MD.shape[0])}


def images_to_unit(images_NHWC: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(images_NHWC).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def sampling_latency(
    model: torch.nn.Module, config: Config, batch_sizes: tuple[int, ...] = (1, 16), repeats: int = 3
) -> dict[str, float]:
    """Median seconds per image of `generate` at each batch size (after one warm-up call)."""
    device = next(model.parameters()).device
    out: dict[str, float] = {}
    model.generate(
        torch.zeros(1, dtype=torch.long, device=device), config.sampling, steps_per_stage=config.flow.steps_per_stage
    )
    for batch in batch_sizes:
        labels = torch.arange(batch, device=device) % config.model.num_classes
        times = []
        for repeat in range(repeats):
            generator = torch.Generator(device).manual_seed(repeat)
            start = time.perf_counter()
            model.generate(labels, config.sampling, generator, config.flow.steps_per_stage)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / batch)
        out[f"latency_s_per_image_b{batch}"] = statistics.median(times)
    return out


def sampling_cost(config: Config) -> dict[str, float]:
    """FLOPs of one generated image (and of its VAE decode), counted by running the code."""
    from ecar.flops import count

    report = count(config)
    cost = {"sampling_gflops": report.generation_total / 1e9}
    if report.decode is not None:
        cost["decode_gflops"] = report.decode / 1e9
    return cost


def score_images(
    images_NCHW: torch.Tensor,
    manifest_uri: str,
    split: str,
    reference_images: int,
    config: Config,
    model: torch.nn.Module,
    latency_batches: tuple[int, ...],
    features: np.ndarray | None = None,
) -> dict[str, Any]:
    """Quality of generated images in [-1, 1] against the first `reference_images` real images
    of `split` (FID, precision/recall, classifier score), and the cost of sampling them with
    `config` (FLOPs; latency of `model` at `latency_batches`, when given). `features`: the
    images' Inception features where they are known already (else computed here)."""
    real = reference_features(manifest_uri, split, reference_images, config)
    if features is None:
        features = inception_features(images_NCHW, device=device_name())
    metrics: dict[str, Any] = quality_metrics(real, features)
    metrics.update(
        classifier_metrics(
            reference_probabilities(manifest_uri, split, reference_images, config),
            classifier_probabilities(images_NCHW, device=device_name()),
        )
    )
    metrics.update(sampling_cost(config))
    if latency_batches:
        metrics.update(sampling_latency(model, config, latency_batches))
    metrics.update(
        {
            "reference_split": split,
            "steps_per_stage": list(config.flow.steps_per_stage),
            "cfg_scale": config.sampling.cfg_scale,
            "device": device_name(),
        }
    )
    return metrics


def evaluate_samples(
    samples_uri: str,
    manifest_uri: str = "",
    split: str = "test",
    reference_images: int = 0,
    latency_batches: tuple[int, ...] = (1, 16),
) -> dict[str, Any]:
    """Metrics of a finished sampling run (see `ecar sample`) against the latent data set's real
    images: quality (FID, precision, recall) and cost (FLOPs and latency per image)."""
    samples_manifest = read_samples_manifest(samples_uri)
    if not samples_manifest.get("has_images"):
        raise ValueError(
            f"{samples_uri} holds latents only (its checkpoint names no latent manifest, "
            "so there was no tokenizer to decode them)"
        )
    exported = load_exported(samples_manifest["checkpoint_uri"], device_name())
    config = sampling_config(exported.config, samples_manifest["overrides"])
    images = images_to_unit(read_samples(samples_uri, "images")["images"])
    metrics = score_images(
        images,
        manifest_uri or exported.manifest_uri,
        split,
        reference_images or len(images),
        config,
        exported.model,
        latency_batches,
        sample_features(samples_uri, images),
    )
    metrics.update(
        {
            "checkpoint_uri": samples_manifest["checkpoint_uri"],
            "model_uri": samples_manifest.get("model_uri", ""),
            "samples_uri": samples_uri,
        }
    )
    return metrics


def evaluate_checkpoint(
    checkpoint_uri: str,
    num_images: int,
    overrides: list[str] = (),
    split: str = "test",
    latency_batches: tuple[int, ...] = (),
    batch_size: int = 64,
) -> dict[str, Any]:
    """The metrics of `evaluate_samples` for `num_images` generated in this process, without a
    sampling job: for small per-trial evaluations in sweeps. The images are exactly those
    `ecar sample` writes for rows 0..N-1 (same class-balanced labels and per-row seeds)."""
    from ecar.sampler import Shard, ShardSampler, shard_rows, tokenizer_decoder

    sampler = ShardSampler(checkpoint_uri, "", list(overrides), None, batch_size, tokenizer_decoder)
    if sampler.decode is None:
        raise ValueError(
            f"{checkpoint_uri}: the checkpoint names no latent manifest with a tokenizer, so its "
            "samples cannot be decoded into images for FID"
        )
    config = sampler.config
    rows = shard_rows(Shard(0, num_images), None, config.model.num_classes, config.sampling.seed)
    images = images_to_unit(sampler.generate(rows)["images"])
    metrics = score_images(
        images, sampler.exported.manifest_uri, split, num_images, config, sampler.exported.model, latency_batches
    )
    metrics.update({"checkpoint_uri": checkpoint_uri, "samples_uri": ""})
    return metrics


def log_evaluation(
    metrics: dict[str, Any],
    config: Config,
    tracking_uri: str,
    model: RegisteredExport,
    step: int = 0,
    grid=None,
) -> str:
    """Log the numeric metrics (one batch, at the export's training `step`), the schedule and
    the samples URI as tags, and `grid` (a figure of samples) as the image `evaluation`: into
    the training run of `model` when it is on this tracking server, else into a new `evaluate`
    run. With a registered model the metrics are that model's too (its MLflow 3 logged model).
    Returns the run id."""
    from ecar.tracking import MODEL_URI_TAG, finish_run, log_image, log_metrics, open_run, redact, run_exists, set_tags

    run_id = model.run_id
    if run_id and not run_exists(tracking_uri, run_id):
        log.warning("training run %s is not on %s; logging to a new run", run_id, redact(tracking_uri))
        run_id = ""
    created = not run_id
    if created:
        tags = {"ecar.checkpoint_uri": str(metrics["checkpoint_uri"])}
        if model.model_uri:
            tags[MODEL_URI_TAG] = model.model_uri
        run_id, _ = open_run(config, tracking_uri, f"evaluate-{uuid.uuid4().hex[:8]}", "evaluate", tags=tags)
    log_metrics(tracking_uri, run_id, metrics, step, model_id=model.model_id or None)
    set_tags(
        tracking_uri,
        run_id,
        {
            "ecar.eval_samples_uri": str(metrics["samples_uri"]),
            "ecar.eval_schedule": f"steps {metrics['steps_per_stage']} cfg {metrics['cfg_scale']}",
        },
    )
    if grid is not None:
        log_image(tracking_uri, run_id, grid, "evaluation", step)
    if created:
        finish_run(tracking_uri, run_id)
    return run_id
