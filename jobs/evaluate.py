"""Evaluate a finished sampling run: FID, precision/recall against the real images of the latent
data set (reference features cached next to its manifest), a classifier score (the Inception
Score's formula with EfficientNet-Lite0, and the real images' for scale), FLOPs and latency per
image; logged to MLflow with a grid of the first samples, into the checkpoint's training run
when it is known, and as metrics of its registered model version (the one the samples were
drawn from with `ecar sample --checkpoint models:/...`, else the newest holding the same export).

    python -m jobs.evaluate --samples outputs/samples/NAME --split test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ecar import storage
from ecar.config import USER_ERRORS
from ecar.data.manifest import read_manifest
from ecar.evaluation.evaluate import evaluate_samples, log_evaluation
from ecar.export import read_config, read_metadata
from ecar.tracking import find_registered, resolve_tracking_uri

GRID_IMAGES = 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecar evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", required=True, help="output URI of `ecar sample`")
    parser.add_argument("--manifest", default="", help="latent manifest (default: the checkpoint's)")
    parser.add_argument("--split", default="test", help="real split to compare with (default: test)")
    parser.add_argument("--reference-images", type=int, default=0, help="real images (default: as many as samples)")
    parser.add_argument("--latency-batches", default="1,16", help="batch sizes to time; empty to skip")
    parser.add_argument("--tracking-uri", default="", help="default: the checkpoint config's tracking URI")
    parser.add_argument("--no-mlflow", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    batches = tuple(int(b) for b in args.latency_batches.split(",") if b)
    try:
        storage.check_access(args.samples, "--samples")
        metrics = evaluate_samples(args.samples, args.manifest, args.split, args.reference_images, batches)
        if not args.no_mlflow:
            track(args, metrics)
    except USER_ERRORS as error:
        print(f"ecar evaluate: {error}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0


def track(args: argparse.Namespace, metrics: dict) -> None:
    """Log the evaluation against the samples' model version (see the module docstring)."""
    checkpoint = metrics["checkpoint_uri"]
    config = read_config(checkpoint)
    metadata = read_metadata(checkpoint)
    tracking_uri = args.tracking_uri or resolve_tracking_uri(config)
    model = find_registered(tracking_uri, checkpoint)  # by content hash: the version sampled
    if not model.run_id:
        model = dataclasses.replace(model, run_id=metadata.get("mlflow_run_id", ""))
    manifest = metadata["manifest_uri"]
    grid = samples_figure(
        args.samples, read_manifest(manifest, config.storage).get("class_names") if manifest else None
    )
    log_evaluation(metrics, config, tracking_uri, model, metadata["step"], grid=grid)


def samples_figure(samples_uri: str, class_names: list[str] | None, count: int = GRID_IMAGES):
    """The first `count` samples of a sampling run, labelled by class."""
    from ecar.evaluation.evaluate import images_to_unit
    from ecar.figures import sample_grid
    from ecar.sampler import read_samples

    first = read_samples(samples_uri, "images", limit=count)
    return sample_grid(images_to_unit(first["images"]), first["label"], f"samples: {samples_uri}", class_names)


if __name__ == "__main__":
    sys.exit(main())
