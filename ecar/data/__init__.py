"""The latent data pipeline: image sources -> image shards -> latent shards + manifest -> reader."""
