"""Sample many images from an exported checkpoint into storage (shards + manifest).

    python -m jobs.sample --checkpoint outputs/runs/NAME/export --output outputs/samples/NAME \
        --num-images 5000 sampling.cfg_scale=2.0 flow.steps_per_stage=[8,8,8]
    python -m jobs.sample --checkpoint models:/ecar-fmnist@champion --output outputs/samples/champion \
        --num-images 5000

A registered model version (models:/NAME/VERSION or models:/NAME@ALIAS) samples the export it
registered, checked against the registered hash; the samples record the version.

Re-running the same command after a failure fills only the missing shards.
"""

from __future__ import annotations

import argparse
import sys

from ecar import storage
from ecar.config import USER_ERRORS, Config
from ecar.export import read_config, verify_weights
from ecar.runtime import init_ray
from ecar.sampler import check_arguments, sample_to_storage, sampling_config
from ecar.tracking import resolve_export, resolve_tracking_uri


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecar sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="exported checkpoint URI (local or s3://), or models:/NAME/VERSION or models:/NAME@ALIAS",
    )
    parser.add_argument("--output", required=True, help="output URI for shards and manifest.json")
    parser.add_argument("--num-images", type=int, required=True)
    parser.add_argument("--labels", help="comma-separated class ids to cycle through (default: class-balanced)")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=1, help="size of the sampling actor pool")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    parser.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow store that resolves models:/ (default: MLFLOW_TRACKING_URI, else outputs/mlflow.db)",
    )
    parser.add_argument("overrides", nargs="*", help="sampling.* or flow.steps_per_stage=[...] overrides")
    return parser


def parse_labels(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--labels: {text!r} is not a comma-separated list of class ids (e.g. 0,3,7)") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        labels = parse_labels(args.labels)
        # every user error before Ray starts: storage reachable, the registered model version,
        # the config (and its hash), the overrides, the arguments, the weights' hash
        storage.check_access(args.output, "--output", write=True)
        checkpoint = resolve_export(args.checkpoint, args.tracking_uri or resolve_tracking_uri(Config()))
        storage.check_access(checkpoint.export_uri, "--checkpoint")
        config = sampling_config(read_config(checkpoint.export_uri), args.overrides)
        check_arguments(
            config, args.num_images, labels, args.shard_size, args.batch_size, args.actors, args.cpus_per_actor
        )
        verify_weights(checkpoint.export_uri)
        init_ray(args.address)
        manifest = sample_to_storage(
            checkpoint.export_uri,
            args.output,
            args.num_images,
            args.overrides,
            labels,
            args.shard_size,
            args.batch_size,
            args.actors,
            args.cpus_per_actor,
            model_uri=checkpoint.model_uri,
        )
    except USER_ERRORS as error:
        print(f"ecar sample: {error}", file=sys.stderr)
        return 2
    print(f"{manifest['num_images']} samples in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
