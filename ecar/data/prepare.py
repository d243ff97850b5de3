"""`prepare`: an image source -> image shards at the configured resolution on storage, on Ray Data.

Layout under the output prefix (`data.images_uri`):
    SPLIT/shard-00000.parquet             id, image (PNG bytes, size x size, 1 or 3 channels), label, source
    quarantine/SPLIT/shard-00000.parquet  id, source, reason   (written before its image shard)
    images.json                           written last: class names (label i is class_names[i]),
                                          rows and quarantine counts per split

Shard i of a split holds the source's records [i * shard_rows, (i + 1) * shard_rows) in the
source's fixed key order, so a re-run writes only the shards that are missing. The driver lists
the keys and plans the shards; Ray Data tasks across the cluster read, decode, resize and write
them (one task per shard: its quarantine file, then its image shard, each one atomic write);
the driver checks every shard and writes images.json last. Needs Ray running.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ecar import storage
from ecar.config import Config
from ecar.data import quarantine as q
from ecar.data.shards import IMAGE_SCHEMA, is_complete, read_table, shard_name, write_table
from ecar.data.sources import (
    BadImage,
    ImageRecord,
    ImageSource,
    center_crop,
    decode_image,
    encode_png,
    open_source,
    to_array,
    to_mode,
)
from ecar.log import get_logger
from ecar.progress import Progress

if TYPE_CHECKING:  # torch only for read_image_split: prepare's tasks start without importing it
    import torch

SCHEMA_VERSION = 1
MANIFEST_NAME = "images.json"
CLAIM_NAME = "prepare-run.json"  # what the folder holds, written before the first shard
log = get_logger(__name__)


def preprocess(record: ImageRecord, size: int, channels: int) -> bytes:
    """The record's image as PNG bytes, size x size with `channels` channels; BadImage if unusable."""
    if record.error:
        raise BadImage(f"{q.UNREADABLE}: {record.error}")
    if record.image is None:
        raise BadImage(f"{q.UNDECODABLE}: no image data")
    picture = decode_image(record.image)
    picture = center_crop(to_mode(picture, channels), size)
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
                record.id,
                record.source,
                reason if reason.startswith((q.UNDECODABLE, q.UNREADABLE)) else f"{q.UNDECODABLE}: {reason}",
            )
            continue
        rows.append({"id": record.id, "image": png, "label": int(record.label), "source": record.source})
    return pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), bad


def _shard_uris(output_uri: str, split: str, index: int) -> tuple[str, str]:
    """(image shard, its quarantine file) of shard `index` of `split`."""
    return (
        storage.join(output_uri, split, shard_name(index)),
        storage.join(output_uri, "quarantine", split, shard_name(index)),
    )


def write_shards(
    batch: dict[str, np.ndarray], source: ImageSource, config: dict[str, Any], num_classes: int, output_uri: str
) -> dict[str, np.ndarray]:
    """Ray Data task: prepare and write the planned shards of `batch` (split, index, keys) on
    this worker; returns their row counts, the only thing the driver receives."""
    settings = Config.from_dict(config)
    counts = []
    for split, index, keys in zip(batch["split"], batch["index"], batch["keys"]):
        table, bad = _prepare_shard(source, str(split), [str(k) for k in keys], settings, num_classes)
        target, quarantined = _shard_uris(output_uri, str(split), int(index))
        bad.write(quarantined, settings.storage)
        write_table(target, table, settings.storage, metadata={"source_rows": len(keys)})
        counts.append(len(keys))
    return {"split": batch["split"], "index": batch["index"], "rows": np.asarray(counts, dtype=np.int64)}


def prepare_images(
    config: Config,
    output_uri: str,
    source: ImageSource | None = None,
    splits: list[str] | None = None,
    limit_per_split: int | None = None,
) -> dict[str, Any]:
    """Write the image shards of `source` (default: `data.source`) under `output_uri`; returns
    the images manifest. `limit_per_split` takes the first N records of each split (tests,
    quick runs); it is recorded in the manifest. Needs Ray running when shards are missing."""
    store, output_uri = config.storage, storage.absolute(output_uri)  # written by workers elsewhere
    source = source or open_source(config.data, store, config.model.num_classes)
    claim_images_output(config, output_uri, source, limit_per_split)
    class_names = source.class_names() or [str(i) for i in range(config.model.num_classes)]
    plan: dict[str, list[int]] = {}  # split -> input rows of each shard
    pending: list[dict[str, Any]] = []
    for split in splits or source.splits():
        keys = source.keys(split)[:limit_per_split]
        chunks = [keys[i : i + config.data.shard_rows] for i in range(0, len(keys), config.data.shard_rows)]
        plan[split] = [len(chunk) for chunk in chunks]
        listed = set(storage.list_files(storage.join(output_uri, split), ".parquet", store))
        todo = [
            i
            for i in range(len(chunks))
            if (uri := _shard_uris(output_uri, split, i)[0]) not in listed or not is_complete(uri, store)
        ]
        pending += [{"split": split, "index": i, "keys": chunks[i]} for i in todo]
        log.info("prepare %s/%s: %d shards, %d already there", source.name, split, len(chunks), len(chunks) - len(todo))
    if pending:
        _run_tasks(pending, source, config, len(class_names), output_uri)
    manifest_splits = {
        split: q.verify_split(
            f"prepare {split}",
            [(shard_name(i), *_shard_uris(output_uri, split, i), rows) for i, rows in enumerate(counts)],
            config.data.quarantine_limit,
            store,
        )[0]
        for split, counts in plan.items()
    }
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": "images",
        "source": {
            "kind": source.name,
            "uri": _source_uri(source),
            "limit_per_split": limit_per_split,
        },
        "image_size": config.data.image_size,
        "image_channels": config.data.image_channels,
        "class_names": class_names,
        "splits": manifest_splits,
    }
    storage.write_text_atomic(storage.join(output_uri, MANIFEST_NAME), json.dumps(manifest, indent=2), store)
    return manifest


def _source_uri(source: ImageSource) -> str:
    return getattr(source, "uri", getattr(source, "root", ""))


def claim_images_output(config: Config, output_uri: str, source: ImageSource, limit_per_split: int | None) -> None:
    """Record what `output_uri` holds (or check that a re-run asks for the same): shards of
    another source, size, channel count or shard layout must never be mixed with these, nor an
    images.json describe shards it did not write. Call before Ray starts."""
    storage.claim_output(
        storage.absolute(output_uri),
        {
            "source": source.name,
            "source_uri": _source_uri(source),
            "image_size": config.data.image_size,
            "image_channels": config.data.image_channels,
            "shard_rows": config.data.shard_rows,
            "limit_per_split": limit_per_split,
        },
        "image shards",
        CLAIM_NAME,
        config.storage,
    )


def _run_tasks(
    pending: list[dict[str, Any]], source: ImageSource, config: Config, num_classes: int, output_uri: str
) -> None:
    """One Ray Data task per missing shard, spread over the cluster's CPUs; the driver only
    counts the rows that come back."""
    import ray

    tasks = ray.data.from_items(pending, override_num_blocks=len(pending))
    written = tasks.map_batches(
        write_shards,
        fn_kwargs={"source": source, "config": config.to_dict(), "num_classes": num_classes, "output_uri": output_uri},
        batch_size=1,
    )
    with Progress(sum(len(task["keys"]) for task in pending), "prepare", "images") as progress:
        for row in written.iter_rows():
            progress.update(int(row["rows"]))


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


def _first_values(images_uri: str, split: str, limit: int, config: Config, column: str) -> list[Any]:
    """The first `limit` values of one column of a prepared split, in shard order."""
    manifest = read_images_manifest(images_uri, config)
    values: list[Any] = []
    for uri in image_shard_uris(images_uri, split, manifest):
        if len(values) >= limit:
            break
        values += read_table(uri, config.storage, columns=[column]).column(column).to_pylist()[: limit - len(values)]
    return values


def read_image_labels(images_uri: str, split: str, limit: int, config: Config) -> np.ndarray:
    """The labels of the first `limit` images of a prepared split (read_image_split's order), int64."""
    return np.asarray(_first_values(images_uri, split, limit, config, "label"), dtype=np.int64)


def read_image_split(images_uri: str, split: str, limit: int, config: Config) -> torch.Tensor:
    """The first `limit` images of a prepared split, (N, C, H, W) float32 in [-1, 1]."""
    images = _first_values(images_uri, split, limit, config, "image")
    if not images:
        raise ValueError(f"{images_uri}/{split} holds no images")
    import torch

    return torch.from_numpy(decode_pngs(images, config.data.image_channels))
