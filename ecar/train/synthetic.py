"""A synthetic latent data set in exactly the layout `ecar encode` writes (shards + manifest),
for the training tests and benchmarks: class-dependent Gaussian latents, no tokenizer needed.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ecar.config import StorageConfig


def write_synthetic_latents(
    prefix: str,
    storage_config: StorageConfig | None = None,
    rows: int = 256,
    shape: tuple[int, int, int] = (4, 8, 8),
    shards: int = 4,
    num_classes: int = 10,
    seed: int = 0,
    test_rows: int = 64,
    flip: bool = False,
) -> str:
    """Write `rows` train latents of `shape` (C, H, W) in `shards` Parquet files, `test_rows`
    held-out latents of the same classes in one file, and the manifest last, under `prefix`;
    returns `prefix` (what `--manifest` takes). With `flip`, the shards also carry
    `latent_flip`: each latent mirrored left to right, standing in for the mirror image's."""
    from ecar.data.encode import latent_schema
    from ecar.data.manifest import SCHEMA_VERSION, latent_shard_uri, write_manifest
    from ecar.data.shards import shard_name, write_table

    rng = np.random.default_rng(seed)
    dim = int(np.prod(shape))
    means = rng.standard_normal((num_classes, dim)).astype(np.float32)
    schema = latent_schema(dim, flip=flip)
    splits, latents = {}, None
    for split, count, parts in (("train", rows, shards), ("test", test_rows, 1)):
        if not count:
            continue
        labels = np.arange(count) % num_classes
        values = (means[labels] + 0.5 * rng.standard_normal((count, dim))).astype(np.float32)
        latents = values if split == "train" else latents
        entries = []
        for index, part in enumerate(np.array_split(np.arange(count), parts)):
            columns = {
                "id": [f"row-{i}" if split == "train" else f"{split}-{i}" for i in part],
                "label": labels[part].astype(np.int64),
                "latent": pa.FixedSizeListArray.from_arrays(pa.array(values[part].ravel()), dim),
            }
            if flip:
                mirrored = values[part].reshape(-1, *shape)[..., ::-1]
                columns["latent_flip"] = pa.FixedSizeListArray.from_arrays(pa.array(mirrored.ravel()), dim)
            table = pa.table(columns, schema=schema)
            write_table(latent_shard_uri(prefix, split, shard_name(index)), table, storage_config)
            entries.append({"name": shard_name(index), "rows": len(part), "quarantined": 0})
        splits[split] = {
            "rows": count,
            "quarantined": 0,
            "input_rows": count,
            "quarantine_reasons": {},
            "shards": entries,
        }
    std = float(latents.std())
    write_manifest(
        prefix,
        {
            "schema_version": SCHEMA_VERSION,
            "kind": "latents",
            "tokenizer": {"kind": "synthetic", "uri": "", "sha256": ""},
            "latent_shape": list(shape),
            "latent_dtype": "float32",
            "latent_scale": 1.0 / std,
            "latent_mean": float(latents.mean()),
            "latent_std": std,
            "scale_split": "train",
            "flip_augment": flip,
            "num_classes": num_classes,
            "class_names": [f"class {k}" for k in range(num_classes)],
            "image_size": 0,
            "image_channels": 0,
            "source": {"images_uri": "", "kind": "synthetic", "uri": ""},
            "splits": splits,
            "quarantined": 0,
        },
        storage_config,
    )
    return prefix
