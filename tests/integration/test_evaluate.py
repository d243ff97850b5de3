"""Evaluation against real Fashion-MNIST images with the shipped Inception network."""

import shutil

import numpy as np
import pytest
import torch

from ecar.data.manifest import SCHEMA_VERSION, write_manifest
from ecar.data.prepare import prepare_images
from ecar.evaluation.evaluate import quality_metrics, reference_features
from ecar.evaluation.fid import inception_features
from ecar.presets import get_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def latent_manifest(tmp_path_factory):
    """Prepared test images plus a latent manifest naming them as its source."""
    root = tmp_path_factory.mktemp("evaluate")
    config = get_config("ecar-debug")
    images_uri = str(root / "images")
    prepare_images(config, images_uri, splits=["test"], limit_per_split=16)
    prefix = str(root / "latents")
    write_manifest(prefix, {"schema_version": SCHEMA_VERSION, "kind": "latents",
                            "source": {"images_uri": images_uri}, "splits": {}})
    return config, prefix, images_uri


def test_reference_features_are_cached_next_to_the_manifest(latent_manifest):
    config, prefix, images_uri = latent_manifest
    first = reference_features(prefix, "test", 12, config)
    assert first.shape == (12, 2048)
    cached = list((__import__("pathlib").Path(prefix) / "reference").iterdir())
    assert [p.name for p in cached] == ["inception-test-12.npz"]
    moved = images_uri + ".moved"
    shutil.move(images_uri, moved)  # a second call must not need the images
    try:
        np.testing.assert_allclose(reference_features(prefix, "test", 12, config), first)
    finally:
        shutil.move(moved, images_uri)


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

    config, prefix, _ = latent_manifest
    real = reference_probabilities(prefix, "test", 12, config)
    assert real.shape == (12, 1000)
    np.testing.assert_allclose(real.sum(axis=1), 1.0, atol=1e-4)
    assert (__import__("pathlib").Path(prefix) / "reference" / "classifier-test-12.npz").exists()
    np.testing.assert_allclose(reference_probabilities(prefix, "test", 12, config), real)
    # flat grey images: one distribution for all of them
    flat = classifier_probabilities(torch.zeros(12, 1, 16, 16))
    assert classifier_score(flat, splits=1)[0] == pytest.approx(1.0, abs=1e-6)
    metrics = classifier_metrics(real, flat)
    assert metrics["real_classifier_score"] > metrics["classifier_score"]
