"""Shared fixtures: one local Ray cluster per session, a loopback S3 server (moto), storage roots,
an export whose samples decode into images.

Test credentials go into the environment when this file is imported; the S3 endpoint when the
server has bound its port, which `ray_cluster` waits for (workers inherit the environment only
at `ray.init`).
"""

from __future__ import annotations

import os
import uuid

import pytest

# Keeps the one-node cluster on 127.0.0.1; read when ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

TEST_BUCKET = "ecar-test"

os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
)
for leaked in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
    os.environ.pop(leaked, None)


@pytest.fixture(scope="session")
def s3_server():
    """moto's threaded S3 server on loopback; yields its endpoint URL, with TEST_BUCKET created.

    The server binds port 0, so the port is the one it holds: nothing can take it between
    choosing and binding. The endpoint is in the environment from here to the session's end."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", endpoint)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=TEST_BUCKET)
        yield endpoint
        server.stop()


@pytest.fixture
def s3_prefix(s3_server) -> str:
    """A fresh s3://ecar-test/<unique> prefix."""
    return f"s3://{TEST_BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def tmp_storage(tmp_path) -> str:
    """A fresh local storage root (a path string, as a user would give one)."""
    root = tmp_path / "storage"
    root.mkdir()
    return str(root)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the whole session (each ray.init costs seconds). It depends on
    the S3 server only so that the endpoint is serving before any worker tries it."""
    import ray

    if not ray.is_initialized():
        # the dashboard (on loopback) lets Ray Train clean up after a controller Tune stopped
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_sd_vae(tmp_path_factory) -> str:
    """A randomly initialised diffusers AutoencoderKL of SD's VAE shape (four encoder blocks: 8x
    down-sampling; 4 latent channels) at tiny widths, saved with `save_pretrained`: the folder a
    user points tokenizer.checkpoint_uri at, with no weights shipped or downloaded. Its
    scaling_factor is 0.5, not SD's 0.18215, so that a literal anywhere would show."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=0.5,
    )
    path = tmp_path_factory.mktemp("sd-vae")
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def class_folders():
    """Writes a synthetic ImageNet-style tree, ROOT/CLASS/NAME.JPEG (`classes` folders of
    `per_class` photos whose sizes cycle through `sizes`, mixed orientations), and returns ROOT."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    def write(root: Path, classes: list[str], per_class: int, sizes: list[tuple[int, int]], seed: int = 0) -> str:
        rng = np.random.default_rng(seed)
        for label, name in enumerate(classes):
            (root / name).mkdir(parents=True)
            for index in range(per_class):
                width, height = sizes[index % len(sizes)]
                # a smooth class-tinted gradient plus noise: JPEG-friendly, not constant
                ramp = np.linspace(0, 1, width)[None, :, None] * np.linspace(0, 1, height)[:, None, None]
                tint = np.array([(label * 67) % 256, (label * 131) % 256, 200], dtype=np.float64)
                pixels = ramp * tint + rng.normal(0, 20, (height, width, 3))
                picture = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                picture.save(root / name / f"{name}_{index:04d}.JPEG", format="JPEG", quality=90)
        return str(root)

    return write


@pytest.fixture(scope="session")
def decodable_checkpoint(ray_cluster, tmp_path_factory):
    """An ecar-debug export whose latent manifest names a (fresh) KL-VAE tokenizer and real
    Fashion-MNIST test images: everything a sampling trial needs for FID."""
    import torch

    from ecar.data.manifest import SCHEMA_VERSION, write_manifest
    from ecar.data.prepare import prepare_images
    from ecar.export import save_exported
    from ecar.models import build_model
    from ecar.presets import get_config
    from ecar.tokenizer.vae import KLVAE, save_vae, vae_shape

    root = tmp_path_factory.mktemp("sampling-sweep")
    config = get_config("ecar-debug")
    images_uri = str(root / "images")
    prepare_images(config, images_uri, splits=["test"], limit_per_split=16)
    torch.manual_seed(0)
    tokenizer_uri = str(root / "tokenizer")
    described = save_vae(KLVAE(vae_shape(config)), tokenizer_uri, config.data.image_size)
    latents = str(root / "latents")
    write_manifest(
        latents,
        {
            "schema_version": SCHEMA_VERSION,
            "kind": "latents",
            "splits": {},
            "source": {"images_uri": images_uri},
            "tokenizer": {"kind": "kl_vae", "uri": tokenizer_uri, "sha256": described["weights_sha256"]},
            "latent_shape": [config.model.latent_channels, config.model.latent_size, config.model.latent_size],
            "latent_dtype": "float32",
            "latent_scale": 1.0,
            "num_classes": config.model.num_classes,
            "flip_augment": False,
        },
    )
    model = build_model(config)
    with torch.no_grad():  # off the zero-initialised outputs, so that the schedule matters
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    export = str(root / "export")
    save_exported(model.state_dict(), config, export, latent_scale=1.0, manifest_uri=latents)
    return export


@pytest.fixture(scope="session")
def random_tokenizer(tmp_path_factory) -> str:
    """An untrained debug tokenizer: a pipeline's bookkeeping does not depend on its quality."""
    import torch

    from ecar.presets import get_config
    from ecar.tokenizer.vae import KLVAE, save_vae, vae_shape

    uri = str(tmp_path_factory.mktemp("tokenizer"))
    torch.manual_seed(0)
    save_vae(KLVAE(vae_shape(get_config("ecar-debug"))), uri, 16)
    return uri
