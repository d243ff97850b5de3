"""Turn an image source into image shards on storage (local path or s3://), on Ray Data: the
shards are read, resized and written by tasks across the cluster.

    python -m jobs.prepare --preset ecar-fmnist --output s3://bucket/fmnist/images
    python -m jobs.prepare --preset ecar-b data.source_uri=/data/imagenet --output s3://bucket/imagenet/images

Re-running after a failure writes only the missing shards; images.json is written last.
"""

from __future__ import annotations

import argparse
import sys

from ecar import storage
from ecar.config import Config
from ecar.data.prepare import claim_images_output, prepare_images
from ecar.data.sources import open_source
from ecar.runtime import init_ray
from jobs._common import base_parser, run


def work(args: argparse.Namespace, config: Config) -> str:
    output = args.output or config.data.images_uri
    if not output:
        raise ValueError("give --output URI or data.images_uri=URI")
    if storage.is_remote(config.data.source_uri):
        storage.check_access(config.data.source_uri, "data.source_uri", storage=config.storage)
    storage.check_access(output, "--output", write=True, storage=config.storage)
    source = open_source(config.data, config.storage, config.model.num_classes)  # a bad path fails before Ray
    claim_images_output(config, output, source, args.limit)  # another run's shards there: refused before Ray
    init_ray(args.address)
    manifest = prepare_images(config, output, source, limit_per_split=args.limit)
    parts = ", ".join(
        f"{split}: {info['rows']} images ({info['quarantined']} quarantined)"
        for split, info in manifest["splits"].items()
    )
    return f"prepared {output}: {parts}"


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("ecar prepare", __doc__)
    parser.add_argument("--output", help="image shard prefix (default: data.images_uri)")
    parser.add_argument("--limit", type=int, help="first N records of each split only")
    return run("ecar prepare", parser, argv, work)


if __name__ == "__main__":
    sys.exit(main())
