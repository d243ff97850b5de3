"""Training and sampling on one GPU for the ImageNet presets: step time, images/s and MFU, then
sampling latency, written to benchmarks/results/gpu.json. One prepared script that fits in a
short loan of a GPU machine (~8 minutes on an H100/H200-class GPU):

    python benchmarks/gpu.py                  # ecar-b and dit-b-2, 100 steps each, bf16, ZeRO-2
    python benchmarks/gpu.py --tiny --output /tmp/gpu.json   # the same code at toy size on CPU

Training goes through the real job (`jobs.train.train_job`: Ray Train with one worker, DeepSpeed
ZeRO-2, bf16, the streaming latent reader, MLflow) on synthetic latents of each preset's shape:
step time does not depend on the latents' values. Images/s is the loop's own figure
(`samples_per_s_per_worker`, logged every `--log-every` steps), over the windows after the first
(which pays for compilation and the allocator's warm-up).

MFU = training FLOPs per image x images/s / the device's peak dense bf16 FLOP/s. Training FLOPs
per image are 3 x the forward (forward + backward), 2 FLOPs per multiply-add, with the forward
counted by running the model (`ecar.flops.forward_flops`): for E-CAR the AR over the whole
sequence plus the flow once at every stage (its loss trains every stage of every image), for the
flow-DiT one forward. The peak comes from a table of datasheet figures by device name; an unknown
device (or a CPU) gets no MFU rather than a guessed one.

Sampling: freshly initialised models (latency does not depend on the weights) under bf16
autocast, E-CAR at its default schedule against the flow-DiT at 250 and 50 steps, CFG on, batch 1
and 64, timed interleaved after a warm-up with the device synchronised around each call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a one-node cluster on loopback
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, by a substring of
# torch.cuda.get_device_name(); SXM figures where the name does not say.
PEAK_BF16 = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
}

FULL = {
    "models": {"ecar-b": [], "dit-b-2": []},
    "steps": 100,
    "batch": 256,
    "log_every": 10,
    "latency_batches": (1, 64),
    "dit_steps": (250, 50),
    "repeats": 3,
}
TINY_MODEL = ["model.width=64", "model.heads=2", "model.flow_depth=2"]
TINY = {
    "models": {"ecar-debug": [], "dit-fmnist": [*TINY_MODEL, "model.latent_size=8", "stages.grids=[8]"]},
    "steps": 4,
    "batch": 8,
    "log_every": 2,
    "latency_batches": (1, 2),
    "dit_steps": (10, 4),
    "repeats": 1,
}


def peak_flops(device_name: str) -> float | None:
    for name, peak in PEAK_BF16.items():
        if name in device_name:
            return peak
    return None


def train_flops_per_image(config) -> float:
    """3 x forward (forward + backward), 2 FLOPs per multiply-add."""
    from ecar.flops import count

    return 3 * 2 * sum(count(config, generation=False).forward.values())


def train_one(preset: str, overrides: list[str], scale: dict, gpu: bool, root: Path, tracking_uri: str) -> dict:
    from mlflow.tracking import MlflowClient

    from ecar.presets import get_config
    from ecar.train.synthetic import write_synthetic_latents
    from jobs.train import resolve_config, train_job

    model = get_config(preset, overrides).model
    shape = (model.latent_channels, model.latent_size, model.latent_size)
    latents = write_synthetic_latents(
        str(root / f"latents-{preset}"), rows=max(512, 4 * scale["batch"]), shape=shape, shards=4, test_rows=0
    )
    settings = [
        *overrides,
        f"train.steps={scale['steps']}",
        f"train.global_batch_size={scale['batch']}",
        f"train.micro_batch_size={scale['batch']}",
        "train.num_workers=1",
        f"train.use_gpu={str(gpu).lower()}",
        f"train.precision={'bf16' if gpu else 'fp32'}",
        "train.zero_stage=2",
        f"train.log_every={scale['log_every']}",
        f"train.sample_every={10 * scale['steps']}",
        f"train.checkpoint_every={scale['steps']}",
        "train.val_rows=0",
        "train.warmup_steps=1",
        "train.max_failures=0",
        f"data.shuffle_buffer_rows={2 * scale['batch']}",
        f"tracking.tracking_uri={tracking_uri}",
    ]
    if not gpu:
        settings.append("train.cpus_per_worker=1")
    config = resolve_config(preset, settings, manifest=latents, output=str(root / "out"))
    started = time.perf_counter()
    result = train_job(config, f"gpu-{preset}", tracking_uri=tracking_uri)
    wall = time.perf_counter() - started
    history = MlflowClient(tracking_uri).get_metric_history(result.mlflow_run_id, "samples_per_s_per_worker")
    windows = [m.value for m in sorted(history, key=lambda m: m.step)]
    steady = windows[1:] or windows  # the first window pays for warm-up
    images_per_s = statistics.median(steady)
    return {
        "preset": preset,
        "overrides": overrides,
        "steps": result.metrics.get("step"),
        "batch": scale["batch"],
        "precision": config.train.precision,
        "zero_stage": config.train.zero_stage,
        "images_per_s": images_per_s,
        "step_s": scale["batch"] / images_per_s,
        "windows_images_per_s": windows,
        "train_flops_per_image": train_flops_per_image(config),
        "job_wall_s": wall,
        "config": config,
    }


def latency(models: dict, scale: dict, device) -> dict:
    """Seconds per image, median of `repeats` interleaved runs, per variant and batch size."""
    import torch

    from ecar.models import build_model
    from ecar.presets import get_config

    variants = {}
    for preset, overrides in models.items():
        config = get_config(preset, overrides)
        if config.model.kind == "ecar":
            variants["ecar"] = config
        else:
            for steps in scale["dit_steps"]:
                variants[f"dit@{steps}"] = config.override({"flow.steps_per_stage": [steps]})
    torch.manual_seed(0)
    networks = {name: build_model(config).to(device).eval() for name, config in variants.items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def once(network, batch: int, seed: int) -> float:
        labels = torch.arange(batch, device=device) % network.config.model.num_classes
        generator = torch.Generator(device=device).manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        network.generate(labels, generator=generator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / batch

    figures: dict[str, dict[str, float]] = {name: {} for name in networks}
    with torch.inference_mode(), autocast:
        for network in networks.values():
            once(network, 1, seed=0)  # warm-up: kernels, allocator
        for batch in scale["latency_batches"]:
            runs: dict[str, list[float]] = {name: [] for name in networks}
            for repeat in range(scale["repeats"]):
                for name, network in networks.items():
                    runs[name].append(once(network, batch, seed=repeat))
            for name in networks:
                figures[name][str(batch)] = statistics.median(runs[name])
                print(
                    f"sampling {name:<8} batch {batch:>3}: {figures[name][str(batch)] * 1e3:9.2f} ms/image", flush=True
                )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy models and a few steps (runs on CPU)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import torch

    from ecar.runtime import init_ray

    scale = TINY if args.tiny else FULL
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    device_name = torch.cuda.get_device_name(0) if gpu else platform.processor() or "cpu"
    peak = peak_flops(device_name) if gpu else None
    init_ray(None)
    training = {}
    with tempfile.TemporaryDirectory(prefix="ecar-gpu-bench-") as scratch:
        root = Path(scratch)
        tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        for preset, overrides in scale["models"].items():
            figures = train_one(preset, overrides, scale, gpu, root, tracking_uri)
            flops_per_s = figures["train_flops_per_image"] * figures["images_per_s"]
            figures["model_tflops_per_s"] = flops_per_s / 1e12
            figures["mfu"] = flops_per_s / peak if peak else None
            figures.pop("config")
            training[preset] = figures
            mfu = f"{figures['mfu']:.1%}" if figures["mfu"] is not None else "n/a (no peak figure for this device)"
            print(
                f"train {preset}: {figures['step_s'] * 1e3:.1f} ms/step at batch {scale['batch']}, "
                f"{figures['images_per_s']:.1f} images/s, {figures['model_tflops_per_s']:.2f} TFLOP/s, MFU {mfu}",
                flush=True,
            )
    sampling = latency(scale["models"], scale, device)
    result = {
        "what": "one-GPU training (bf16, ZeRO-2, the real train job) and sampling latency of the ImageNet presets",
        "tiny": args.tiny,
        "device": device_name,
        "peak_bf16_flops": peak,
        "torch": torch.__version__,
        "flop_convention": "training = 3 x forward; 2 FLOPs per multiply-add; forward counted by running the model",
        "training": training,
        "sampling_s_per_image": sampling,
        "sampling_ratios_vs_ecar": {
            name: {batch: values[batch] / sampling["ecar"][batch] for batch in values}
            for name, values in sampling.items()
            if name != "ecar"
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
