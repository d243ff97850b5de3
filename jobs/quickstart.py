"""The whole pipeline on the embedded defaults: Fashion-MNIST -> tokenizer -> latents -> E-CAR on
Ray Train + DeepSpeed -> samples -> FID, everything tracked in the local MLflow store.

    python -m jobs.quickstart                        # ~14 minutes on 2 CPU cores, outputs/quickstart
    python -m jobs.quickstart --scale full           # the whole data set, 2,000 steps, FID-2k: hours on CPU
    python -m jobs.quickstart --storage s3://bucket/ecar-quickstart   # the same code on object storage

Every step is resumable: re-running the command skips what is finished and completes the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from ecar import storage
from ecar.config import USER_ERRORS, Config
from ecar.log import get_logger
from ecar.presets import get_config
from ecar.runtime import cpu_bf16_flags
from ecar.tracking import redact

log = get_logger("ecar.jobs.quickstart")


@dataclass(frozen=True)
class Scale:
    """How much work an end-to-end Fashion-MNIST run does: the quickstart's scales, and the
    budget every model of the headline experiment (benchmarks/headline.py) is trained with."""

    images_per_split: int | None  # None: the whole data set
    tokenizer_steps: int
    train_steps: int
    batch_size: int  # global, split over `workers` ZeRO-2 data-parallel workers
    samples: int
    latency_batches: tuple[int, ...]
    ema_decay: float = 0.99
    # x 1 torch thread each, for E-CAR and the tokenizer; on 2 cores E-CAR steps 1.58x faster than
    # at 1 worker x 2 threads, the tokenizer's 1.17x (1.64x than 1 x 1): benchmarks/results/train.json
    workers: int = 2
    validate: bool = False  # held-out loss every ~1/15 of the run (512 latents of the test split)


# `default` is sized for under 15 minutes on 2 CPU cores: 5,000 images per split, a short
# tokenizer run, 200 E-CAR steps at batch 32 and FID on 400 samples. It shows the whole system
# working; the models it trains are far from converged (benchmarks/headline.py trains for real).
SCALES = {
    "default": Scale(
        images_per_split=5000, tokenizer_steps=200, train_steps=200, batch_size=32, samples=400, latency_batches=(1, 16)
    ),
    "full": Scale(
        images_per_split=None,
        tokenizer_steps=600,
        train_steps=2000,
        batch_size=32,
        samples=2000,
        latency_batches=(1, 16),
        ema_decay=0.998,
        validate=True,
    ),
    "quick": Scale(
        images_per_split=256, tokenizer_steps=20, train_steps=6, batch_size=32, samples=16, latency_batches=(1,)
    ),
}


def budget(scale: Scale, storage_root: str) -> dict[str, Any]:
    """The overrides of ecar-fmnist (or dit-fmnist) that size a run to `scale` on this kind of
    machine: tokenizer, data-parallel training with its schedule and cadence, encode actors."""
    steps = scale.train_steps
    held_out = 512 if scale.images_per_split is None else 64
    return {
        "storage.root": storage_root,
        "tokenizer.steps": scale.tokenizer_steps,
        "tokenizer.eval_images": 500 if scale.images_per_split is None else 64,
        "tokenizer.fid_images": 200 if scale.images_per_split is None else 16,
        # DDP workers x 1 thread, 0.5 CPU each (Ray Data keeps a CPU), as E-CAR trains
        "tokenizer.num_workers": scale.workers,
        "tokenizer.cpus_per_worker": 0.5,
        "tokenizer.torch_threads": 1,
        "train.steps": steps,
        "train.num_workers": scale.workers,
        "train.cpus_per_worker": 0.5,  # leaves CPU time to Ray Data's reads
        "train.torch_threads": 1,
        "train.global_batch_size": scale.batch_size,
        "train.micro_batch_size": scale.batch_size // scale.workers,
        "train.warmup_steps": max(1, steps // 15),
        "train.lr": 1e-3,
        "train.min_lr": 1e-5,
        "train.ema_decay": scale.ema_decay,
        "train.log_every": max(1, steps // 50),
        "train.eval_every": max(1, steps // 15) if scale.validate else 0,
        "train.val_rows": held_out if scale.validate else 0,
        "train.sample_every": max(2, steps // 3),
        "train.checkpoint_every": max(2, min(250, steps // 4)),  # ~6 minutes apart at most on 2 cores
        "train.zero_stage": 2,
        "data.encode_cpus_per_actor": 1.0,
    }


def quickstart_config(storage_root: str, scale: Scale, overrides: list[str]) -> Config:
    """ecar-fmnist sized to `scale`, trained in bf16 (fp32 master weights) where the CPU computes
    bf16 natively: 1.45x faster steps than fp32 on this machine (benchmarks/results/train.json)."""
    config = get_config("ecar-fmnist").override(budget(scale, storage_root))
    if cpu_bf16_flags():
        config = config.override({"train.precision": "bf16"})
    return config.override(overrides) if overrides else config


def save_figure(figure, uri: str) -> str:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    storage.write_bytes_atomic(uri, buffer.getvalue())
    return uri


def run(config: Config, scale: Scale, address: str | None) -> dict:
    from ecar.data.encode import encode_latents
    from ecar.data.manifest import read_manifest
    from ecar.data.prepare import prepare_images
    from ecar.evaluation.evaluate import evaluate_samples, log_evaluation
    from ecar.runtime import init_ray
    from ecar.sampler import sample_to_storage
    from ecar.tracking import resolve_export, resolve_tracking_uri
    from ecar.train.tokenizer import train_tokenizer
    from jobs.evaluate import samples_figure
    from jobs.train import train_job

    root = config.storage.root
    images_uri, tokenizer_uri = storage.join(root, "images"), storage.join(root, "tokenizer")
    latents_uri, samples_uri = storage.join(root, "latents"), storage.join(root, "samples")
    tracking_uri = resolve_tracking_uri(config)
    timings: dict[str, float] = {}

    def step(name: str):
        timings[name] = time.perf_counter()
        log.info("quickstart: %s", name)

    init_ray(address)
    step("prepare")
    prepare_images(config, images_uri, limit_per_split=scale.images_per_split)
    step("train-tokenizer")
    if not storage.exists(storage.join(tokenizer_uri, "tokenizer.json"), config.storage):
        train_tokenizer(config, images_uri, tokenizer_uri, tracking_uri=tracking_uri)
    config = config.override({"tokenizer.checkpoint_uri": tokenizer_uri, "data.manifest_uri": latents_uri})
    step("encode")
    if not storage.exists(storage.join(latents_uri, "manifest.json"), config.storage):
        encode_latents(config, images_uri, latents_uri)
    step("train")
    result = train_job(config, "quickstart", address, tracking_uri)
    step("sample")
    sample_to_storage(
        result.export_uri,
        samples_uri,
        scale.samples,
        shard_size=max(16, scale.samples // 4),
        batch_size=50,
        cpus_per_actor=1.0,
        model_uri=result.model_uri,
    )
    grid = samples_figure(samples_uri, read_manifest(latents_uri)["class_names"], count=30)
    grid_path = save_figure(grid, storage.join(root, "samples.png"))
    step("evaluate")
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # our own local cluster is done: its idle processes would skew the latency timing
        import ray

        ray.shutdown()
    metrics = evaluate_samples(samples_uri, latents_uri, "test", 0, scale.latency_batches)
    model = resolve_export(result.model_uri, tracking_uri)
    log_evaluation(metrics, config, tracking_uri, model, config.train.steps, grid=grid)
    timings["end"] = time.perf_counter()
    names = list(timings)
    durations = {names[i]: round(timings[names[i + 1]] - timings[names[i]], 1) for i in range(len(names) - 1)}
    manifest = read_manifest(latents_uri, config.storage)
    return {
        "root": root,
        "tracking_uri": redact(tracking_uri),
        "mlflow_run_id": result.mlflow_run_id,
        "model_uri": result.model_uri,
        "export_uri": result.export_uri,
        "samples_uri": samples_uri,
        "sample_grid": grid_path,
        "latent_scale": manifest["latent_scale"],
        "fid": metrics["fid"],
        "precision": metrics["precision"],
        "recall": metrics["recall"],
        "classifier_score": metrics["classifier_score"],
        "real_classifier_score": metrics["real_classifier_score"],
        "fid_images": metrics["fake_images"],
        "sampling_gflops": metrics["sampling_gflops"],
        "seconds": durations,
        "total_seconds": round(sum(durations.values()), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ecar quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--storage", default="outputs/quickstart", help="storage root, local or s3://")
    parser.add_argument("--scale", choices=sorted(SCALES), default="default")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides on top of the quickstart config")
    args = parser.parse_args(argv)
    try:
        config = quickstart_config(args.storage, SCALES[args.scale], args.overrides)
        summary = run(config, SCALES[args.scale], args.address)
    except USER_ERRORS as error:
        print(f"ecar quickstart: {error}", file=sys.stderr)
        return 2
    storage.write_text_atomic(storage.join(args.storage, "quickstart.json"), json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"\noutputs under {summary['root']}; samples in {summary['samples_uri']}, a grid in {summary['sample_grid']}")
    if summary["tracking_uri"].startswith("sqlite:"):
        print(f"open the runs with:  mlflow ui --backend-store-uri {summary['tracking_uri']}")
    else:
        print(f"runs are on the MLflow server {summary['tracking_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
