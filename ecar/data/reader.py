"""Reading latents back: validation against the manifest, and the streaming Ray Dataset that
training consumes.

`latent_dataset(manifest_uri, split)` returns a Ray Dataset with exactly these columns:

    latent       float32, shape (C, h, w) per row  -> iter_torch_batches gives (B, C, h, w).
                 `scale * E(x)` with the manifest's latent_scale when scaled=True (the default):
                 the flow model's data, of unit variance; divide by manifest["latent_scale"]
                 before the tokenizer's decode.
    latent_flip  (only for flip_augment latents with flip="random") the same for the mirror
                 image. `torch_batches` chooses between the two per row and epoch.
    label        int64, shape () per row            -> (B,), class index in [0, num_classes).
    id           string (only with keep_ids=True; strings cannot become tensors, so leave it out
                 for iter_torch_batches).

Shuffling: the shard files are read in a seeded random order (`shuffle="files"`), and
`torch_batches` mixes rows within a buffer of data.shuffle_buffer_rows; no global shuffle (it
would materialise the data set).

Mirroring is chosen as the batches leave the stream, not inside the Dataset: a Dataset's map
cannot know which epoch it serves, so a choice made there would repeat every epoch. In
`torch_batches` it is a function of (seed, epoch, rank, batch index, row): another draw each
epoch, and the same draw when an epoch is replayed after a restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ecar import storage
from ecar.config import StorageConfig
from ecar.data.manifest import read_manifest, shard_uris
from ecar.data.shards import read_footer, read_table


class LatentValidationError(ValueError):
    """A latent shard disagrees with its manifest; the message names the file (and row)."""


def _latent_columns(manifest: dict[str, Any]) -> list[str]:
    return ["latent", "latent_flip"] if manifest["flip_augment"] else ["latent"]


def as_manifest(manifest: str | dict[str, Any], storage_config: StorageConfig | None = None) -> dict[str, Any]:
    """A manifest already read (a dict, passed through), or read from its prefix or URI."""
    return manifest if isinstance(manifest, dict) else read_manifest(manifest, storage_config)


def validate_latents(
    uri: str | dict[str, Any],
    splits: list[str] | None = None,
    storage_config: StorageConfig | None = None,
    values: bool = True,
) -> dict[str, Any]:
    """Check every shard of `splits` (default: all) against the manifest; returns the manifest.

    Footer checks (cheap): the file exists, its row count is the manifest's, `latent` (and
    `latent_flip`) is a fixed-size list of float32 of length C*h*w, `label` is int64. With
    `values`: no NaN/Inf latents, labels in [0, num_classes). The first violation raises
    LatentValidationError naming the file and, for value errors, the row. `uri` may be the
    manifest already read.
    """
    manifest = as_manifest(uri, storage_config)
    dim = int(np.prod(manifest["latent_shape"]))
    for split in splits or list(manifest["splits"]):
        for shard, file in zip(manifest["splits"][split]["shards"], shard_uris(manifest, split)):
            if not storage.exists(file, storage_config):
                raise LatentValidationError(f"{file}: listed in the manifest but missing")
            rows, _, schema = read_footer(file, storage_config)
            if rows != shard["rows"]:
                raise LatentValidationError(f"{file}: {rows} rows, the manifest says {shard['rows']}")
            for column in _latent_columns(manifest):
                if column not in schema.names:
                    raise LatentValidationError(f"{file}: no `{column}` column")
                kind = schema.field(column).type
                if not (
                    pa.types.is_fixed_size_list(kind) and kind.list_size == dim and kind.value_type == pa.float32()
                ):
                    raise LatentValidationError(
                        f"{file}: `{column}` is {kind}, the manifest says "
                        f"{manifest['latent_dtype']} x {dim} ({manifest['latent_shape']})"
                    )
            if "label" not in schema.names or schema.field("label").type != pa.int64():
                raise LatentValidationError(f"{file}: `label` must be an int64 column")
            if values:
                _validate_values(file, manifest, storage_config)
    return manifest


def _validate_values(file: str, manifest: dict[str, Any], storage_config: StorageConfig | None) -> None:
    dim = int(np.prod(manifest["latent_shape"]))
    table = read_table(file, storage_config)  # a corrupt or truncated page: ShardError naming the file
    for column in _latent_columns(manifest):
        flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        finite = np.isfinite(flat.reshape(-1, dim)).all(axis=1)
        if not finite.all():
            row = int(np.argmin(finite))
            raise LatentValidationError(
                f"{file}: row {row} (id {table.column('id')[row].as_py()!r}) has a NaN or Inf in `{column}`"
            )
    labels = table.column("label")
    bad = pc.or_(pc.is_null(labels), pc.or_(pc.less(labels, 0), pc.greater_equal(labels, manifest["num_classes"])))
    bad = bad.combine_chunks().fill_null(True).to_numpy(zero_copy_only=False)
    if bad.any():
        row = int(np.argmax(bad))
        raise LatentValidationError(
            f"{file}: row {row} has label {labels[row].as_py()!r}, not in [0, {manifest['num_classes']})"
        )


def _to_tensors(shape: list[int], scale: float, flip: bool, keep_ids: bool):
    """Arrow batch -> {"latent": (B, C, h, w) float32[, "latent_flip"], "label": (B,) int64[, "id"]}."""

    def column(batch: pa.Table, name: str) -> np.ndarray:
        flat = batch.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return (flat.reshape(batch.num_rows, *shape) * scale).astype(np.float32)

    def convert(batch: pa.Table) -> dict[str, np.ndarray]:
        out = {"latent": column(batch, "latent"), "label": batch.column("label").to_numpy().astype(np.int64)}
        if flip:
            out["latent_flip"] = column(batch, "latent_flip")
        if keep_ids:
            out["id"] = np.asarray(batch.column("id").to_pylist(), dtype=object)
        return out

    return convert


def latent_dataset(
    uri: str | dict[str, Any],
    split: str = "train",
    storage_config: StorageConfig | None = None,
    seed: int | None = None,
    scaled: bool = True,
    flip: str = "random",
    keep_ids: bool = False,
    validate: bool = True,
):
    """A streaming Ray Dataset over the latents of `split` (layout in the module docstring).

    `uri`: the latent prefix, its manifest.json or the manifest already read. `seed` fixes the file order (None: a fresh
    order each call). `flip="none"` ignores stored mirror latents.
    `validate` runs the footer checks of `validate_latents` first (not the value scan).
    """
    import ray

    manifest = (
        validate_latents(uri, [split], storage_config, values=False) if validate else as_manifest(uri, storage_config)
    )
    files = shard_uris(manifest, split)
    filesystem, _ = storage.arrow_fs(files[0] if files else manifest["prefix"], storage_config)
    paths = [storage.arrow_fs(f, storage_config)[1] for f in files]
    use_flip = manifest["flip_augment"] and flip == "random"
    columns = ["label", "latent"] + (["latent_flip"] if use_flip else []) + (["id"] if keep_ids else [])
    shuffle = ray.data.FileShuffleConfig(seed=seed) if seed is not None else "files"
    dataset = ray.data.read_parquet(paths, filesystem=filesystem, shuffle=shuffle).select_columns(columns)
    convert = _to_tensors(manifest["latent_shape"], manifest["latent_scale"] if scaled else 1.0, use_flip, keep_ids)
    return dataset.map_batches(convert, batch_format="pyarrow")


def torch_batches(
    dataset,
    batch_size: int,
    shuffle_buffer_rows: int,
    seed: int | None = None,
    device: str = "cpu",
    drop_last: bool = True,
    *,
    epoch: int = 0,
    rank: int = 0,
    prefetch_batches: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Epoch `epoch` of `dataset` (a Ray Dataset, or a Ray Train worker's shard of one) as
    {"latent": (B, C, h, w) float32, "label": (B,) int64}.

    Rows are mixed in a local shuffle buffer of `shuffle_buffer_rows` (0: none). Where the
    stream carries `latent_flip`, each row is the latent of its image or of the mirror image
    with probability 1/2. With a `seed`, the buffer's draws are a function of (seed, epoch) and
    the mirror choices of (seed, epoch, rank, batch index, row); None draws afresh.
    """
    buffer = shuffle_buffer_rows or None
    batches = dataset.iter_torch_batches(
        batch_size=batch_size,
        device=device,
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
        dtypes={"latent": torch.float32, "latent_flip": torch.float32, "label": torch.int64},
        local_shuffle_buffer_size=buffer,
        local_shuffle_seed=seed * 100003 + epoch if buffer and seed is not None else None,
    )
    for index, batch in enumerate(batches):
        latent = batch["latent"]
        if "latent_flip" in batch:
            # SeedSequence entropy must be non-negative; % keeps distinct seeds distinct
            draws = np.random.default_rng(None if seed is None else [seed % 2**64, epoch, rank, index])
            mirrored = torch.from_numpy(draws.random(latent.shape[0]) < 0.5).to(latent.device)
            latent = torch.where(mirrored.view(-1, *[1] * (latent.dim() - 1)), batch["latent_flip"], latent)
        yield {"latent": latent, "label": batch["label"]}


def read_latents(
    uri: str | dict[str, Any], split: str, rows: int, storage_config: StorageConfig | None = None, scaled: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `rows` latents of `split` in shard order, in memory: ((N, C, h, w) float32,
    (N,) int64). For small fixed sets such as the validation latents; never mirrored."""
    manifest = as_manifest(uri, storage_config)
    shape, scale = manifest["latent_shape"], manifest["latent_scale"] if scaled else 1.0
    latents, labels, have = [], [], 0
    for file in shard_uris(manifest, split):
        if have >= rows:
            break
        table = read_table(file, storage_config, columns=["label", "latent"]).slice(0, rows - have)
        batch = _to_tensors(shape, scale, False, False)(table)
        latents.append(torch.from_numpy(batch["latent"]))
        labels.append(torch.from_numpy(batch["label"]))
        have += table.num_rows
    if have < rows:
        raise ValueError(f"{manifest['prefix']}: split {split!r} holds {have} rows, fewer than the {rows} asked for")
    return torch.cat(latents), torch.cat(labels)
