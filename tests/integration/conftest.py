"""Fixtures for the integration tests: an MLflow tracking server on loopback, a small synthetic
latent data set (in the encode job's format) on the loopback S3 server, and tampered copies of it.

`ray_cluster`, `s3_server` and `decodable_checkpoint` (an export whose samples decode into
images) come from tests/conftest.py.
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
