"""`prepare`: an image source -> image shards at the configured resolution on storage.

Layout under the output prefix (`data.images_uri`):
    SPLIT/shard-00000.parquet             id, image (PNG bytes, size x size, 1 or 3 channels), label, source
    quarantine/SPLIT/shard-00000.parquet  id, source, reason   (written before its image shard)
    images.json                           written last: class names, rows and quarantine counts per split

Shard i of a split holds the source's records [i * shard_rows, (i + 1) * shard_rows) in the
source's fixed key order, so a re-run writes only the shards that are missing.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ecar import storage
from ecar.config import Config
from ecar.data import quarantine as q
from ecar.data.shards import IMAGE_SCHEMA, read_table, shard_name, write_table
from ecar.data.sources import (
    BadImage,
    ImageRecord,
    ImageSource,
    decode_image,
    encode_png,
    open_source,
    resize_center_crop,
    to_array,
    to_mode,
)
from ecar.log import get_logger
from ecar.progress import track

SCHEMA_VERSION = 1
MANIFEST_NAME = "images.json"
log = get_logger(__name__)


def preprocess(record: ImageRecord, size: int, channels: int) -> bytes:
    """The record's image as PNG bytes, size x size with `channels` channels; BadImage if unusable."""
    if record.image is None:
        raise BadImage(f"{q.UNDECODABLE}: no image data")
    picture = decode_image(record.image)
    picture = resize_center_crop(to_mode(picture, channels), size)
    return encode_png(to_array(picture))


def _prepare_shard(
    source: ImageSource, split: str, keys: list[str], config: Config, num_classes: int
) -> tuple[pa.Table, q.Quarantine]:
    rows: list[dict[str, Any]] = []
    bad = q.Quarantine()
    seen: set[str] = set()
    for record in source.load(split, keys):
        if record.id in seen:
            bad.add(record.id, record.source, q.DUPLICATE_ID)
            continue
        seen.add(record.id)
        if record.label is None:
            bad.add(record.id, record.source, q.MISSING_LABEL)
            continue
        if not 0 <= record.label < num_classes:
            bad.add(record.id, record.source, f"{q.BAD_LABEL}: {record.label} not in [0, {num_classes})")
            continue
        try:
            png = preprocess(record, config.data.image_size, config.data.image_channels)
        except BadImage as error:
            reason = str(error)
            bad.add(
                record.id, record.source, reason if reason.startswith(q.UNDECODABLE) else f"{q.UNDECODABLE}: {reason}"
            )
            continue
        rows.append({"id": record.id, "image": png, "label": int(record.label), "source": record.source})
    return pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), bad


def prepare_images(
    config: Config,
    output_uri: str,
    source: ImageSource | None = None,
    splits: list[str] | None = None,
    limit_per_split: int | None = None,
) -> dict[str, Any]:
    """Write the image shards of `source` (default: `data.source`) under `output_uri`; returns
    the images manifest. `limit_per_split` takes the first N records of each split (tests,
    quick runs); it is recorded in the manifest."""
    store = config.storage
    source = source or open_source(config.data, store, config.model.num_classes)
    class_names = source.class_names() or [str(i) for i in range(config.model.num_classes)]
    splits = splits or source.splits()
    manifest_splits: dict[str, Any] = {}
    for split in splits:
        keys = source.keys(split)[:limit_per_split]
        chunks = [keys[i : i + config.data.shard_rows] for i in range(0, len(keys), config.data.shard_rows)]
        done = set(storage.list_files(storage.join(output_uri, split), ".parquet", store))
        written = 0
        for index, chunk in track(enumerate(chunks), len(chunks), f"prepare {split}", "shards"):
            target = storage.join(output_uri, split, shard_name(index))
            if target in done:
                continue
            table, bad = _prepare_shard(source, split, chunk, config, len(class_names))
            bad.write(storage.join(output_uri, "quarantine", split, shard_name(index)), store)
            write_table(target, table, store, metadata={"source_rows": len(chunk)})
            written += 1
        log.info(
            "prepare %s/%s: %d shards (%d written now, %d already there)",
            source.name,
            split,
            len(chunks),
            written,
            len(chunks) - written,
        )
        manifest_splits[split], _ = q.verify_split(
            f"prepare {split}",
            [
                (
                    shard_name(i),
                    storage.join(output_uri, split, shard_name(i)),
                    storage.join(output_uri, "quarantine", split, shard_name(i)),
                    len(chunk),
                )
                for i, chunk in enumerate(chunks)
            ],
            config.data.quarantine_limit,
            store,
        )
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": "images",
        "source": {
            "kind": source.name,
            "uri": getattr(source, "uri", getattr(source, "root", "")),
            "limit_per_split": limit_per_split,
        },
        "image_size": config.data.image_size,
        "image_channels": config.data.image_channels,
        "class_names": class_names,
        "splits": manifest_splits,
    }
    storage.write_text_atomic(storage.join(output_uri, MANIFEST_NAME), json.dumps(manifest, indent=2), store)
    return manifest


def read_images_manifest(images_uri: str, config: Config) -> dict[str, Any]:
    uri = storage.join(images_uri, MANIFEST_NAME)
    if not storage.exists(uri, config.storage):
        raise FileNotFoundError(f"no image shards at {images_uri} (missing {MANIFEST_NAME}; run `ecar prepare` first)")
    return json.loads(storage.read_text(uri, config.storage))


def image_shard_uris(images_uri: str, split: str, manifest: dict[str, Any]) -> list[str]:
    if split not in manifest["splits"]:
        raise ValueError(f"{images_uri} has no split {split!r} (splits: {', '.join(manifest['splits'])})")
    return [storage.join(images_uri, split, shard["name"]) for shard in manifest["splits"][split]["shards"]]


def pixels_to_unit(arrays_BHWC: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [-1, 1], the tokenizer's input range."""
    return (arrays_BHWC.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


def decode_pngs(images: list[bytes], channels: int) -> np.ndarray:
    """Prepared PNG shards -> float32 (B, C, H, W) in [-1, 1]."""
    return pixels_to_unit(np.stack([to_array(to_mode(decode_image(b), channels)) for b in images]))


def read_image_split(images_uri: str, split: str, limit: int, config: Config) -> torch.Tensor:
    """The first `limit` images of a prepared split, (N, C, H, W) float32 in [-1, 1]."""
    manifest = read_images_manifest(images_uri, config)
    arrays: list[np.ndarray] = []
    count = 0
    for uri in image_shard_uris(images_uri, split, manifest):
        if count >= limit:
            break
        column = read_table(uri, config.storage, columns=["image"]).column("image").to_pylist()[: limit - count]
        arrays.append(decode_pngs(column, config.data.image_channels))
        count += len(column)
    if not arrays:
        raise ValueError(f"{images_uri}/{split} holds no images")
    return torch.from_numpy(np.concatenate(arrays))
