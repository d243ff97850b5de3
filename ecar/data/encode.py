"""`encode`: prepared image shards -> latent Parquet shards + manifest, on Ray Data.

The driver plans the work (the image shards that have no latent shard yet) and hands it to an
actor pool (`map_batches` with the callable `ShardEncoder`, `ActorPoolStrategy(size=
data.encode_actors)`, one shard per call, one GPU per actor when the cluster has GPUs). Each
actor reads its image shard in batches of `data.encode_batch_size` rows, decodes, checks and
encodes them, and writes the shard's quarantine file and then its latent shard under the same
deterministic name, each in one atomic write. What comes back to the driver is a row count
per shard, so its memory does not grow with the data set (benchmarks/encode.py measures it).
So:
- a shard on storage is complete (one atomic write) and a re-run skips it;
- one actor writes one shard name, so no two writers race on it;
- rows + quarantined rows of every shard equal its input rows, checked before the manifest;
- ids are unique across the data set, checked before the manifest;
- the manifest is written last, by the driver, atomically, only when every shard is there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ecar import storage
from ecar.config import Config, ConfigError
from ecar.data import quarantine as q
from ecar.data.manifest import LATENT_DTYPE, SCHEMA_VERSION, latent_shard_uri, quarantine_shard_uri, write_manifest
from ecar.data.prepare import image_shard_uris, pixels_to_unit, read_images_manifest
from ecar.data.shards import is_complete, read_footer, write_table
from ecar.data.sources import BadImage, decode_image, to_array, to_mode
from ecar.log import get_logger
from ecar.progress import Progress
from ecar.tokenizer import LoadedTokenizer, load_tokenizer

log = get_logger(__name__)
CLAIM_NAME = "encode.json"
IMAGE_COLUMNS = ["id", "image", "label", "source"]


def latent_schema(dim: int, flip: bool) -> pa.Schema:
    fields = [("id", pa.string()), ("label", pa.int64()), ("latent", pa.list_(pa.float32(), dim))]
    if flip:
        fields.append(("latent_flip", pa.list_(pa.float32(), dim)))
    return pa.schema(fields)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class ShardEncoder:
    """Ray Data actor: holds the tokenizer; encodes whole image shards and writes their latent
    and quarantine shards under `output_uri`.

    In: uri, split, name (one image shard per row). Out: split, name, rows (input rows) and
    kept (rows written; the rest are quarantined)."""

    def __init__(self, config: dict[str, Any], num_classes: int, output_uri: str) -> None:
        self.config = Config.from_dict(config)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_tokenizer(self.config).model.to(self.device)
        self.num_classes, self.output_uri = num_classes, output_uri
        self.size, self.channels = self.config.data.image_size, self.config.data.image_channels
        self.flip = self.config.data.flip_augment

    def _check(self, image: Any, label: Any) -> tuple[np.ndarray | None, str]:
        if _is_missing(label):
            return None, q.MISSING_LABEL
        if not 0 <= int(label) < self.num_classes:
            return None, f"{q.BAD_LABEL}: {int(label)} not in [0, {self.num_classes})"
        if image is None:
            return None, f"{q.UNDECODABLE}: no image data"
        try:
            picture = decode_image(bytes(image))
        except BadImage as error:
            return None, str(error) if str(error).startswith(q.UNDECODABLE) else f"{q.UNDECODABLE}: {error}"
        if picture.size != (self.size, self.size):
            return None, f"{q.WRONG_SIZE}: {picture.size[0]}x{picture.size[1]}, expected {self.size}x{self.size}"
        return to_array(to_mode(picture, self.channels)), ""

    @torch.no_grad()
    def _encode(self, images_BCHW: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images_BCHW).to(self.device)
        return self.model.encode(x).float().flatten(1).cpu().numpy()

    def encode_rows(self, batch: dict[str, Sequence[Any]]) -> dict[str, np.ndarray]:
        """Check and encode image rows (id, image as PNG bytes, label, source). Out: id, source,
        label (-1 when unusable), reason ("" when the row is good, else the quarantine reason),
        latent (B, D) float32 and, with flips, latent_flip (B, D); unusable rows carry zeros."""
        n = len(batch["id"])
        reasons, arrays, good = [""] * n, [], []
        for row in range(n):
            array, reason = self._check(batch["image"][row], batch["label"][row])
            reasons[row] = reason
            if array is not None:
                arrays.append(array)
                good.append(row)
        dim = self.config.model.latent_channels * self.config.model.latent_size**2
        latent = np.zeros((n, dim), dtype=np.float32)
        flipped = np.zeros((n, dim), dtype=np.float32)
        if good:
            images = pixels_to_unit(np.stack(arrays))
            latent[good] = self._encode(images)
            if self.flip:
                flipped[good] = self._encode(images[:, :, :, ::-1].copy())
        for row in good:  # a tokenizer that diverged must not leak NaN into training
            if not (np.isfinite(latent[row]).all() and np.isfinite(flipped[row]).all()):
                reasons[row] = "non-finite latent"
        labels = np.asarray([-1 if r else int(batch["label"][i]) for i, r in enumerate(reasons)], dtype=np.int64)
        out = {
            "id": np.asarray([str(i) if not _is_missing(i) else "" for i in batch["id"]], dtype=object),
            "source": np.asarray([str(s) if s is not None else "" for s in batch["source"]], dtype=object),
            "label": labels,
            "reason": np.asarray(reasons, dtype=object),
            "latent": latent,
        }
        if self.flip:
            out["latent_flip"] = flipped
        return out

    def encode_shard(self, uri: str, split: str, name: str) -> tuple[int, int]:
        """Encode one image shard, streamed in batches, and write its outputs; returns (input
        rows, rows kept). Only this shard's latents are held, never the data set's."""
        fs, path = storage.arrow_fs(uri, self.config.storage)
        pieces, rows = [], 0
        parquet = pq.ParquetFile(path, filesystem=fs)
        for part in parquet.iter_batches(batch_size=self.config.data.encode_batch_size, columns=IMAGE_COLUMNS):
            pieces.append(self.encode_rows({column: part.column(column).to_pylist() for column in IMAGE_COLUMNS}))
            rows += part.num_rows
        return rows, _write_shard(self.output_uri, split, name, pieces, self.config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = [
            self.encode_shard(str(u), str(s), str(n)) for u, s, n in zip(batch["uri"], batch["split"], batch["name"])
        ]
        return {
            "split": batch["split"],
            "name": batch["name"],
            "rows": np.asarray([rows for rows, _ in counts], dtype=np.int64),
            "kept": np.asarray([kept for _, kept in counts], dtype=np.int64),
        }


def _write_shard(prefix: str, split: str, name: str, pieces: list[dict[str, np.ndarray]], config: Config) -> int:
    """Sort the file's rows by id (a deterministic order however they were batched), quarantine
    bad and duplicate rows, write the quarantine shard and then the latent shard; returns the
    rows written."""
    flip = config.data.flip_augment
    columns = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]} if pieces else {}
    ids = columns.get("id", np.asarray([], dtype=object)).astype(str)
    order = np.argsort(ids, kind="stable")
    bad = q.Quarantine()
    keep: list[int] = []
    previous = None
    for row in order:
        id, reason = ids[row], columns["reason"][row]
        if not id:
            reason = reason or "missing id"
        elif id == previous:
            reason = reason or q.DUPLICATE_ID
        if reason:
            bad.add(id, columns["source"][row], reason)
        else:
            keep.append(row)
        previous = id or previous
    dim = config.model.latent_channels * config.model.latent_size**2
    latent = columns["latent"][keep] if keep else np.zeros((0, dim), np.float32)
    arrays = {
        "id": pa.array(ids[keep] if keep else [], pa.string()),
        "label": pa.array(columns["label"][keep] if keep else [], pa.int64()),
        "latent": pa.FixedSizeListArray.from_arrays(pa.array(latent.reshape(-1), pa.float32()), dim),
    }
    if flip:
        flipped = columns["latent_flip"][keep] if keep else np.zeros((0, dim), np.float32)
        arrays["latent_flip"] = pa.FixedSizeListArray.from_arrays(pa.array(flipped.reshape(-1), pa.float32()), dim)
    table = pa.table(arrays, schema=latent_schema(dim, flip))
    values = latent.astype(np.float64)
    stats = {
        "rows": len(keep),
        "sum": float(values.sum()),
        "sum_squares": float((values**2).sum()),
        "values": int(values.size),
    }
    bad.write(quarantine_shard_uri(prefix, split, name), config.storage)
    write_table(latent_shard_uri(prefix, split, name), table, config.storage, metadata=stats)
    return len(keep)


def encode_latents(
    config: Config,
    images_uri: str,
    output_uri: str,
) -> dict[str, Any]:
    """Encode every prepared image shard under `images_uri` into `output_uri`; returns the manifest.
    A re-run (after a killed driver, a lost store) encodes only the shards not yet complete.
    Needs Ray running.
    """
    # recorded in the manifest, read and written by processes that run elsewhere: never relative
    images_uri, output_uri = storage.absolute(images_uri), storage.absolute(output_uri)
    if config.tokenizer.kind == "kl_vae":
        config = config.override({"tokenizer.checkpoint_uri": storage.absolute(config.tokenizer.checkpoint_uri)})
    images = read_images_manifest(images_uri, config)
    if (images["image_size"], images["image_channels"]) != (config.data.image_size, config.data.image_channels):
        raise ConfigError(
            f"data.image_size: the shards at {images_uri} hold {images['image_size']}x"
            f"{images['image_size']}x{images['image_channels']} images, the config asks for "
            f"{config.data.image_size}x{config.data.image_size}x{config.data.image_channels}"
        )
    class_names = images["class_names"]
    if len(class_names) != config.model.num_classes:
        raise ConfigError(
            f"model.num_classes: {config.model.num_classes} but the images have {len(class_names)} classes"
        )
    tokenizer = load_tokenizer(config)  # fail here, before any actor starts
    shape = list(
        tokenizer.model.encode(
            torch.zeros(1, config.data.image_channels, config.data.image_size, config.data.image_size)
        ).shape[1:]
    )
    expected = [config.model.latent_channels, config.model.latent_size, config.model.latent_size]
    if shape != expected:
        raise ConfigError(f"model.latent_size: the tokenizer makes {shape} latents, the config expects {expected}")
    storage.claim_output(
        output_uri,
        {
            "tokenizer": tokenizer.identity,
            "images_uri": images_uri,
            "flip_augment": config.data.flip_augment,
            "latent_shape": shape,
        },
        "latents",
        CLAIM_NAME,
        config.storage,
    )

    # which image shards still need a latent shard
    pending: list[dict[str, Any]] = []
    for split in images["splits"]:
        for uri in image_shard_uris(images_uri, split, images):
            name = uri.rsplit("/", 1)[-1]
            if not is_complete(latent_shard_uri(output_uri, split, name), config.storage):
                pending.append({"uri": uri, "split": split, "name": name})
    total = sum(len(s["shards"]) for s in images["splits"].values())
    log.info("encode: %d image shards, %d already encoded, %d to do", total, total - len(pending), len(pending))
    if pending:
        rows = sum(read_footer(task["uri"], config.storage)[0] for task in pending)
        _run_encoders(config, pending, rows, len(class_names), output_uri)
    return finalize(config, images_uri, images, output_uri, tokenizer, shape)


def _run_encoders(
    config: Config,
    pending: list[dict[str, Any]],
    rows: int,
    num_classes: int,
    output_uri: str,
) -> None:
    """The actor pool over the pending shards; the driver counts what comes back."""
    import ray
    from ray.data import ActorPoolStrategy

    resources = ray.cluster_resources()
    gpus = 1 if resources.get("GPU", 0) > 0 else 0
    pool_cpus = config.data.encode_actors * config.data.encode_cpus_per_actor
    if pool_cpus > resources.get("CPU", 0):
        # a pool that cannot be placed whole would wait for its missing actors for ever
        raise ConfigError(
            f"data.encode_actors: {config.data.encode_actors} actors x data.encode_cpus_per_actor="
            f"{config.data.encode_cpus_per_actor} need {pool_cpus:g} CPUs, the cluster has {resources.get('CPU', 0):g}"
        )
    encoded = ray.data.from_items(pending, override_num_blocks=len(pending)).map_batches(
        ShardEncoder,
        fn_constructor_kwargs={"config": config.to_dict(), "num_classes": num_classes, "output_uri": output_uri},
        batch_size=1,
        compute=ActorPoolStrategy(size=config.data.encode_actors),
        num_cpus=config.data.encode_cpus_per_actor,
        num_gpus=gpus,
    )
    written = 0
    with Progress(rows, "encode", "images") as progress:
        for shard in encoded.iter_rows():
            progress.update(int(shard["rows"]))
            written += 1
            log.debug("encode: %s/%s written (%d this run)", shard["split"], shard["name"], written)


def finalize(
    config: Config,
    images_uri: str,
    images: dict[str, Any],
    output_uri: str,
    tokenizer: LoadedTokenizer,
    shape: list[int],
) -> dict[str, Any]:
    """Check every shard (present; rows + quarantined = input rows; ids unique), apply the
    quarantine limit, measure the latent statistics from the shard footers, write the manifest.
    The latent scale is the tokenizer's own when it has one (a diffusers VAE's `scaling_factor`),
    else 1 / the measured std."""
    store = config.storage
    splits: dict[str, Any] = {}
    totals = {"sum": 0.0, "sum_squares": 0.0, "values": 0}
    scale_split = "train" if "train" in images["splits"] else next(iter(images["splits"]))
    for split in images["splits"]:
        shards = []
        for uri in image_shard_uris(images_uri, split, images):
            name = uri.rsplit("/", 1)[-1]
            shards.append(
                (
                    name,
                    latent_shard_uri(output_uri, split, name),
                    quarantine_shard_uri(output_uri, split, name),
                    read_footer(uri, store)[0],
                )
            )
        splits[split], footers = q.verify_split(f"encode {split}", shards, config.data.quarantine_limit, store)
        if split == scale_split:
            for stats in footers:
                for key in totals:
                    totals[key] += stats[key]
    if totals["values"] == 0:
        raise ValueError(f"no usable rows in the {scale_split} split: cannot measure the latent scale")
    mean = totals["sum"] / totals["values"]
    std = math.sqrt(max(totals["sum_squares"] / totals["values"] - mean**2, 0.0))
    if std == 0.0:
        raise ValueError("the latents have zero variance: the tokenizer is degenerate")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": "latents",
        "tokenizer": tokenizer.identity,
        "latent_shape": shape,
        "latent_dtype": LATENT_DTYPE,
        "latent_scale": tokenizer.latent_scale or 1.0 / std,
        "latent_scale_source": "tokenizer" if tokenizer.latent_scale else "measured",
        "latent_mean": mean,
        "latent_std": std,
        "scale_split": scale_split,
        "flip_augment": config.data.flip_augment,
        "num_classes": len(images["class_names"]),
        "class_names": images["class_names"],
        "image_size": config.data.image_size,
        "image_channels": config.data.image_channels,
        "source": {"images_uri": images_uri, **images["source"]},
        "splits": splits,
        "quarantined": sum(s["quarantined"] for s in splits.values()),
    }
    write_manifest(output_uri, manifest, store)
    log.info(
        "encode: manifest written: %s",
        ", ".join(f"{k} {v['rows']} rows ({v['quarantined']} quarantined)" for k, v in splits.items()),
    )
    return manifest
