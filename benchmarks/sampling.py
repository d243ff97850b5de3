"""E-CAR vs flow-DiT sampling cost, side by side in one process: FLOPs and CPU latency per image.

Both models are built from presets of matched width and depth (ecar-fmnist: AR 4 + flow 4
blocks of width 256; dit-fmnist: 8 blocks of width 256, same latent and patch), run on the
same labels and seeds, and timed interleaved (E-CAR, DiT@250, DiT@50, E-CAR, ...) so that the
shared machine's noise hits all of them alike. Latency does not depend on the weights, so
freshly initialised models are timed; whether the schedules give matched quality is settled by
the evaluation work (benchmarks/headline.py).

    python benchmarks/sampling.py                 # writes benchmarks/results/sampling.json
    python benchmarks/sampling.py --repeats 5 --batch-sizes 1 16 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from ecar.config import Config
from ecar.flops import count
from ecar.models import build_model
from ecar.presets import get_config

RESULTS = Path(__file__).parent / "results" / "sampling.json"


def variants(ecar_preset: str, dit_preset: str, dit_steps: list[int]) -> dict[str, Config]:
    ecar = get_config(ecar_preset)
    dit = get_config(dit_preset)
    out = {"ecar": ecar}
    for steps in dit_steps:
        out[f"dit@{steps}"] = replace(dit, flow=replace(dit.flow, steps_per_stage=(steps,)))
    return out


def time_once(model: torch.nn.Module, batch: int, seed: int) -> float:
    """Seconds per image for one batch."""
    labels = torch.arange(batch) % model.config.model.num_classes
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.generate(labels, generator=generator)
    return (time.perf_counter() - start) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ecar-preset", default="ecar-fmnist")
    parser.add_argument("--dit-preset", default="dit-fmnist")
    parser.add_argument("--dit-steps", type=int, nargs="+", default=[250, 50])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    configs = variants(args.ecar_preset, args.dit_preset, args.dit_steps)
    torch.manual_seed(0)
    models = {name: build_model(config).eval() for name, config in configs.items()}
    flops = {}
    for name, config in configs.items():
        report = count(config)
        flops[name] = {
            "per_image": report.generation_total,
            "per_image_unguided": report.generation_unguided,
            "parameters": report.parameters,
            "steps_per_stage": list(config.flow.steps_per_stage),
            "cfg_scale": config.sampling.cfg_scale,
        }
        print(f"{name:<10} {report.parameters / 1e6:6.2f} M params  {report.generation_total / 1e9:9.3f} GFLOPs/image")

    latency: dict[str, dict[str, dict]] = {name: {} for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up: first calls pay for allocations and dispatch caches
            time_once(model, 1, seed=0)
        for batch in args.batch_sizes:
            runs: dict[str, list[float]] = {name: [] for name in models}
            for repeat in range(args.repeats):
                for name, model in models.items():
                    runs[name].append(time_once(model, batch, seed=repeat))
                    print(
                        f"batch {batch:>3} repeat {repeat} {name:<10} {runs[name][-1] * 1e3:10.1f} ms/image", flush=True
                    )
            for name in models:
                latency[name][str(batch)] = {
                    "median_s_per_image": statistics.median(runs[name]),
                    "runs_s_per_image": runs[name],
                }

    comparisons = {}
    for name in models:
        if name == "ecar":
            continue
        comparisons[name] = {
            "flops_ratio": flops[name]["per_image"] / flops["ecar"]["per_image"],
            "latency_ratio": {
                batch: latency[name][batch]["median_s_per_image"] / latency["ecar"][batch]["median_s_per_image"]
                for batch in latency["ecar"]
            },
        }
    default_dit = f"dit@{get_config(args.dit_preset).flow.steps_per_stage[0]}"
    targets = {"flops_ratio_at_least": 10.0, "latency_ratio_at_least": 5.0, "against": default_dit}
    if default_dit in comparisons:
        target = comparisons[default_dit]
        targets["flops_met"] = target["flops_ratio"] >= 10.0
        targets["latency_met"] = {b: r >= 5.0 for b, r in target["latency_ratio"].items()}
    result = {
        "what": "per-image sampling cost, E-CAR vs flow-DiT of matched width/depth, CFG on, fresh weights",
        "flop_convention": "multiply-add counted once (DiT's convention), counted by running generate()",
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
        },
        "presets": {"ecar": args.ecar_preset, "dit": args.dit_preset},
        "repeats": args.repeats,
        "flops": flops,
        "latency": latency,
        "ratios_vs_ecar": comparisons,
        "targets": targets,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(json.dumps({"ratios_vs_ecar": comparisons, "targets": targets}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
