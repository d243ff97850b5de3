"""The image <-> latent tokenizer: ecar's own KL-VAE, or a user's pretrained diffusers VAE.

Every tokenizer offers `encode(images (B, C_img, H, W) in [-1, 1]) -> (B, C_lat, h, w)` and
`decode(latents) -> images`, on unscaled latents; the latent scale lives in the manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ecar.config import Config, ConfigError


@dataclass(frozen=True)
class LoadedTokenizer:
    model: nn.Module  # has .encode and .decode
    identity: dict[str, Any]  # kind, uri, sha256 (+ what a diffusers config says): what the manifest records
    # the latent scale the tokenizer was calibrated with (a diffusers VAE's `scaling_factor`);
    # None: the encode job measures it (1 / std of the latents)
    latent_scale: float | None = None


def load_tokenizer(config: Config) -> LoadedTokenizer:
    """The tokenizer `tokenizer.kind` / `tokenizer.checkpoint_uri` name, checked against the
    config's latent shape (channels = model.latent_channels, size = model.latent_size)."""
    uri = config.tokenizer.checkpoint_uri
    if not uri:
        raise ConfigError("tokenizer.checkpoint_uri: empty; train one with `ecar train-tokenizer` or give a path")
    if config.tokenizer.kind == "diffusers":
        from ecar.tokenizer.pretrained import load_diffusers_vae

        model, identity = load_diffusers_vae(uri, config.data.image_channels)
        channels, scale = identity["latent_channels"], identity["scaling_factor"]
        made = config.data.image_size // identity["downsample_factor"]
        if made != config.model.latent_size:
            raise ConfigError(
                f"model.latent_size: {config.model.latent_size} but the VAE at {uri} down-samples "
                f"{identity['downsample_factor']}x: {config.data.image_size}x{config.data.image_size} images "
                f"make {made}x{made} latents"
            )
    else:
        from ecar.tokenizer.vae import load_vae

        model, description = load_vae(uri, config.storage)
        identity = {"kind": "kl_vae", "uri": uri, "sha256": description["weights_sha256"]}
        scale = None
        channels = model.shape.latent_channels
        if description["image_size"] != config.data.image_size:
            raise ConfigError(
                f"data.image_size: {config.data.image_size} but the tokenizer at {uri} "
                f"was trained on {description['image_size']}x{description['image_size']} images"
            )
        if model.shape.image_channels != config.data.image_channels:
            raise ConfigError(
                f"data.image_channels: {config.data.image_channels} but the tokenizer at {uri} "
                f"takes {model.shape.image_channels}"
            )
    if channels != config.model.latent_channels:
        raise ConfigError(
            f"model.latent_channels: {config.model.latent_channels} but the tokenizer at {uri} "
            f"makes {channels}-channel latents"
        )
    return LoadedTokenizer(model.eval(), identity, scale)


def decoder_for_manifest(
    manifest: dict[str, Any], config: Config, device: torch.device | str = "cpu"
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The decoder (unscaled latents -> images) of the tokenizer that made a latent data set, as
    its manifest records it (ecar's KL-VAE or a diffusers VAE); None when the manifest names no
    tokenizer (synthetic latents). The tokenizer found must be the one recorded: a different
    hash raises ValueError, since its images would silently belong to other latents."""
    recorded = manifest.get("tokenizer") or {}
    if recorded.get("kind") not in ("kl_vae", "diffusers") or not recorded.get("uri"):
        return None
    tokenizer = load_tokenizer(
        config.override({"tokenizer.kind": recorded["kind"], "tokenizer.checkpoint_uri": recorded["uri"]})
    )
    if recorded.get("sha256") and tokenizer.identity.get("sha256") != recorded["sha256"]:
        raise ValueError(
            f"the tokenizer at {recorded['uri']} is not the one that encoded "
            f"{manifest.get('prefix', 'these latents')} (sha256 {tokenizer.identity.get('sha256')}, "
            f"the manifest records {recorded['sha256']}): decoding would show other images"
        )
    return tokenizer.model.to(device).decode
