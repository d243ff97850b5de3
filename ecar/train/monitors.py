"""What a training run measures and shows besides its loss, on each worker: the held-out loss
(`Validator`), peak memory (`PeakMemory`) and sample grids from the EMA weights (`Preview`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ecar.config import Config
from ecar.log import get_logger
from ecar.seeds import derived_seed

if TYPE_CHECKING:
    from ecar.train.trainer import ManifestSummary

log = get_logger(__name__)

PREVIEW_SEED = 1234  # the same noise at every preview, so grids compare across steps


class Validator:
    """The flow-matching loss (total and per stage) of the current weights on a fixed held-out
    set with fixed noise, so values compare across steps and across trials of a sweep. Each
    rank evaluates its equal slice of the set; the means are averaged over ranks."""

    def __init__(self, config: Config, data: ManifestSummary, rank: int, world_size: int) -> None:
        self.config, self.data, self.rank = config, data, rank
        self.per_rank = data.val_rows // world_size
        self.batch = min(config.train.micro_batch_size, self.per_rank)
        self.held_out: tuple[torch.Tensor, torch.Tensor] | None = None

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        from ecar.data.reader import read_latents

        if self.held_out is None:
            latents, labels = read_latents(
                self.data.manifest or self.data.manifest_uri,
                self.data.val_split,
                self.data.val_rows,
                self.config.storage,
            )
            part = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
            self.held_out = latents[part], labels[part]
        return self.held_out

    @torch.no_grad()
    def __call__(self, backend) -> dict[str, float]:
        latents, labels = self._load()
        sums: dict[str, float] = {}
        batches = self.per_rank // self.batch
        for index in range(batches):
            part = slice(index * self.batch, (index + 1) * self.batch)
            generator = torch.Generator(device=backend.device)
            # the same draws at every evaluation: a function of the seed and the row position only
            generator.manual_seed(derived_seed(self.config.train.seed, -1, index, self.rank))
            losses = backend.forward(
                latents[part].to(backend.device, backend.dtype), labels[part].to(backend.device), generator
            )
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value) / batches
        keys = sorted(sums)
        return {f"val_{key}": value for key, value in zip(keys, backend.mean([sums[k] for k in keys]))}


class PeakMemory:
    """Peak resident memory of this worker during training steps, leaving out checkpoint
    writes and previews (which copy whole tensors once in a while): the kernel's high-water mark
    (VmHWM) is read before each of those and reset after them (/proc/self/clear_refs)."""

    def __init__(self) -> None:
        self.baseline = self._read("VmRSS")  # imports done, no model yet
        self.peak = 0

    @staticmethod
    def _read(field: str) -> int:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def sample(self) -> None:
        self.peak = max(self.peak, self._read("VmHWM"))

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass

    def metrics(self, device: torch.device, state_bytes: int) -> dict[str, float]:
        """Maxima over workers, in MiB (a collective: every rank calls it): peak RSS during
        training steps, its growth over the imports-only baseline, and the bytes of the model
        state (weights, optimizer, EMA) the worker holds between steps."""
        import torch.distributed as dist

        self.sample()
        values = torch.tensor([self.peak, self.peak - self.baseline, state_bytes], dtype=torch.float64, device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        metrics = {
            "peak_rss_mib_max_worker": values[0].item() / 2**20,
            "peak_rss_growth_mib_max_worker": values[1].item() / 2**20,
            "model_state_mib_max_worker": values[2].item() / 2**20,
        }
        if device.type == "cuda":
            metrics["peak_gpu_mib_this_worker"] = torch.cuda.max_memory_allocated(device) / 2**20
        return metrics


class Preview:
    """Sample grids on rank 0 from the consolidated EMA weights, through the shared
    `model.generate()`: one sample per class (up to 10), decoded with the data's tokenizer when
    the manifest names one, else the latents' first channels."""

    def __init__(self, config: Config, data: ManifestSummary, rank: int) -> None:
        self.config, self.data = config, data
        self.model = None  # built on first use: a whole copy of the weights on rank 0
        self.decoder = _preview_decoder(data, config)
        classes = min(config.model.num_classes, 10)
        self.labels = torch.arange(classes)

    @torch.no_grad()
    def figure(self, ema_weights: dict[str, torch.Tensor], step: int):
        from ecar.figures import sample_grid
        from ecar.models import build_model

        if self.model is None:
            self.model = build_model(self.config).eval()
        state = self.model.state_dict()
        state.update(ema_weights)
        self.model.load_state_dict(state)
        generator = torch.Generator().manual_seed(PREVIEW_SEED)
        latents = self.model.generate(self.labels, generator=generator)
        if self.decoder is not None:
            images, what = self.decoder(latents / self.data.latent_scale), "decoded by the tokenizer"
        else:
            images, what = latents, "latent channels 0-2 (no tokenizer to decode)"
        return sample_grid(
            images, self.labels, f"EMA samples, step {step}: {what}", list(self.data.class_names) or None
        )


def _preview_decoder(data: ManifestSummary, config: Config):
    """The data's tokenizer decoder, or None (with a warning) if there is none or it cannot be
    loaded: previews must never stop training."""
    from ecar.tokenizer import decoder_for_manifest

    try:
        decode = decoder_for_manifest(data.manifest, config)
    except Exception as error:  # noqa: BLE001 - any failure falls back to showing latents
        log.warning("previews show latents: cannot load the data's tokenizer (%s)", error)
        return None
    return None if decode is None else (lambda latents: decode(latents).clamp(-1.0, 1.0))
