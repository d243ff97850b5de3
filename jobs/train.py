"""Train an E-CAR (or flow-DiT) model on Ray Train + DeepSpeed from a latent data set.

    python -m jobs.train --preset ecar-fmnist --manifest s3://bucket/latents \\
        --output s3://bucket/ecar --name fmnist-a train.zero_stage=3 train.lr=1e-4

Checkpoints go to OUTPUT/runs/NAME/, the exported EMA weights to OUTPUT/runs/NAME/export, which
becomes the next version of the registered model PRESET (`tracking.registered_model` to choose).
Re-running with the same --output and --name resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time

from ecar.config import USER_ERRORS, Config, ConfigError
from ecar.log import get_logger
from ecar.train.loop import NonFiniteLossError

log = get_logger("ecar.jobs.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecar train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", required=True, help="preset name (ecar presets lists them)")
    parser.add_argument("--manifest", help="latent data set: prefix or manifest.json URI (default: data.manifest_uri)")
    parser.add_argument("--output", help="storage root for runs, local or s3:// (default: storage.root)")
    parser.add_argument("--name", help="run name; the same name resumes (default: PRESET-TIMESTAMP)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    parser.add_argument(
        "--workers",
        help="training workers: N, or MIN-MAX for an elastic run that Ray Train resizes between them as nodes "
        "come and go (sets train.num_workers and train.min_workers; the global batch stays the same)",
    )
    parser.add_argument(
        "--allow-changes",
        action="store_true",
        help="resume run NAME although its model, optimizer or data settings (or its data set) changed",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.zero_stage=3")
    return parser


def worker_overrides(workers: str) -> dict[str, int]:
    """--workers N or MIN-MAX as train.num_workers (and train.min_workers)."""
    low, dash, high = workers.partition("-")
    if not (low.isdigit() and (high.isdigit() or not dash)):
        raise ConfigError(f"--workers {workers!r}: expected a count (8) or bounds MIN-MAX (4-8)")
    return {"train.num_workers": int(high or low), "train.min_workers": int(low) if high else 0}


def resolve_config(
    preset: str, overrides: list[str], manifest: str | None, output: str | None, workers: str | None = None
) -> Config:
    """The preset with overrides; --manifest, --output and --workers land in the config, so that
    they are saved with checkpoints and logged as params like every other setting."""
    from ecar.presets import get_config

    config = get_config(preset, overrides)
    extra: dict[str, object] = worker_overrides(workers) if workers else {}
    if manifest:
        extra["data.manifest_uri"] = manifest
    if output:
        extra["storage.root"] = output
    return config.override(extra) if extra else config


def train_job(
    config: Config,
    name: str,
    address: str | None = None,
    tracking_uri: str | None = None,
    allow_changes: bool = False,
):
    """Check everything, then connect to Ray and fit; returns `ecar.train.trainer.FitResult`.
    A run NAME that has checkpoints resumes, under the settings it was trained with unless
    `allow_changes` (the changes are then logged and tagged on its MLflow run)."""
    from ecar import storage
    from ecar.data.reader import latent_dataset
    from ecar.runtime import init_ray
    from ecar.tracking import resolve_tracking_uri
    from ecar.train.preflight import check_cluster, check_resume, preflight
    from ecar.train.trainer import fit, run_uri

    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"run name {name!r}: must be one folder name (no '/', not '.' or '..'), e.g. fmnist-a")
    tracking_uri = tracking_uri or resolve_tracking_uri(config)
    source = preflight(config, config.data.manifest_uri, tracking_uri)  # before any worker exists
    changes = check_resume(config, run_uri(storage.with_absolute_root(config), name), source, allow_changes)
    for change in changes:
        log.warning("run %s resumes with a changed %s", name, change)
    init_ray(address)
    check_cluster(config)
    dataset = latent_dataset(
        source.manifest, "train", config.storage, seed=config.train.seed, validate=False
    )  # preflight read the manifest and checked the footers
    tags = {"ecar.resume_changes": "; ".join(changes)} if changes else None
    return fit(config, source, dataset, name, tracking_uri, tags=tags)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = resolve_config(args.preset, args.overrides, args.manifest, args.output, args.workers)
        name = args.name or f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = train_job(config, name, args.address, allow_changes=args.allow_changes)
    except USER_ERRORS as error:
        print(f"ecar train: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:  # stopped, not retried: see ecar.train.trainer.STOPPED_KEY
        print(f"ecar train: {error}", file=sys.stderr)
        return 1
    print(
        f"run {result.name}: {result.metrics.get('step', '?')} steps; checkpoint {result.checkpoint_uri}; "
        f"exported EMA {result.export_uri} (registered as {result.model_uri}); MLflow run {result.mlflow_run_id}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
