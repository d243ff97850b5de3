"""Improved precision and recall (Kynkaanniemi et al. 2019) from k-NN manifolds of features.

Each set's manifold is the union of balls around its points, each ball reaching the point's
k-th nearest neighbour within the set. Precision: the share of generated points inside the
real manifold (fidelity). Recall: the share of real points inside the generated one (coverage).
"""

from __future__ import annotations

import torch


def kth_neighbour_radii(features_ND: torch.Tensor, k: int = 3, chunk: int = 4096) -> torch.Tensor:
    """(N,) distance from every point to its k-th nearest other point of the same set."""
    if features_ND.shape[0] <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {features_ND.shape[0]}")
    radii = []
    for start in range(0, features_ND.shape[0], chunk):
        distances = torch.cdist(features_ND[start : start + chunk], features_ND)
        # the smallest distance is the point to itself (0), so the k-th neighbour is index k
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def inside_manifold(
    queries_QD: torch.Tensor, support_ND: torch.Tensor, radii_N: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """(Q,) bool: whether each query lies in some support point's ball."""
    inside = []
    for start in range(0, queries_QD.shape[0], chunk):
        distances = torch.cdist(queries_QD[start : start + chunk], support_ND)
        inside.append((distances <= radii_N[None]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real_ND: torch.Tensor, fake_MD: torch.Tensor, k: int = 3) -> dict[str, float]:
    """{"precision", "recall"} of generated features against real ones (both float, any device)."""
    if real_ND.shape[1] != fake_MD.shape[1]:
        raise ValueError(f"feature sizes differ: real {real_ND.shape[1]}, generated {fake_MD.shape[1]}")
    real, fake = real_ND.double(), fake_MD.double()
    precision = inside_manifold(fake, real, kth_neighbour_radii(real, k)).double().mean().item()
    recall = inside_manifold(real, fake, kth_neighbour_radii(fake, k)).double().mean().item()
    return {"precision": precision, "recall": recall}
