"""The classifier score's formula on probability sets with known answers."""

import numpy as np
import pytest

from ecar.evaluation.classifier import classifier_score

pytestmark = pytest.mark.unit


def test_confident_and_evenly_spread_scores_the_class_count():
    onehot = np.eye(8)[np.arange(80) % 8]  # every image certain, every class used equally
    score, spread = classifier_score(onehot, splits=10)
    assert score == pytest.approx(8.0, rel=1e-6) and spread == pytest.approx(0.0, abs=1e-6)


def test_one_distribution_for_every_image_scores_one():
    same = np.tile(np.full(10, 0.1), (50, 1))
    assert classifier_score(same)[0] == pytest.approx(1.0)
    collapsed = np.eye(10)[np.zeros(50, dtype=int)]  # certain, but always the same class
    assert classifier_score(collapsed)[0] == pytest.approx(1.0)


def test_half_the_classes_scores_half():
    half = np.eye(10)[np.arange(100) % 5]
    assert classifier_score(half, splits=1)[0] == pytest.approx(5.0, rel=1e-6)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="shape"):
        classifier_score(np.zeros((0, 10)))
