import pytest
import torch

from ecar.evaluation.manifold import kth_neighbour_radii, precision_recall

pytestmark = pytest.mark.unit


def gaussian_blobs(centres, per_blob, seed, spread=0.1, dim=8):
    generator = torch.Generator().manual_seed(seed)
    points = [
        torch.tensor(c, dtype=torch.float64).expand(per_blob, dim)
        + spread * torch.randn(per_blob, dim, generator=generator, dtype=torch.float64)
        for c in centres
    ]
    return torch.cat(points)


def test_radii_are_distances_to_the_kth_other_point():
    points = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    assert torch.equal(kth_neighbour_radii(points, k=1), torch.tensor([1.0, 1.0, 2.0, 3.0]))
    assert torch.equal(kth_neighbour_radii(points, k=2), torch.tensor([3.0, 2.0, 3.0, 5.0]))


def test_a_set_against_itself_has_full_precision_and_recall():
    real = gaussian_blobs([0.0, 5.0], 200, seed=0)
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}


def test_samples_far_from_the_data_have_no_precision_or_recall():
    real = gaussian_blobs([0.0], 300, seed=0)
    fake = gaussian_blobs([50.0], 300, seed=1)
    assert precision_recall(real, fake) == {"precision": 0.0, "recall": 0.0}


def test_mode_collapse_keeps_precision_and_halves_recall():
    real = gaussian_blobs([0.0, 5.0], 500, seed=0, dim=2)
    faithful = precision_recall(real, gaussian_blobs([0.0, 5.0], 500, seed=1, dim=2))
    collapsed = precision_recall(real, gaussian_blobs([0.0], 1000, seed=2, dim=2))  # one of two modes
    assert faithful["precision"] > 0.9 and faithful["recall"] > 0.9
    assert collapsed["precision"] == pytest.approx(faithful["precision"], abs=0.05)
    assert collapsed["recall"] == pytest.approx(faithful["recall"] / 2, abs=0.05)


def test_mismatched_feature_sizes_are_rejected():
    with pytest.raises(ValueError, match="feature sizes differ"):
        precision_recall(torch.zeros(10, 4), torch.zeros(10, 5))
