"""Evaluation against real Fashion-MNIST images with the shipped Inception network."""

import shutil

import numpy as np
import pytest
import torch

from ecar.data.manifest import SCHEMA_VERSION, write_manifest
from ecar.data.prepare import prepare_images, read_image_split
from ecar.evaluation.evaluate import quality_metrics, reference_features
from ecar.evaluation.fid import inception_features
from ecar.presets import get_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def latent_manifest(ray_cluster, tmp_path_factory):
    """Prepared test images plus a latent manifest naming them as its source."""
    root = tmp_path_factory.mktemp("evaluate")
    config = get_config("ecar-debug")
    images_uri = str(root / "images")
    prepare_images(config, images_uri, splits=["test"], limit_per_split=16)
    return config, _latents_naming(images_uri, str(root / "latents")), images_uri


def _latents_naming(images_uri: str, prefix: str) -> str:
    """A latent manifest at `prefix` with no shards, naming `images_uri` as its source."""
    write_manifest(
        prefix,
        {
            "schema_version": SCHEMA_VERSION,
            "kind": "latents",
            "source": {"images_uri": images_uri},
            "splits": {},
            "tokenizer": {"kind": "synthetic", "uri": "", "sha256": ""},
            "latent_shape": [4, 8, 8],
            "latent_dtype": "float32",
            "latent_scale": 1.0,
            "num_classes": 10,
            "flip_augment": False,
        },
    )
    return prefix


def test_reference_features_are_cached_next_to_the_manifest(latent_manifest, tmp_path):
    # its own manifest and images: the shared fixture's cache folder holds whatever the other
    # tests of this module wrote, in whatever order they ran
    config, _, shared_images = latent_manifest
    images_uri = str(tmp_path / "images")
    shutil.copytree(shared_images, images_uri)
    prefix = _latents_naming(images_uri, str(tmp_path / "latents"))
    first = reference_features(prefix, "test", 12, config)
    np.testing.assert_allclose(
        first, inception_features(read_image_split(images_uri, "test", 12, config)), rtol=1e-5, atol=1e-5
    )  # cached as float32
    assert [p.name for p in (tmp_path / "latents" / "reference").iterdir()] == ["inception-test-12.npz"]
    shutil.rmtree(images_uri)  # a second call must not need the images
    np.testing.assert_array_equal(reference_features(prefix, "test", 12, config), first)


def test_fid_of_a_set_against_itself_is_zero_and_against_noise_large(latent_manifest):
    config, prefix, _ = latent_manifest
    real = reference_features(prefix, "test", 12, config)
    itself = quality_metrics(real, real)
    noise = torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    against_noise = quality_metrics(real, inception_features(noise))
    assert abs(itself["fid"]) < 1e-3 * against_noise["fid"]
    assert against_noise["fid"] > 100
    assert itself["precision"] == itself["recall"] == 1.0
    assert against_noise["precision"] == 0.0


def test_classifier_probabilities_of_real_images_are_cached_and_score_above_noise(latent_manifest):
    from ecar.evaluation.classifier import classifier_probabilities, classifier_score
    from ecar.evaluation.evaluate import classifier_metrics, reference_probabilities

    config, prefix, images_uri = latent_manifest
    real = reference_probabilities(prefix, "test", 12, config)
    np.testing.assert_allclose(
        real, classifier_probabilities(read_image_split(images_uri, "test", 12, config)), rtol=1e-4, atol=1e-7
    )  # cached as float32
    np.testing.assert_allclose(real.sum(axis=1), 1.0, atol=1e-4)
    assert (__import__("pathlib").Path(prefix) / "reference" / "classifier-test-12.npz").exists()
    np.testing.assert_allclose(reference_probabilities(prefix, "test", 12, config), real)
    # flat grey images: one distribution for all of them
    flat = classifier_probabilities(torch.zeros(12, 1, 16, 16))
    assert classifier_score(flat, splits=1)[0] == pytest.approx(1.0, abs=1e-6)
    metrics = classifier_metrics(real, flat)
    assert metrics["classifier_score"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["real_classifier_score"] == classifier_score(real)[0] > metrics["classifier_score"]


def test_image_labels_come_in_the_order_of_the_images(latent_manifest):
    """read_image_labels pairs with read_image_split row for row: Fashion-MNIST's test split
    starts with labels 9, 2, 1, 1, 6 (the source data set's own order)."""
    from ecar.data.prepare import read_image_labels

    config, _, images_uri = latent_manifest
    labels = read_image_labels(images_uri, "test", 10, config)
    assert labels.dtype == np.int64 and labels.shape == (10,)
    assert read_image_split(images_uri, "test", 10, config).shape[0] == 10
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]


def test_a_sample_sets_features_are_cached_beside_it_until_it_is_sampled_again(latent_manifest, tmp_path, monkeypatch):
    import ecar.evaluation.evaluate as evaluate
    from ecar import storage

    config, _, images_uri = latent_manifest
    samples = str(tmp_path / "samples")
    storage.write_text_atomic(storage.join(samples, "manifest.json"), '{"num_images": 12}')
    images = read_image_split(images_uri, "test", 12, config)
    first = evaluate.sample_features(samples, images)
    np.testing.assert_allclose(first, inception_features(images), rtol=1e-5, atol=1e-5)  # float32 on storage
    assert (tmp_path / "samples" / "features" / "inception.npz").exists()

    def no_inception(*args, **kwargs):
        raise AssertionError("Inception ran again for a cached sample set")

    monkeypatch.setattr(evaluate, "inception_features", no_inception)
    np.testing.assert_array_equal(evaluate.sample_features(samples, images), first)  # the same numbers as the first

    # the set sampled again (a new manifest): the cache no longer answers
    storage.write_text_atomic(storage.join(samples, "manifest.json"), '{"num_images": 12, "seed": 1}')
    with pytest.raises(AssertionError, match="Inception ran again"):
        evaluate.sample_features(samples, images)
