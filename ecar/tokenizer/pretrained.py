"""A user's pretrained diffusers-format AutoencoderKL folder as the tokenizer (SD's VAE:
8x down-sampling, 4 latent channels; any AutoencoderKL folder works).

diffusers is optional (`pip install 'ecar[diffusers]'`): it is imported only here, and only when
`tokenizer.kind="diffusers"`. Weights are read from safetensors files only (no pickle), from the
local folder only. The latent scale is the folder's own `scaling_factor` (config.json), which the
encode job records in the latent manifest.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn


class DiffusersTokenizer(nn.Module):
    """encode: (B, C_img, H, W) in [-1, 1] -> posterior mean (B, C_lat, H/f, W/f), unscaled (the
    manifest's latent_scale, this VAE's `scaling_factor`, is applied where latents are read).
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
    """The wrapped AutoencoderKL (eval mode) and its identity {kind, uri, sha256, latent_channels,
    downsample_factor, scaling_factor}, the last three read from the folder's config.json."""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer.checkpoint_uri={path!r} is not a local diffusers AutoencoderKL folder")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError(
            "tokenizer.kind=diffusers needs the optional package `diffusers` "
            "(pip install 'ecar[diffusers]'); it is not a core ecar dependency"
        ) from None
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=True)
    if vae.config.get("shift_factor"):
        # SD3/FLUX VAEs train on (z - shift) * scale; ecar's latents are scale * z only
        raise ValueError(
            f"{os.path.join(path, 'config.json')}: shift_factor={vae.config.shift_factor}: VAEs whose "
            "latents are shifted before scaling are not supported"
        )
    identity = {
        "kind": "diffusers",
        "uri": os.path.abspath(path),
        "sha256": folder_sha256(path),
        "latent_channels": int(vae.config.latent_channels),
        # each encoder block but the last halves the resolution
        "downsample_factor": 2 ** (len(vae.config.block_out_channels) - 1),
        "scaling_factor": float(vae.config.scaling_factor),
    }
    return DiffusersTokenizer(vae.eval(), image_channels), identity
