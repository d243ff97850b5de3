"""A small KL-VAE (the continuous tokenizer): images (B, C_img, H, W) in [-1, 1] <-> latents
(B, C_lat, H/f, W/f).

The layout follows the LDM autoencoder (Rombach et al. 2022) at a size that trains on a CPU:
a stem conv, per resolution level `res_blocks` residual blocks then a stride-2 conv, a middle
residual block, and a head that predicts the posterior mean and log-variance. The decoder
mirrors it with nearest up-sampling. No attention: at 32x32 it buys little and costs most.

`encode` returns the posterior mean (what the latent data set stores: the flow model learns the
distribution of means, as in MAR and DiT pipelines that cache latents); `posterior` returns
mean and log-variance for training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ecar.config import Config


@dataclass(frozen=True)
class VAEShape:
    """What a tokenizer needs to be built; saved next to its weights (`tokenizer.json`)."""

    image_channels: int = 1
    latent_channels: int = 4
    width: int = 64
    downsample_factor: int = 2
    res_blocks: int = 1

    @property
    def levels(self) -> int:
        return int(math.log2(self.downsample_factor))

    def level_width(self, level: int) -> int:
        # widths double per halving, capped at 4x: the deepest maps are small, so cheap
        return self.width * min(2**level, 4)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels // 4) or 1, num_channels=channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2, self.conv2 = _norm(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BCHW)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x_BCHW) + h


class Encoder(nn.Module):
    def __init__(self, shape: VAEShape) -> None:
        super().__init__()
        self.stem = nn.Conv2d(shape.image_channels, shape.width, 3, padding=1)
        blocks: list[nn.Module] = []
        channels = shape.width
        for level in range(shape.levels + 1):
            out = shape.level_width(level)
            for _ in range(shape.res_blocks):
                blocks.append(ResBlock(channels, out))
                channels = out
            if level < shape.levels:
                blocks.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
        blocks.append(ResBlock(channels, channels))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, 2 * shape.latent_channels, 3, padding=1)
        )

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C_img, H, W) -> (B, 2 C_lat, H/f, W/f): mean and log-variance, stacked."""
        return self.head(self.blocks(self.stem(x_BCHW)))


class Decoder(nn.Module):
    def __init__(self, shape: VAEShape) -> None:
        super().__init__()
        channels = shape.level_width(shape.levels)
        self.stem = nn.Conv2d(shape.latent_channels, channels, 3, padding=1)
        blocks: list[nn.Module] = [ResBlock(channels, channels)]
        for level in reversed(range(shape.levels + 1)):
            out = shape.level_width(level)
            for _ in range(shape.res_blocks):
                blocks.append(ResBlock(channels, out))
                channels = out
            if level > 0:
                blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1)]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, shape.image_channels, 3, padding=1))

    def forward(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(z_BCHW)))


class KLVAE(nn.Module):
    """Images in [-1, 1]. `encode`/`decode` are the tokenizer interface every job uses."""

    def __init__(self, shape: VAEShape) -> None:
        super().__init__()
        self.shape = shape
        self.encoder, self.decoder = Encoder(shape), Decoder(shape)

    def posterior(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance, each (B, C_lat, H/f, W/f); log-variance clamped as in LDM."""
        mean, logvar = self.encoder(images_BCHW).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C_img, H, W) in [-1, 1] -> posterior mean (B, C_lat, H/f, W/f), unscaled."""
        return self.posterior(images_BCHW)[0]

    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C_lat, h, w) unscaled latents -> (B, C_img, h f, w f) images (not clamped)."""
        return self.decoder(latents_BCHW)

    def forward(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction from a posterior sample, and the KL to N(0, I) averaged per image."""
        mean, logvar = self.posterior(images_BCHW)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
        return self.decode(z), kl


def vae_shape(config: Config) -> VAEShape:
    """The KL-VAE shape a config asks for: image channels and size from `data`, latent channels
    and size from `model`, width and depth from `tokenizer`."""
    return VAEShape(
        image_channels=config.data.image_channels,
        latent_channels=config.model.latent_channels,
        width=config.tokenizer.width,
        downsample_factor=config.data.image_size // config.model.latent_size,
        res_blocks=config.tokenizer.res_blocks,
    )


@torch.no_grad()
def reconstruct(model: nn.Module, images_BCHW: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """encode -> decode, clamped and quantised to 8 bits as a saved image would be."""
    outputs = []
    for start in range(0, images_BCHW.shape[0], batch_size):
        out = model.decode(model.encode(images_BCHW[start : start + batch_size])).clamp(-1, 1)
        outputs.append(((out + 1) * 127.5).round() / 127.5 - 1)
    return torch.cat(outputs)


# ----- checkpoint: safetensors weights + JSON description ----------------------------------------
WEIGHTS_NAME = "tokenizer.safetensors"
DESCRIPTION_NAME = "tokenizer.json"  # written last: its presence means the checkpoint is complete
SCHEMA_VERSION = 1


def save_vae(model: KLVAE, uri: str, image_size: int, extra: dict | None = None, storage_config=None) -> dict:
    """Write `model` under `uri` (folder or s3:// prefix); returns the description written."""
    from safetensors.torch import save as save_safetensors

    from ecar import storage

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = save_safetensors(state)
    description = {
        "schema_version": SCHEMA_VERSION,
        "kind": "kl_vae",
        "shape": dataclasses.asdict(model.shape),
        "image_size": image_size,
        "latent_size": image_size // model.shape.downsample_factor,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        **(extra or {}),
    }
    storage.write_bytes_atomic(storage.join(uri, WEIGHTS_NAME), blob, storage_config)
    storage.write_text_atomic(storage.join(uri, DESCRIPTION_NAME), json.dumps(description, indent=2), storage_config)
    return description


def load_vae(uri: str, storage_config=None) -> tuple[KLVAE, dict]:
    """The model (eval mode, CPU) and its description; the weights are checked against the
    recorded hash, so a partial upload fails loudly instead of encoding garbage."""
    from safetensors.torch import load as load_safetensors

    from ecar import storage

    description_uri = storage.join(uri, DESCRIPTION_NAME)
    if not storage.exists(description_uri, storage_config):
        raise FileNotFoundError(f"no tokenizer checkpoint at {uri} (missing {DESCRIPTION_NAME})")
    description = json.loads(storage.read_text(description_uri, storage_config))
    if description.get("schema_version") != SCHEMA_VERSION or description.get("kind") != "kl_vae":
        raise ValueError(f"{description_uri}: not a kl_vae tokenizer of schema {SCHEMA_VERSION}")
    blob = storage.read_bytes(storage.join(uri, WEIGHTS_NAME), storage_config)
    if hashlib.sha256(blob).hexdigest() != description["weights_sha256"]:
        raise ValueError(f"{uri}/{WEIGHTS_NAME} does not match the hash in {DESCRIPTION_NAME} (corrupt or partial)")
    model = KLVAE(VAEShape(**description["shape"]))
    model.load_state_dict(load_safetensors(blob))
    return model.eval(), description
