"""A user's pretrained diffusers-format AutoencoderKL folder as the tokenizer.

diffusers is optional: it is imported only here, and only when `tokenizer.kind="diffusers"`.
Weights are read from safetensors files only (no pickle), from the local folder only.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn


class DiffusersTokenizer(nn.Module):
    """encode: (B, C_img, H, W) in [-1, 1] -> posterior mean (B, C_lat, H/f, W/f), unscaled
    (the diffusers `scaling_factor` is ignored: ecar measures its own latent scale).
    Grayscale images are repeated to the RGB the network expects and averaged back on decode."""

    def __init__(self, vae: nn.Module, image_channels: int) -> None:
        super().__init__()
        self.vae, self.image_channels = vae, image_channels

    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        if images_BCHW.shape[1] == 1:
            images_BCHW = images_BCHW.expand(-1, 3, -1, -1)
        return self.vae.encode(images_BCHW).latent_dist.mean

    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents_BCHW).sample
        return images.mean(dim=1, keepdim=True) if self.image_channels == 1 else images


def folder_sha256(path: str) -> str:
    """One hash over the folder's weight and config files (sorted names and contents)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".json")):
            digest.update(name.encode())
            with open(os.path.join(path, name), "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def load_diffusers_vae(path: str, image_channels: int) -> tuple[DiffusersTokenizer, dict]:
    """The wrapped AutoencoderKL (eval mode) and its identity {kind, uri, sha256, latent_channels}."""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer.checkpoint_uri={path!r} is not a local diffusers AutoencoderKL folder")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError(
            "tokenizer.kind=diffusers needs the optional package `diffusers` "
            "(pip install diffusers); it is not an ecar dependency"
        ) from None
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=True)
    identity = {
        "kind": "diffusers",
        "uri": os.path.abspath(path),
        "sha256": folder_sha256(path),
        "latent_channels": int(vae.config.latent_channels),
    }
    return DiffusersTokenizer(vae.eval(), image_channels), identity
