"""Fixtures for the integration tests: an MLflow tracking server on loopback, a small synthetic
latent data set (in the encode job's format) on the loopback S3 server, and an export whose
samples decode into images (for FID).

`ray_cluster` and `s3_server` come from tests/conftest.py.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and local proxied artifacts; yields its
    URL. Several processes (driver, rank-0 worker, test client) write to it, which a bare
    SQLite file would not survive."""
    from ecar.tracking import local_tracking_server

    root = tmp_path_factory.mktemp("mlflow")
    with local_tracking_server(f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"), timeout_s=90) as url:
        yield url


@pytest.fixture(scope="session")
def s3_latents(s3_server) -> str:
    """The synthetic latent set on the loopback S3 server; returns its s3:// prefix."""
    from ecar.train.synthetic import write_synthetic_latents

    return write_synthetic_latents(f"{_bucket_uri(s3_server)}/latents")


def _bucket_uri(s3_server: str) -> str:
    """s3://BUCKET: the bucket the `s3_server` fixture created at its endpoint."""
    import boto3

    buckets = boto3.client("s3", endpoint_url=s3_server).list_buckets()["Buckets"]
    return f"s3://{sorted(b['Name'] for b in buckets)[0]}"


@pytest.fixture(scope="session")
def tampered_latents(tmp_path_factory) -> dict[str, str]:
    """Local copies of the synthetic latent set, each with one defect in train shard 1 that the
    footers cannot show: {"nan": a NaN latent at row 5, "label": label 10 (= num_classes) at
    row 3, "corrupt": a data page overwritten with garbage}. Returns defect -> prefix."""
    import numpy as np
    import pyarrow as pa

    from ecar.data.manifest import latent_shard_uri
    from ecar.data.shards import read_table, shard_name, write_table
    from ecar.train.synthetic import write_synthetic_latents

    prefixes = {}
    for defect in ("nan", "label", "corrupt"):
        prefix = write_synthetic_latents(str(tmp_path_factory.mktemp(f"latents-{defect}")))
        shard = latent_shard_uri(prefix, "train", shard_name(1))
        if defect == "corrupt":
            data = bytearray(open(shard, "rb").read())
            data[100:400] = bytes(300)  # inside the first column chunk; the footer at the end stays intact
            open(shard, "wb").write(bytes(data))
        else:
            table = read_table(shard)
            if defect == "nan":
                values = np.array(table.column("latent").combine_chunks().flatten(), dtype=np.float32)
                values[5 * 256 + 17] = np.nan  # row 5 of 256-value latents (4 x 8 x 8)
                column = pa.FixedSizeListArray.from_arrays(pa.array(values), 256)
                table = table.set_column(table.schema.get_field_index("latent"), "latent", column)
            else:
                labels = table.column("label").to_numpy().copy()
                labels[3] = 10
                table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels))
            write_table(shard, table)
        prefixes[defect] = prefix
    return prefixes


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
