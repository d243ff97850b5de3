"""The latent pipeline on a local Ray cluster with the real services: the full chain into the
loopback S3 server, a killed encode job re-run to exact counts, and bad input quarantined."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from ecar import storage
from ecar.data import quarantine as q
from ecar.data.encode import encode_latents
from ecar.data.manifest import read_manifest, shard_uris
from ecar.data.prepare import prepare_images
from ecar.data.reader import latent_dataset, torch_batches, validate_latents
from ecar.data.shards import IMAGE_SCHEMA, read_table, write_table
from ecar.presets import get_config
from ecar.tokenizer import load_tokenizer
from ecar.train.synthetic import write_synthetic_latents
from ecar.train.tokenizer import train_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _ids(uri: str, split: str) -> list[str]:
    manifest = read_manifest(uri)
    return [i for f in shard_uris(manifest, split) for i in read_table(f, columns=["id"]).column("id").to_pylist()]


def test_prepare_train_encode_read_through_s3(ray_cluster, s3_prefix):
    config = get_config(
        "ecar-debug",
        {
            "data.shard_rows": 64,
            "data.flip_augment": True,
            "tokenizer.steps": 10,
            "tokenizer.eval_images": 32,
            "tokenizer.fid_images": 8,
        },
    )
    images, tokenizer, latents = (storage.join(s3_prefix, name) for name in ("images", "tokenizer", "latents"))
    prepared = prepare_images(config, images, limit_per_split=300)
    assert prepared["splits"]["train"]["rows"] == 300 and len(prepared["splits"]["train"]["shards"]) == 5

    description = train_tokenizer(config, images, tokenizer)
    assert description["metrics"]["eval_images"] == 32 and np.isfinite(description["metrics"]["psnr"])
    assert np.isfinite(description["metrics"]["rfid"])

    config = config.override({"tokenizer.checkpoint_uri": tokenizer})
    manifest = encode_latents(config, images, latents)
    assert manifest["splits"]["train"]["rows"] == 300 and manifest["splits"]["test"]["rows"] == 300
    assert manifest["tokenizer"] == load_tokenizer(config).identity
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["latent_dtype"] == "float32"
    assert manifest["quarantined"] == 0 and manifest["num_classes"] == 10
    assert (
        json.loads(storage.read_text(storage.join(latents, "manifest.json")))["latent_scale"]
        == manifest["latent_scale"]
    )
    validate_latents(latents)

    dataset = latent_dataset(latents, "train", seed=0)
    rows, labels, batch = 0, [], None
    for batch in torch_batches(dataset, batch_size=50, shuffle_buffer_rows=100, seed=0, drop_last=False):
        assert batch["latent"].shape[1:] == (4, 8, 8) and batch["latent"].dtype == torch.float32
        assert batch["label"].dtype == torch.int64
        rows += len(batch["label"])
        labels += batch["label"].tolist()
    assert rows == 300 and set(labels) <= set(range(10))
    ids = [
        i for b in latent_dataset(latents, "train", keep_ids=True).iter_batches(batch_format="numpy") for i in b["id"]
    ]
    assert sorted(ids) == sorted(_ids(latents, "train")) and len(set(ids)) == 300
    decoded = load_tokenizer(config).model.decode(batch["latent"] / manifest["latent_scale"])
    assert decoded.shape[1:] == (1, 16, 16)


def test_mirror_choices_are_drawn_anew_each_epoch_and_again_on_replay(ray_cluster, tmp_storage):
    """Under a fixed seed each row is its image's latent or the mirror's with probability 1/2,
    drawn anew every epoch, and drawn the same when an epoch is replayed (as after a restart).
    One shard: with the choice seeded by a batch's content, every row repeated its choice."""
    prefix = write_synthetic_latents(storage.join(tmp_storage, "latents"), rows=256, shards=1, test_rows=0, flip=True)
    table = read_table(shard_uris(read_manifest(prefix), "train")[0])
    ids = table.column("id").to_pylist()
    which: dict[bytes, tuple[str, bool]] = {}  # stored latent -> (row id, mirrored)
    for column, mirrored in (("latent", False), ("latent_flip", True)):
        values = table.column(column).combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
        which.update({row.tobytes(): (i, mirrored) for i, row in zip(ids, values)})
    dataset = latent_dataset(prefix, "train", seed=0, scaled=False)

    def epoch(number: int) -> list[tuple[str, bool]]:
        return [
            which[row.numpy().tobytes()]
            for batch in torch_batches(dataset, batch_size=16, shuffle_buffer_rows=64, seed=0, epoch=number)
            for row in batch["latent"].flatten(1)
        ]

    first, second = epoch(0), epoch(1)
    assert sorted(i for i, _ in first) == sorted(i for i, _ in second) == sorted(ids)
    for rows in (first, second):
        assert 0.35 < np.mean([mirrored for _, mirrored in rows]) < 0.65
    again = dict(first)
    same = sum(again[i] == mirrored for i, mirrored in second)
    assert 0.35 * len(ids) < same < 0.65 * len(ids), f"{same} of {len(ids)} rows chose alike in both epochs"
    assert epoch(1) == second


def _png(size: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _bad_image_shards(root: str) -> dict[str, str]:
    """Image shards with 6 good rows and one row of each kind of bad input; returns id -> reason."""
    good = [{"id": f"good-{i}", "image": _png(16, i), "label": i, "source": f"src/{i}"} for i in range(6)]
    bad = {
        "truncated": ({"image": _png(16)[:50], "label": 1}, q.UNDECODABLE),
        "garbage": ({"image": b"\x00not an image", "label": 1}, q.UNDECODABLE),
        "no-bytes": ({"image": None, "label": 1}, q.UNDECODABLE),
        "wrong-size": ({"image": _png(20), "label": 1}, q.WRONG_SIZE),
        "no-label": ({"image": _png(16), "label": None}, q.MISSING_LABEL),
        "label-12": ({"image": _png(16), "label": 12}, q.BAD_LABEL),
    }
    rows = good + [{"id": k, "source": f"src/{k}", **row} for k, (row, _) in bad.items()]
    rows.append(dict(good[0], source="src/copy"))  # the same id twice
    write_table(storage.join(root, "train", "shard-00000.parquet"), pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA))
    manifest = {
        "schema_version": 1,
        "kind": "images",
        "source": {"kind": "test"},
        "image_size": 16,
        "image_channels": 1,
        "class_names": [str(i) for i in range(10)],
        "splits": {"train": {"rows": len(rows), "quarantined": 0, "shards": [{"name": "shard-00000.parquet"}]}},
    }
    storage.write_text_atomic(storage.join(root, "images.json"), json.dumps(manifest))
    return {k: reason for k, (_, reason) in bad.items()} | {"good-0": q.DUPLICATE_ID}


def test_bad_input_is_quarantined_and_the_limit_enforced(ray_cluster, random_tokenizer, tmp_storage, s3_prefix, capsys):
    images = storage.join(tmp_storage, "images")
    expected = _bad_image_shards(images)
    config = get_config("ecar-debug", {"tokenizer.checkpoint_uri": random_tokenizer, "data.quarantine_limit": 0.6})
    manifest = encode_latents(config, images, s3_prefix)
    split = manifest["splits"]["train"]
    assert (split["rows"], split["quarantined"], split["input_rows"]) == (6, 7, 13)
    assert split["quarantine_reasons"] == {
        q.UNDECODABLE: 3,
        q.WRONG_SIZE: 1,
        q.MISSING_LABEL: 1,
        q.BAD_LABEL: 1,
        q.DUPLICATE_ID: 1,
    }
    table = read_table(storage.join(s3_prefix, "quarantine", "train", "shard-00000.parquet")).to_pylist()
    assert {row["id"]: q.reason_kind(row["reason"]) for row in table} == expected
    assert {row["id"]: row["source"] for row in table}["wrong-size"] == "src/wrong-size"
    assert "20x20, expected 16x16" in {row["id"]: row["reason"] for row in table}["wrong-size"]
    assert sorted(_ids(s3_prefix, "train")) == [f"good-{i}" for i in range(6)]

    from jobs import encode

    strict = storage.join(tmp_storage, "strict")
    code = encode.main(
        [
            "--preset",
            "ecar-debug",
            "--images",
            images,
            "--output",
            strict,
            f"tokenizer.checkpoint_uri={random_tokenizer}",
            "data.quarantine_limit=0.1",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "7 of 13 rows quarantined" in err and "wrong image size" in err
    assert not storage.exists(storage.join(strict, "manifest.json"))
