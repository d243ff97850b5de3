"""A pretrained diffusers VAE for real: a random-init AutoencoderKL of SD's shape, saved with
`save_pretrained`, through prepare -> encode (Ray Data actors) -> training steps -> the sampling
job, whose images the VAE decodes. The latent scale is the folder's `scaling_factor` throughout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ecar.data.encode import encode_latents
from ecar.data.prepare import prepare_images, read_image_split
from ecar.data.reader import read_latents, validate_latents
from ecar.export import save_exported
from ecar.models import build_model
from ecar.presets import get_config
from ecar.sampler import read_samples, sample_to_storage, to_uint8
from ecar.tokenizer import decoder_for_manifest, load_tokenizer
from ecar.train.ema import EMA
from ecar.train.loop import TorchBackend, TrainState, train

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]  # two actor pools start: minutes on a busy machine


def test_a_diffusers_vae_goes_through_encode_train_sample_decode(ray_cluster, tiny_sd_vae, class_folders, tmp_path):
    tree = class_folders(tmp_path / "tree", ["n01", "n02"], per_class=8, sizes=[(96, 72), (64, 80), (128, 128)])
    # ecar-debug's 8x8x4 latent is what an 8x-down, 4-channel VAE makes of 64x64 RGB images
    config = get_config(
        "ecar-debug",
        {
            "data.source": "image_folder",
            "data.source_uri": tree,
            "data.image_size": 64,
            "data.image_channels": 3,
            "data.shard_rows": 8,
            "data.encode_batch_size": 4,
            "model.num_classes": 2,
            "tokenizer.kind": "diffusers",
            "tokenizer.checkpoint_uri": tiny_sd_vae,
            "train.steps": 3,
            "train.num_workers": 1,
            "train.global_batch_size": 8,
            "train.micro_batch_size": 8,
        },
    )
    images_uri, latents_uri = str(tmp_path / "images"), str(tmp_path / "latents")
    prepare_images(config, images_uri)
    manifest = encode_latents(config, images_uri, latents_uri)
    scaling_factor = json.loads((Path(tiny_sd_vae) / "config.json").read_text())["scaling_factor"]
    assert manifest["latent_scale"] == scaling_factor == 0.5 and manifest["latent_scale_source"] == "tokenizer"
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["splits"]["train"]["rows"] == 16
    assert manifest["tokenizer"] == load_tokenizer(config).identity
    validate_latents(latents_uri)

    # what training reads is scaling_factor x the VAE's posterior mean of the prepared images
    vae = load_tokenizer(config).model
    pixels = read_image_split(images_uri, "train", 16, config)
    latents, labels = read_latents(latents_uri, "train", 16)
    with torch.no_grad():
        torch.testing.assert_close(latents, scaling_factor * vae.encode(pixels), rtol=1e-4, atol=1e-4)
    assert sorted(labels.tolist()) == [0] * 8 + [1] * 8

    torch.manual_seed(0)
    backend = TorchBackend(build_model(config), config.train)
    ema = EMA(backend.ema_sources(), config.train.ema_decay)
    losses = []
    state = train(
        backend,
        config.override({"train.log_every": 1}),
        lambda epoch: [(latents[:8], labels[:8]), (latents[8:], labels[8:])],
        TrainState(),
        ema,
        on_step=lambda state, due, metrics: losses.append(metrics["loss"]) if metrics else None,
    )
    assert state.step == 3 and len(losses) == 3 and np.isfinite(losses).all()
    export = save_exported(
        ema.state_dict(), config, str(tmp_path / "export"), manifest["latent_scale"], latents_uri, step=state.step
    )

    samples_uri = str(tmp_path / "samples")
    sample_to_storage(export, samples_uri, 4, shard_size=4, batch_size=4, actors=1, cpus_per_actor=0.5)
    samples = read_samples(samples_uri, "images")
    assert samples["images"].shape == (4, 64, 64, 3) and samples["images"].dtype == np.uint8
    # the images are the VAE's decoding of the unscaled latents the job stored beside them
    stored = torch.from_numpy(read_samples(samples_uri, "latents")["latents"].astype(np.float32))
    decode = decoder_for_manifest(manifest, config)
    with torch.no_grad():
        again = to_uint8(decode(stored)).astype(int)
    assert np.abs(again - samples["images"].astype(int)).max() <= 2  # the stored latents are float16
