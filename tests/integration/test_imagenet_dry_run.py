"""The ImageNet path on CPU at toy size, through the commands the README gives (slow: minutes):
a 64-image class-folder tree -> `ecar prepare` at 256x256 -> `ecar encode` with a random-init
diffusers VAE of SD's shape -> `ecar train` of a scaled-down ecar-b (5 steps, Ray Train +
DeepSpeed, bf16) -> `ecar sample` of 8 images decoded by the VAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ecar.cli import main as ecar
from ecar.data.manifest import read_manifest
from ecar.data.prepare import read_images_manifest
from ecar.export import read_metadata
from ecar.presets import get_config
from ecar.sampler import read_samples

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1800)]

CLASSES = ["n01440764", "n01443537", "n01484850", "n01491361"]
# SD's VAE makes a 32x32x4 latent of a 256x256 image: ecar-b's stages 4-8-16 at patch 1 become
# 8-16-32 at patch 2 (the same 16, 64, 256 tokens); widths and depths cut to CPU size
LATENT = ["model.latent_channels=4", "model.latent_size=32", "stages.grids=[8,16,32]", "model.patch_size=2"]
SMALL = [
    "model.width=32",
    "model.heads=2",
    "model.ar_depth=1",
    "model.flow_depth=1",
    f"model.num_classes={len(CLASSES)}",
]


def test_an_imagenet_shaped_run_from_class_folders_to_decoded_samples(
    ray_cluster, tiny_sd_vae, class_folders, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    sizes = [(320, 256), (256, 384), (500, 375), (256, 256)]  # landscape, portrait, larger, exact
    class_folders(tmp_path / "imagenet" / "train", CLASSES, per_class=16, sizes=sizes)  # ImageNet's layout
    tree = str(tmp_path / "imagenet")
    images, latents, output = (str(tmp_path / name) for name in ("images", "latents", "ecar"))
    data = ["data.shard_rows=16", "data.encode_actors=1", "data.encode_batch_size=16"]

    assert ecar(["prepare", "--preset", "ecar-b", "--output", images, f"data.source_uri={tree}", *data]) == 0
    prepared = read_images_manifest(images, get_config("ecar-b"))
    assert prepared["class_names"] == CLASSES and prepared["image_size"] == 256 and prepared["image_channels"] == 3
    assert prepared["splits"]["train"]["rows"] == 64 and len(prepared["splits"]["train"]["shards"]) == 4

    vae = ["tokenizer.kind=diffusers", f"tokenizer.checkpoint_uri={tiny_sd_vae}"]
    encode = ["encode", "--preset", "ecar-b", "--images", images, "--output", latents]
    assert ecar([*encode, *vae, *LATENT, *SMALL, *data]) == 0
    manifest = read_manifest(latents)
    assert manifest["latent_shape"] == [4, 32, 32] and manifest["splits"]["train"]["rows"] == 64
    scaling_factor = json.loads((Path(tiny_sd_vae) / "config.json").read_text())["scaling_factor"]
    assert manifest["latent_scale"] == scaling_factor and manifest["class_names"] == CLASSES

    steps = ["train.steps=5", "train.num_workers=1", "train.use_gpu=false", "train.cpus_per_worker=1"]
    steps += ["train.global_batch_size=8", "train.micro_batch_size=8", "train.checkpoint_every=5"]
    steps += ["train.sample_every=5", "train.log_every=1", "train.val_rows=0"]
    train = ["train", "--preset", "ecar-b", "--manifest", latents, "--output", output, "--name", "dry-run"]
    assert ecar([*train, *LATENT, *SMALL, *steps]) == 0
    export = str(tmp_path / "ecar" / "runs" / "dry-run" / "export")
    metadata = read_metadata(export)
    assert metadata["step"] == 5 and metadata["latent_scale"] == scaling_factor

    samples = str(tmp_path / "samples")
    sample = ["sample", "--checkpoint", export, "--output", samples, "--num-images", "8", "--shard-size", "8"]
    assert ecar([*sample, "--batch-size", "8", "--cpus-per-actor", "1", "flow.steps_per_stage=[2,2,2]"]) == 0
    decoded = read_samples(samples, "images")
    assert decoded["images"].shape == (8, 256, 256, 3) and decoded["images"].dtype == np.uint8
    assert sorted(set(decoded["label"].tolist())) == list(range(len(CLASSES)))
    assert decoded["images"].std() > 0
