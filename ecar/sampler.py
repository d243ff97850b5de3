"""Sampling many images in parallel: Ray Data over shards of (index, class, seed) rows, an actor
pool holding the EMA model, `.npz` shards plus a manifest on storage.

Every image is a pure function of its row: its seed drives a generator of its own (see
`ecar.flow.gaussian`), so the same row gives the same image at any pool or batch size, and a
re-run after a failure only fills the shards that are missing. Shards are written whole under
deterministic names; the manifest goes last, once every shard exists.
"""

from __future__ import annotations

import dataclasses
import io
import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ecar import storage
from ecar.config import Config, ConfigError
from ecar.export import Exported, load_exported, read_config, read_metadata
from ecar.log import get_logger
from ecar.seeds import derived_seed

SCHEMA_VERSION = 1
log = get_logger(__name__)


@dataclass(frozen=True)
class Shard:
    start: int
    count: int

    @property
    def name(self) -> str:
        return f"shard-{self.start:09d}-{self.count:06d}.npz"


def plan_shards(num_images: int, shard_size: int) -> list[Shard]:
    return [Shard(start, min(shard_size, num_images - start)) for start in range(0, num_images, shard_size)]


def shard_rows(shard: Shard, labels: list[int] | None, num_classes: int, base_seed: int) -> dict[str, np.ndarray]:
    """The (index, label, seed) rows of one shard: class-balanced (index mod classes) unless
    explicit labels are given."""
    indices = np.arange(shard.start, shard.start + shard.count, dtype=np.int64)
    if labels is None:
        row_labels = indices % num_classes
    else:
        row_labels = np.asarray([labels[i % len(labels)] for i in indices], dtype=np.int64)
    seeds = np.asarray([derived_seed(base_seed, int(i)) for i in indices], dtype=np.int64)
    return {"index": indices, "label": row_labels, "seed": seeds}


def to_uint8(images_BCHW: torch.Tensor) -> np.ndarray:
    """[-1, 1] images -> (B, H, W, C) uint8."""
    scaled = ((images_BCHW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


SAMPLING_KEYS = ("sampling.", "flow.steps_per_stage")


def sampling_config(config: Config, overrides: list[str]) -> Config:
    """The checkpoint's config with sampling-time overrides (sampling.* and the step schedule);
    anything else would describe a different model and is rejected, naming the key."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(SAMPLING_KEYS):
            raise ConfigError(f"{key}: only sampling.* and flow.steps_per_stage can change at sampling time")
    return config.override(overrides) if overrides else config


Decoder = Callable[[torch.Tensor], torch.Tensor]


def tokenizer_decoder(exported: Exported, device: torch.device) -> Decoder | None:
    """Decode with the tokenizer that made the training latents (named by the latent manifest
    the checkpoint was trained on); None when the checkpoint names no manifest."""
    if not exported.manifest_uri:
        return None
    from ecar.data.manifest import read_manifest
    from ecar.tokenizer import decoder_for_manifest

    return decoder_for_manifest(read_manifest(exported.manifest_uri, exported.config.storage), exported.config, device)


class ShardSampler:
    """Ray Data actor: loads the exported model once, then generates and writes whole shards."""

    def __init__(
        self,
        checkpoint_uri: str,
        output_uri: str,
        overrides: list[str],
        labels: list[int] | None,
        batch_size: int,
        decoder_factory: Callable[[Exported, torch.device], Decoder | None] | None = None,
    ) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.exported = load_exported(checkpoint_uri, self.device)
        self.config = sampling_config(self.exported.config, overrides)
        self.output_uri, self.labels, self.batch_size = output_uri, labels, batch_size
        self.decode = decoder_factory(self.exported, self.device) if decoder_factory else None

    def generate(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        model, scale = self.exported.model, self.exported.latent_scale
        latents, images = [], []
        for start in range(0, len(rows["index"]), self.batch_size):
            part = slice(start, start + self.batch_size)
            labels = torch.as_tensor(rows["label"][part], device=self.device)
            generators = [torch.Generator(self.device).manual_seed(int(s)) for s in rows["seed"][part]]
            out = model.generate(labels, self.config.sampling, generators, self.config.flow.steps_per_stage)
            latents.append((out / scale).float().cpu().numpy().astype(np.float16))
            if self.decode is not None:
                images.append(to_uint8(self.decode(out / scale)))
        result = dict(rows, latents=np.concatenate(latents))
        if images:
            result["images"] = np.concatenate(images)
        return result

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        written = []
        for start, count in zip(batch["start"], batch["count"]):
            shard = Shard(int(start), int(count))
            rows = shard_rows(shard, self.labels, self.config.model.num_classes, self.config.sampling.seed)
            buffer = io.BytesIO()
            np.savez(buffer, **self.generate(rows))
            # atomic: a killed job never leaves a half shard under the final name
            storage.write_bytes_atomic(storage.join(self.output_uri, "shards", shard.name), buffer.getvalue())
            written.append(shard.count)
        return {"start": batch["start"], "count": np.asarray(written, dtype=np.int64)}


def existing_shards(output_uri: str) -> set[str]:
    return {posixpath.basename(uri) for uri in storage.list_files(storage.join(output_uri, "shards"), ".npz")}


def check_arguments(
    config: Config,
    num_images: int,
    labels: list[int] | None,
    shard_size: int,
    batch_size: int,
    actors: int,
    cpus_per_actor: float,
) -> None:
    """A sampling request's user errors, named, before Ray starts or the output is claimed."""
    for name, value in (
        ("--num-images", num_images),
        ("--shard-size", shard_size),
        ("--batch-size", batch_size),
        ("--actors", actors),
    ):
        if value < 1:
            raise ValueError(f"{name}: {value} must be at least 1")
    if not cpus_per_actor > 0:
        raise ValueError(f"--cpus-per-actor: {cpus_per_actor} must be positive")
    classes = config.model.num_classes
    if labels is not None:
        if not labels:
            raise ValueError("--labels: empty; give class ids, e.g. --labels 0,3,7")
        wrong = [label for label in labels if not 0 <= label < classes]
        if wrong:
            raise ValueError(f"--labels: {wrong[0]} is not a class of this checkpoint (0..{classes - 1})")


def sample_to_storage(
    checkpoint_uri: str,
    output_uri: str,
    num_images: int,
    overrides: list[str] = (),
    labels: list[int] | None = None,
    shard_size: int = 256,
    batch_size: int = 64,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    decoder_factory: Callable[[Exported, torch.device], Decoder | None] | None = tokenizer_decoder,
    model_uri: str = "",
) -> dict[str, Any]:
    """Generate `num_images` images into `output_uri` (shards + manifest.json); returns the manifest.
    `model_uri` (models:/NAME/VERSION) records which registered model version the export is.

    Shards already on storage are kept, so a re-run after a failure fills only what is missing.
    """
    import ray
    from ray.data import ActorPoolStrategy

    overrides = list(overrides)
    config = sampling_config(read_config(checkpoint_uri), overrides)  # fail before any actor starts
    check_arguments(config, num_images, labels, shard_size, batch_size, actors, cpus_per_actor)
    plan = plan_shards(num_images, shard_size)
    metadata = read_metadata(checkpoint_uri)
    identity = {
        "checkpoint_sha256": metadata["content_sha256"],
        "overrides": overrides,
        "labels": labels,
        "num_images": num_images,
        "shard_size": shard_size,
    }
    storage.claim_output(output_uri, identity, "samples")
    done = existing_shards(output_uri)
    pending = [shard for shard in plan if shard.name not in done]
    log.info(
        "sampling %d images: %d shards, %d already on storage, %d to do",
        num_images,
        len(plan),
        len(plan) - len(pending),
        len(pending),
    )
    if pending:
        rows = ray.data.from_items(
            [{"start": s.start, "count": s.count} for s in pending], override_num_blocks=len(pending)
        )
        gpus = 1 if torch.cuda.is_available() else 0
        results = rows.map_batches(
            ShardSampler,
            fn_constructor_kwargs={
                "checkpoint_uri": checkpoint_uri,
                "output_uri": output_uri,
                "overrides": overrides,
                "labels": labels,
                "batch_size": batch_size,
                "decoder_factory": decoder_factory,
            },
            batch_size=1,
            compute=ActorPoolStrategy(size=actors),
            num_gpus=gpus,
            num_cpus=cpus_per_actor,
        )
        from ecar.progress import Progress

        with Progress(sum(s.count for s in pending), "sample", "images") as progress:
            for row in results.iter_rows():
                progress.update(int(row["count"]))
    present = existing_shards(output_uri)
    missing = [shard.name for shard in plan if shard.name not in present]
    if missing:
        raise RuntimeError(f"{len(missing)} shards still missing under {output_uri} (first: {missing[0]})")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "checkpoint_uri": checkpoint_uri,
        "model_uri": model_uri,
        **identity,
        "steps_per_stage": list(config.flow.steps_per_stage),
        "sampling": dataclasses.asdict(config.sampling),
        "shards": [{"name": shard.name, "start": shard.start, "count": shard.count} for shard in plan],
        "has_images": "images" in shard_keys(storage.join(output_uri, "shards", plan[0].name)),
    }
    storage.write_text_atomic(storage.join(output_uri, "manifest.json"), json.dumps(manifest, indent=2))
    return manifest


def shard_keys(uri: str) -> set[str]:
    with np.load(io.BytesIO(storage.read_bytes(uri))) as data:
        return set(data.files)


def read_samples_manifest(output_uri: str) -> dict[str, Any]:
    """The manifest of a finished sampling run: its export (`checkpoint_sha256`), overrides and shards."""
    return json.loads(storage.read_text(storage.join(output_uri, "manifest.json")))


def read_samples(output_uri: str, key: str = "images", limit: int | None = None) -> dict[str, np.ndarray]:
    """The shards of a finished sampling run, concatenated in index order: all of them, or the
    first ones that hold `limit` images (and only those images)."""
    manifest = read_samples_manifest(output_uri)
    parts: dict[str, list[np.ndarray]] = {}
    shards = manifest["shards"]
    if limit is not None:
        ends = np.cumsum([shard["count"] for shard in shards])
        shards = shards[: int(np.searchsorted(ends, limit)) + 1]
    for shard in shards:
        with np.load(io.BytesIO(storage.read_bytes(storage.join(output_uri, "shards", shard["name"])))) as data:
            for name in ("index", "label", "seed", key):
                parts.setdefault(name, []).append(data[name])
    return {name: np.concatenate(values)[:limit] for name, values in parts.items()}
