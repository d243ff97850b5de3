"""Encode throughput: the Ray Data encode job vs a plain single-process loop over the same images
with the same tokenizer, and the streaming reader's latents/s from a loopback S3 server into
iter_torch_batches.

    python benchmarks/encode.py [--preset ecar-fmnist] [--images outputs/fmnist/images]
                                [--tokenizer outputs/fmnist/tokenizer] [--actors 2]

Both sides include reading the image shards and decoding the PNGs; the job also writes the
latent shards to S3 (moto's loopback server) and checks them before the manifest, the loop
writes nothing. Writes benchmarks/results/encode.json.

    python benchmarks/encode.py --driver-memory 4000 16000

instead measures the encode driver's peak RSS at each data-set size (the first N Fashion-MNIST
train images, prepared in shards of 1,024): each size is encoded by a fresh driver process
connected to one local Ray cluster, with a random-init tokenizer of the preset's shape (memory
does not depend on its weights). The workers write the shards, so the driver's peak must not
grow with N; the figures go under "driver_memory" in encode.json, beside the others.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
    parser.add_argument("--driver-memory", type=int, nargs="+", metavar="N", help="data-set sizes to measure")
    parser.add_argument("--work", default="outputs/bench-encode-memory", help="--driver-memory's scratch folder")
    parser.add_argument(
        "--encode-in-this-process", nargs=4, metavar=("ADDRESS", "IMAGES", "LATENTS", "REPORT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.encode_in_this_process:
        return encode_and_report_memory(args, *args.encode_in_this_process)
    if args.driver_memory:
        return driver_memory(args)

    from ecar.tracking import free_port

    # the loopback S3 endpoint must be in the environment before Ray starts its workers
    port = free_port()
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
    init_ray(None, num_cpus=os.cpu_count())  # prepare's tasks and the encode job run on it
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


def _tokenizer_config(args: argparse.Namespace, tokenizer_uri: str):
    from ecar.presets import get_config

    return get_config(
        args.preset,
        {
            "tokenizer.checkpoint_uri": tokenizer_uri,
            "data.encode_actors": args.actors,
            "data.encode_cpus_per_actor": args.cpus_per_actor,
            "data.encode_batch_size": args.batch_size,
            "data.shard_rows": 1024,
        },
    )


def driver_memory(args: argparse.Namespace) -> int:
    """One Ray cluster; per size, prepared images and a fresh driver process that encodes them."""
    import subprocess

    import torch

    from ecar.data.prepare import prepare_images
    from ecar.runtime import init_ray
    from ecar.tokenizer.vae import KLVAE, save_vae, vae_shape

    work = Path(args.work).resolve()
    tokenizer_uri = str(work / "tokenizer")
    config = _tokenizer_config(args, tokenizer_uri)
    torch.manual_seed(0)
    save_vae(KLVAE(vae_shape(config)), tokenizer_uri, config.data.image_size)
    init_ray(None, num_cpus=os.cpu_count())
    import ray

    address = ray.get_runtime_context().gcs_address
    sizes = {}
    for size in args.driver_memory:
        images, latents = str(work / f"images-{size}"), str(work / f"latents-{size}-{uuid.uuid4().hex[:6]}")
        prepare_images(config, images, splits=["train"], limit_per_split=size)
        child = [sys.executable, __file__, "--preset", args.preset, "--actors", str(args.actors)]
        child += ["--cpus-per-actor", str(args.cpus_per_actor), "--batch-size", str(args.batch_size)]
        report = work / f"driver-{size}.json"
        child += ["--tokenizer", tokenizer_uri, "--encode-in-this-process", address, images, latents, str(report)]
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the encode driver for {size} images failed:\n{done.stderr[-3000:]}")
        sizes[str(size)] = json.loads(report.read_text())
        print(f"{size} images: {sizes[str(size)]}", flush=True)
    peaks = [entry["peak_rss_mb"] for entry in sizes.values()]
    result = {
        "sizes": sizes,
        "peak_rss_ratio_largest_over_smallest": round(max(peaks) / min(peaks), 3),
        "within_10_percent": max(peaks) <= 1.1 * min(peaks),
        "preset": args.preset,
        "images": "the first N Fashion-MNIST train images, shards of 1,024 rows",
        "tokenizer": "random-init KL-VAE of the preset's shape",
        "actors": args.actors,
        "cpus_per_actor": args.cpus_per_actor,
        "note": "peak_rss_mb: the driver process's peak resident set (ru_maxrss), start-up, imports, "
        "tokenizer check and Ray connection included; during_encode_mb: its RSS sampled every 50 ms "
        "during encode_latents (baseline just before, peak); latent_mb: the latent data the workers "
        "wrote, none of which passed through the driver",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU; shared with other jobs during the run",
    }
    output = Path(args.output)
    existing = json.loads(output.read_text()) if output.exists() else {}
    output.write_text(json.dumps({**existing, "driver_memory": result}, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def encode_and_report_memory(args: argparse.Namespace, address: str, images: str, latents: str, report: str) -> int:
    """The measured driver: connect, encode, write its memory figures to `report` (JSON)."""
    import resource
    import threading

    import psutil

    from ecar.data.encode import encode_latents
    from ecar.runtime import init_ray

    process, samples, running = psutil.Process(), [], True

    def sample() -> None:
        while running:
            samples.append(process.memory_info().rss)
            time.sleep(0.05)

    config = _tokenizer_config(args, args.tokenizer)
    init_ray(address)
    baseline = process.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    manifest = encode_latents(config, images, latents)
    seconds = time.perf_counter() - started
    running = False
    sampler.join()
    rows = manifest["splits"]["train"]["rows"]
    figures = {
        "images": rows,
        "shards": len(manifest["splits"]["train"]["shards"]),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "during_encode_mb": {"baseline": round(baseline / 2**20, 1), "peak": round(max(samples) / 2**20, 1)},
        "latent_mb": round(rows * 4 * int(np.prod(manifest["latent_shape"])) / 2**20, 1),
        "encode_seconds": round(seconds, 1),
    }
    Path(report).write_text(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
