"""Encode throughput: the Ray Data encode job vs a plain single-process loop over the same images
with the same tokenizer, and the streaming reader's latents/s from a loopback S3 server into
iter_torch_batches.

    python benchmarks/encode.py [--preset ecar-fmnist] [--images outputs/fmnist/images]
                                [--tokenizer outputs/fmnist/tokenizer] [--actors 2]

Both sides include reading the image shards and decoding the PNGs; the job also writes the
latent shards to S3 (moto's loopback server) and checks them before the manifest, the loop
writes nothing. Writes benchmarks/results/encode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ecar-fmnist")
    parser.add_argument("--images", default="outputs/fmnist/images")
    parser.add_argument("--tokenizer", default="outputs/fmnist/tokenizer")
    parser.add_argument(
        "--limit", type=int, default=5000, help="first N images of each split, prepared into IMAGES-bench-N (0: all)"
    )
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "encode.json"))
    args = parser.parse_args()

    # the loopback S3 endpoint must be in the environment before Ray starts its workers
    port = _free_port()
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
    )
    import boto3
    import numpy as np
    import torch
    from moto.server import ThreadedMotoServer

    from ecar.data.encode import encode_latents
    from ecar.data.prepare import decode_pngs, image_shard_uris, prepare_images, read_images_manifest
    from ecar.data.reader import latent_dataset, torch_batches
    from ecar.data.shards import read_table
    from ecar.presets import get_config
    from ecar.runtime import init_ray
    from ecar.tokenizer import load_tokenizer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    boto3.client("s3").create_bucket(Bucket="bench")
    config = get_config(
        args.preset,
        {
            "tokenizer.checkpoint_uri": args.tokenizer,
            "data.encode_actors": args.actors,
            "data.encode_cpus_per_actor": args.cpus_per_actor,
            "data.encode_batch_size": args.batch_size,
        },
    )
    if args.limit:
        subset = f"{args.images.rstrip('/')}-bench-{args.limit}"
        prepare_images(config.override({"data.shard_rows": 1024}), subset, limit_per_split=args.limit)
        args.images = subset
    images = read_images_manifest(args.images, config)
    total = sum(split["rows"] for split in images["splits"].values())

    # 1. the plain loop: one process, all cores to torch
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_tokenizer(config).model
    started = time.perf_counter()
    encoded = 0
    with torch.no_grad():
        for split in images["splits"]:
            for uri in image_shard_uris(args.images, split, images):
                column = read_table(uri, columns=["image"]).column("image").to_pylist()
                pixels = torch.from_numpy(decode_pngs(column, config.data.image_channels))
                for start in range(0, len(pixels), args.batch_size):
                    encoded += len(model.encode(pixels[start : start + args.batch_size]))
    loop_seconds = time.perf_counter() - started
    assert encoded == total

    # 2. the Ray Data job into S3 (includes Ray Data start-up and the actors loading the tokenizer)
    init_ray(None, num_cpus=os.cpu_count())
    output = f"s3://bench/{uuid.uuid4().hex[:8]}/latents"
    started = time.perf_counter()
    manifest = encode_latents(config, args.images, output)
    job_seconds = time.perf_counter() - started
    rows = sum(s["rows"] for s in manifest["splits"].values())

    # 3. the streaming reader from S3 into torch batches
    dataset = latent_dataset(output, "train", seed=0)
    started = time.perf_counter()
    delivered = 0
    for batch in torch_batches(
        dataset, batch_size=256, shuffle_buffer_rows=config.data.shuffle_buffer_rows, seed=0, drop_last=False
    ):
        delivered += len(batch["label"])
    read_seconds = time.perf_counter() - started
    server.stop()

    result = {
        "preset": args.preset,
        "images": total,
        "image_shape": [config.data.image_channels, config.data.image_size, config.data.image_size],
        "latent_shape": manifest["latent_shape"],
        "tokenizer_sha256": manifest["tokenizer"]["sha256"],
        "plain_loop": {
            "seconds": round(loop_seconds, 2),
            "images_per_second": round(total / loop_seconds, 1),
            "threads": torch.get_num_threads(),
            "note": "read + PNG decode + encode; writes nothing",
        },
        "ray_data_job": {
            "seconds": round(job_seconds, 2),
            "images_per_second": round(rows / job_seconds, 1),
            "actors": args.actors,
            "cpus_per_actor": args.cpus_per_actor,
            "batch_size": args.batch_size,
            "note": "read + decode + check + encode + write latent shards to loopback S3 + verify + "
            "manifest; includes Ray Data start-up and tokenizer loading in the actors",
        },
        "ratio_job_over_loop": round((rows / job_seconds) / (total / loop_seconds), 3),
        "streaming_reader": {
            "latents": delivered,
            "seconds": round(read_seconds, 2),
            "latents_per_second": round(delivered / read_seconds, 1),
            "batch_size": 256,
            "shuffle_buffer_rows": config.data.shuffle_buffer_rows,
            "source": "loopback S3 (moto ThreadedMotoServer, in-process)",
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU; shared with other jobs during the run",
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
