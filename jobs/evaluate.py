"""Evaluate a finished sampling run: FID, precision/recall against the real images of the latent
data set (reference features cached next to its manifest), a classifier score (the Inception
Score's formula with EfficientNet-Lite0, and the real images' for scale), FLOPs and latency per
image; logged to MLflow against the checkpoint's training run when it is known.

    python -m jobs.evaluate --samples outputs/samples/NAME --split test
"""

from __future__ import annotations

import argparse
import json
import sys

from ecar import storage
from ecar.config import USER_ERRORS
from ecar.evaluation.evaluate import evaluate_samples, log_evaluation
from ecar.export import read_config, read_metadata
from ecar.tracking import resolve_tracking_uri


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
            config = read_config(metrics["checkpoint_uri"])
            run_id = read_metadata(metrics["checkpoint_uri"]).get("mlflow_run_id", "")
            log_evaluation(metrics, config, args.tracking_uri or resolve_tracking_uri(config), run_id)
    except USER_ERRORS as error:
        print(f"ecar evaluate: {error}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
