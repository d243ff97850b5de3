"""Encode prepared image shards into latent Parquet shards + manifest.json with the tokenizer,
on Ray Data (actor pool; GPU actors when the cluster has GPUs).

    python -m jobs.encode --preset ecar-fmnist --images outputs/fmnist/images \
        --output s3://bucket/fmnist/latents tokenizer.checkpoint_uri=outputs/fmnist/tokenizer

Re-running after a failure encodes only the missing shards; the manifest is written last.
"""

from __future__ import annotations

import argparse
import sys

from ecar import storage
from ecar.config import Config
from ecar.runtime import init_ray
from jobs._common import base_parser, log_to_mlflow, run


def work(args: argparse.Namespace, config: Config) -> str:
    from ecar.data.encode import encode_latents
    from ecar.data.prepare import read_images_manifest
    from ecar.tokenizer import load_tokenizer

    images = args.images or config.data.images_uri
    output = args.output or config.data.manifest_uri.removesuffix("/manifest.json")
    if not images or not output:
        raise ValueError("give --images URI (or data.images_uri) and --output URI (or data.manifest_uri)")
    storage.check_access(images, "--images", storage=config.storage)
    storage.check_access(output, "--output", write=True, storage=config.storage)
    read_images_manifest(images, config)  # fail before Ray starts
    load_tokenizer(config)
    init_ray(args.address)
    manifest = encode_latents(config, images, output)
    if not args.no_track:
        figures = {"latent_scale": manifest["latent_scale"], "quarantined": manifest["quarantined"]}
        figures.update({f"rows_{split}": info["rows"] for split, info in manifest["splits"].items()})
        log_to_mlflow(config, "encode", images, output, figures)
    parts = ", ".join(
        f"{split}: {info['rows']} latents ({info['quarantined']} quarantined)"
        for split, info in manifest["splits"].items()
    )
    return f"encoded into {output}: {parts}; latent scale {manifest['latent_scale']:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("ecar encode", __doc__)
    parser.add_argument("--images", help="prepared image shards (default: data.images_uri)")
    parser.add_argument("--output", help="latent prefix (default: data.manifest_uri's folder)")
    parser.add_argument("--no-track", action="store_true", help="do not log the run to MLflow")
    return run("ecar encode", parser, argv, work)


if __name__ == "__main__":
    sys.exit(main())
