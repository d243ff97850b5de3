"""The tokenizer's real figures: prepare Fashion-MNIST, train the preset's KL-VAE with the
train-tokenizer job, and record PSNR / reconstruction FID on the test split.

    python benchmarks/tokenizer.py [--preset ecar-fmnist] [--root outputs/fmnist] [overrides ...]

Writes benchmarks/results/tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ecar import storage  # noqa: E402
from ecar.presets import get_config  # noqa: E402
from jobs import prepare, train_tokenizer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ecar-fmnist")
    parser.add_argument("--root", default="outputs/fmnist")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    images, tokenizer = f"{args.root}/images", f"{args.root}/tokenizer"
    started = time.time()
    if prepare.main(["--preset", args.preset, "--output", images, *args.overrides]):
        return 1
    if train_tokenizer.main(["--preset", args.preset, "--images", images, "--output", tokenizer, *args.overrides]):
        return 1
    description = json.loads(storage.read_text(storage.join(tokenizer, "tokenizer.json")))
    config = get_config(args.preset, args.overrides)
    result = {
        "preset": args.preset,
        "overrides": args.overrides,
        "image_shape": [config.data.image_channels, config.data.image_size, config.data.image_size],
        "latent_shape": [config.model.latent_channels, config.model.latent_size, config.model.latent_size],
        "tokenizer": description["tokenizer_config"],
        "weights_sha256": description["weights_sha256"],
        "metrics": description["metrics"],
        "psnr_definition": "mean per-image PSNR (dB, [0,1] scale) of 8-bit reconstructions (posterior mean)",
        "rfid_definition": "FID between Inception-v3 (TF port) features of originals and reconstructions",
        "wall_seconds": round(time.time() - started, 1),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, no GPU",
    }
    out = Path(__file__).parent / "results" / "tokenizer.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
