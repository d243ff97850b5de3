"""Train the KL-VAE tokenizer on prepared image shards with Ray Train; report PSNR and
reconstruction FID on the test split; write tokenizer.safetensors + tokenizer.json. The MLflow
run gets the loss at every step and a grid of test images above their reconstructions.

    python -m jobs.train_tokenizer --preset ecar-fmnist --images outputs/fmnist/images \
        --output outputs/fmnist/tokenizer tokenizer.steps=1200
"""

from __future__ import annotations

import argparse
import sys

from ecar import storage
from ecar.config import Config
from ecar.runtime import init_ray
from jobs._common import base_parser, run


def work(args: argparse.Namespace, config: Config) -> str:
    from ecar.data.prepare import read_images_manifest
    from ecar.tracking import resolve_tracking_uri
    from ecar.train.tokenizer import check_output_free, train_tokenizer

    images = args.images or config.data.images_uri
    output = args.output or config.tokenizer.checkpoint_uri
    if not images or not output:
        raise ValueError("give --images URI (or data.images_uri) and --output URI (or tokenizer.checkpoint_uri)")
    storage.check_access(images, "--images", storage=config.storage)
    storage.check_access(output, "--output", write=True, storage=config.storage)
    check_output_free(output, config.storage)
    read_images_manifest(images, config)  # fail before Ray starts
    init_ray(args.address)
    tracking_uri = "" if args.no_track else resolve_tracking_uri(config)
    description = train_tokenizer(config, images, output, eval_split=args.eval_split, tracking_uri=tracking_uri)
    metrics = description["metrics"]
    fid = f", rFID {metrics['rfid']:.2f}" if "rfid" in metrics else ""
    return (
        f"tokenizer in {output}: PSNR {metrics['psnr']:.2f} dB{fid}"
        f" on {metrics['eval_images']} {args.eval_split} images"
    )


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("ecar train-tokenizer", __doc__)
    parser.add_argument("--images", help="prepared image shards (default: data.images_uri)")
    parser.add_argument("--output", help="where the tokenizer goes (default: tokenizer.checkpoint_uri)")
    parser.add_argument("--no-track", action="store_true", help="do not log the run to MLflow")
    parser.add_argument("--eval-split", default="test", help="held-out split for PSNR / rFID")
    return run("ecar train-tokenizer", parser, argv, work)


if __name__ == "__main__":
    sys.exit(main())
