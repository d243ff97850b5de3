"""The headline experiment: E-CAR vs a flow-DiT of matched parameter count on Fashion-MNIST latents.

Three models are trained with one budget (same steps, batch, optimizer, learning rate, EMA):
E-CAR (`ecar-fmnist`), its full-window FlowAR-like ablation (`stages.full_window=true`, which
changes the training windows, so it is a model of its own) and a flow-DiT (`dit-fmnist`, its
depth set so that its parameter count is the closest to E-CAR's). Each variant draws the same
rows (class-balanced labels, per-row seeds) and is judged against the same number of test
images: FID, precision/recall, GFLOPs and CPU latency per image, for E-CAR and the full window
at their default schedule and the DiT at 250, 100, 50 and 25 Euler steps.

    python benchmarks/headline.py                          # everything, outputs/headline -> benchmarks/results
    python benchmarks/headline.py --parts data train       # only some parts; re-run to continue
    python benchmarks/headline.py --manifest outputs/quickstart/latents --parts train sample evaluate report
    python benchmarks/headline.py --variants ecar dit@250  # only some variants (and their models)
    python benchmarks/headline.py --scale tiny --root /tmp/headline-tiny   # smoke test, results under the root

Parts: data (images, tokenizer, latents), train, sample, evaluate, report. Each skips what is
finished (the model's export.json, the variant's samples manifest.json, its metrics JSON), so a
killed run re-run completes exactly the rest. FID over a few thousand images is biased upwards
against FID-50k: compare only numbers measured with the same N (recorded in every output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python benchmarks/headline.py` from the repository root

from ecar import storage  # noqa: E402
from ecar.config import Config, ConfigError  # noqa: E402
from ecar.log import get_logger  # noqa: E402
from ecar.presets import get_config  # noqa: E402

log = get_logger("ecar.benchmarks.headline")

RESULTS = REPO / "benchmarks" / "results"
PARTS = ("data", "train", "sample", "evaluate", "report")
# Targets of the issue: E-CAR's FID within 10% of the best DiT FID, at >= 10x fewer FLOPs and
# >= 5x lower latency than the DiT setting reaching that FID.
FID_TOLERANCE, FLOPS_TARGET, LATENCY_TARGET = 1.10, 10.0, 5.0


@dataclass(frozen=True)
class Scale:
    """How much work each part does; `tiny` smoke-tests the whole chain in minutes."""

    images_per_split: int | None  # None: the whole data set
    tokenizer_steps: int
    train_steps: int
    ema_decay: float
    samples: int
    dit_steps: tuple[int, ...]
    latency_batches: tuple[int, ...]


SCALES = {
    "full": Scale(images_per_split=None, tokenizer_steps=600, train_steps=2000, ema_decay=0.999, samples=5000,
                  dit_steps=(250, 100, 50, 25), latency_batches=(1, 16)),
    "tiny": Scale(images_per_split=256, tokenizer_steps=20, train_steps=6, ema_decay=0.99, samples=32,
                  dit_steps=(4, 2), latency_batches=(1,)),
}

# trained model -> (preset, the overrides that define its family)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "ecar": ("ecar-fmnist", {}),
    "ecar-full": ("ecar-fmnist", {"stages.full_window": True}),
    "dit": ("dit-fmnist", {}),
}


@dataclass(frozen=True)
class Variant:
    """One row of the table: a trained model sampled with a schedule."""

    name: str
    model: str
    overrides: tuple[str, ...] = ()


def all_variants(dit_steps: tuple[int, ...]) -> list[Variant]:
    dits = [Variant(f"dit@{steps}", "dit", (f"flow.steps_per_stage=[{steps}]",)) for steps in dit_steps]
    return [Variant("ecar", "ecar"), Variant("ecar-full", "ecar-full"), *dits]


@dataclass(frozen=True)
class Paths:
    """Everything of one experiment under one work root."""

    root: str
    manifest: str  # the latent data set (its manifest.json's prefix)
    tokenizer: str

    @property
    def images(self) -> str:
        return storage.join(self.root, "images")

    def export(self, model: str) -> str:
        from ecar.train.trainer import export_uri

        return export_uri(get_config("ecar-fmnist", {"storage.root": self.root}), model)

    def samples(self, variant: str) -> str:
        return storage.join(self.root, "samples", variant)

    def metrics(self, variant: str) -> str:
        return storage.join(self.root, "metrics", f"{variant}.json")


# ----- configs: one budget for every model ------------------------------------------------------
def budget(paths: Paths, scale: Scale) -> dict[str, Any]:
    """Settings shared by every model: data, tokenizer, storage and the training budget (a
    2-worker DeepSpeed run that fits on 2 cores, as in jobs/quickstart.py)."""
    steps = scale.train_steps
    return {
        "storage.root": paths.root,
        "data.manifest_uri": paths.manifest,
        "data.encode_cpus_per_actor": 1.0,
        "tokenizer.checkpoint_uri": paths.tokenizer,
        "tokenizer.steps": scale.tokenizer_steps,
        "tokenizer.eval_images": 500 if scale.images_per_split is None else 64,
        "tokenizer.fid_images": 200 if scale.images_per_split is None else 16,
        "tokenizer.cpus_per_worker": 1.0,
        "train.steps": steps,
        "train.num_workers": 2,
        "train.cpus_per_worker": 0.5,
        "train.global_batch_size": 64,
        "train.micro_batch_size": 32,
        "train.warmup_steps": max(1, steps // 10),
        "train.lr": 1e-3,
        "train.ema_decay": scale.ema_decay,
        "train.log_every": max(1, steps // 20),
        "train.sample_every": max(2, steps // 2),
        "train.checkpoint_every": max(2, steps // 4),
        "train.zero_stage": 2,
    }


def parameter_count(config: Config) -> int:
    import torch

    from ecar.models import build_model

    with torch.device("meta"):  # shapes only: no weights are allocated
        return sum(p.numel() for p in build_model(config).parameters())


def matched_dit_depth(ecar: Config, dit: Config) -> int:
    """The DiT depth whose parameter count is the closest to E-CAR's (dit-fmnist's own depth,
    AR + flow depth, leaves it ~15% smaller: an E-CAR flow block also carries spatial adaLN)."""
    target = parameter_count(ecar)
    depths = range(1, 4 * (ecar.model.ar_depth + ecar.model.flow_depth) + 1)
    return min(depths, key=lambda d: abs(parameter_count(dit.override({"model.flow_depth": d})) - target))


def model_configs(paths: Paths, scale: Scale, dit_depth: int | None) -> dict[str, Config]:
    shared = budget(paths, scale)
    configs = {name: get_config(preset, {**shared, **family}) for name, (preset, family) in MODELS.items()}
    depth = dit_depth or matched_dit_depth(configs["ecar"], configs["dit"])
    configs["dit"] = configs["dit"].override({"model.flow_depth": depth})
    return configs


# ----- parts ------------------------------------------------------------------------------------
def prepare_data(config: Config, paths: Paths, scale: Scale) -> None:
    """Images, tokenizer and latents; each is skipped when already there (or given)."""
    from ecar.data.encode import encode_latents
    from ecar.data.prepare import prepare_images
    from ecar.tokenizer.train import train_tokenizer

    if storage.exists(storage.join(paths.manifest, "manifest.json"), config.storage):
        log.info("data: latents already at %s", paths.manifest)
        return
    prepare_images(config, paths.images, limit_per_split=scale.images_per_split)
    if not storage.exists(storage.join(paths.tokenizer, "tokenizer.json"), config.storage):
        train_tokenizer(config, paths.images, paths.tokenizer)
    encode_latents(config, paths.images, paths.manifest)


def train_models(configs: dict[str, Config], models: list[str], paths: Paths, address: str | None) -> None:
    from jobs.train import train_job

    for model in models:
        if storage.exists(storage.join(paths.export(model), "export.json")):
            log.info("train %s: exported already at %s", model, paths.export(model))
            continue
        log.info("train %s: %d steps", model, configs[model].train.steps)
        result = train_job(configs[model], model, address)
        log.info("train %s: exported %s", model, result.export_uri)


def sample_variants(variants: list[Variant], paths: Paths, num_images: int, actors: int) -> None:
    from ecar.sampler import sample_to_storage

    for variant in variants:
        out = paths.samples(variant.name)
        if storage.exists(storage.join(out, "manifest.json")):
            log.info("sample %s: done already at %s", variant.name, out)
            continue
        log.info("sample %s: %d images with %s", variant.name, num_images, list(variant.overrides) or "the default schedule")
        sample_to_storage(paths.export(variant.model), out, num_images, overrides=list(variant.overrides),
                          shard_size=max(16, min(250, num_images // 4)), batch_size=50, actors=actors,
                          cpus_per_actor=1.0)


def evaluate_variants(variants: list[Variant], paths: Paths, num_images: int, latency_batches: tuple[int, ...]) -> None:
    """Per-variant metrics JSON; FID against the first `num_images` test images for every variant."""
    from ecar.evaluation.evaluate import evaluate_samples, log_evaluation
    from ecar.export import read_config, read_metadata
    from ecar.tracking import resolve_tracking_uri

    for variant in variants:
        target = paths.metrics(variant.name)
        if storage.exists(target):
            log.info("evaluate %s: done already (%s)", variant.name, target)
            continue
        export = paths.export(variant.model)
        config, metadata = read_config(export), read_metadata(export)
        metrics = evaluate_samples(paths.samples(variant.name), paths.manifest, "test", num_images, latency_batches)
        metrics.update({"variant": variant.name, "model": variant.model, "preset": config.preset,
                        "overrides": list(variant.overrides), "params": parameter_count(config),
                        "train_steps": metadata["step"], "global_batch_size": config.train.global_batch_size,
                        "samples": num_images, "reference_images": metrics["real_images"]})
        log_evaluation(metrics, config, resolve_tracking_uri(config), metadata.get("mlflow_run_id", ""))
        storage.write_text_atomic(target, json.dumps(metrics, indent=2))
        log.info("evaluate %s: FID %.2f, %.3f GFLOPs/image", variant.name, metrics["fid"], metrics["sampling_gflops"])


# ----- report -----------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(), "cuda": torch.cuda.is_available()}


def latency_ratios(slow: dict[str, Any], fast: dict[str, Any]) -> dict[str, float]:
    keys = [k for k in fast if k.startswith("latency_s_per_image_b") and k in slow]
    return {k.removeprefix("latency_s_per_image_"): slow[k] / fast[k] for k in keys}


def comparisons(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """E-CAR against every DiT setting, and the issue's targets against the best-FID DiT setting."""
    ecar = rows.get("ecar")
    dits = {name: row for name, row in rows.items() if row["model"] == "dit"}
    if ecar is None or not dits:
        return {}
    versus = {name: {"fid_ratio": ecar["fid"] / row["fid"],
                     "flops_ratio": row["sampling_gflops"] / ecar["sampling_gflops"],
                     "latency_ratio": latency_ratios(row, ecar)} for name, row in dits.items()}
    best = min(dits, key=lambda name: dits[name]["fid"])
    target = versus[best]
    targets = {
        "against": best, "best_dit_fid": dits[best]["fid"], "ecar_fid": ecar["fid"],
        "fid_within_10pct": ecar["fid"] <= FID_TOLERANCE * dits[best]["fid"],
        "flops_10x": target["flops_ratio"] >= FLOPS_TARGET,
        "latency_5x": {batch: ratio >= LATENCY_TARGET for batch, ratio in target["latency_ratio"].items()},
    }
    targets["met"] = targets["fid_within_10pct"] and targets["flops_10x"] and all(targets["latency_5x"].values())
    # also: the cheapest DiT setting at least as good as E-CAR, if any (matched quality)
    as_good = [name for name, row in dits.items() if row["fid"] <= ecar["fid"]]
    matched = min(as_good, key=lambda name: dits[name]["sampling_gflops"]) if as_good else None
    return {"ecar_vs": versus, "targets": targets, "cheapest_dit_as_good_as_ecar": matched}


COLUMNS = [("variant", "{}"), ("steps_per_stage", "{}"), ("params", "{:,}"), ("fid", "{:.2f}"),
           ("precision", "{:.3f}"), ("recall", "{:.3f}"), ("classifier_score", "{:.2f}"), ("sampling_gflops", "{:.2f}"),
           ("latency_s_per_image_b1", "{:.4f}"), ("latency_s_per_image_b16", "{:.4f}")]


def markdown(result: dict[str, Any]) -> str:
    rows, compared = result["variants"], result["comparisons"]
    lines = [f"# Headline: E-CAR vs flow-DiT on Fashion-MNIST latents ({result['scale']} scale)", "",
             f"{result['date']}; {result['train_steps']} training steps at batch {result['global_batch_size']} for every "
             f"model; {result['samples']} samples per variant; FID against the first {result['reference_images']} "
             f"test images (FID-{result['reference_images']}, not comparable to FID-50k); "
             f"{result['machine']['cpus']} CPUs, torch {result['machine']['torch']}.", "",
             "| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows.values():
        cells = [fmt.format(row[name]) if name in row else "-" for name, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if compared:
        lines += ["", "E-CAR (default schedule) against each DiT setting (ratios > 1: E-CAR is cheaper):", "",
                  "| DiT setting | FID E-CAR / DiT | FLOPs DiT / E-CAR | latency DiT / E-CAR |", "|---|---|---|---|"]
        for name, ratio in compared["ecar_vs"].items():
            latency = ", ".join(f"{b} {r:.1f}x" for b, r in ratio["latency_ratio"].items())
            lines.append(f"| {name} | {ratio['fid_ratio']:.2f} | {ratio['flops_ratio']:.1f}x | {latency} |")
        t = compared["targets"]
        latency_met = ", ".join(f"{b}: {'yes' if ok else 'no'}" for b, ok in t["latency_5x"].items())
        lines += ["", f"Targets against the best-FID DiT setting ({t['against']}, FID {t['best_dit_fid']:.2f}):",
                  f"- E-CAR FID {t['ecar_fid']:.2f} within 10%: {'yes' if t['fid_within_10pct'] else 'no'}",
                  f"- >= 10x fewer FLOPs: {'yes' if t['flops_10x'] else 'no'}",
                  f"- >= 5x lower latency: {latency_met}",
                  f"- all met: {'yes' if t['met'] else 'no'}",
                  f"- cheapest DiT setting with FID <= E-CAR's: {compared['cheapest_dit_as_good_as_ecar'] or 'none'}"]
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict[str, Any]], path: Path, reference_images: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    dits = sorted((row for row in rows.values() if row["model"] == "dit"), key=lambda row: row["sampling_gflops"])
    if dits:
        axes.plot([r["sampling_gflops"] for r in dits], [r["fid"] for r in dits], "o-", label="flow-DiT")
        for row in dits:
            axes.annotate(f"{row['steps_per_stage'][0]} steps", (row["sampling_gflops"], row["fid"]),
                          textcoords="offset points", xytext=(4, 4), fontsize=8)
    for name, marker in (("ecar", "*"), ("ecar-full", "s")):
        if name in rows:
            axes.plot(rows[name]["sampling_gflops"], rows[name]["fid"], marker, markersize=12 if marker == "*" else 7,
                      label="E-CAR" if name == "ecar" else "E-CAR full window (FlowAR-like)")
    axes.set_xscale("log")
    axes.set_xlabel("GFLOPs per image (sampling, CFG on)")
    axes.set_ylabel(f"FID-{reference_images}")
    axes.set_title("Fashion-MNIST latents: FID against sampling cost")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(variants: list[Variant], paths: Paths, scale_name: str, results: Path) -> dict[str, Any]:
    rows = {v.name: json.loads(storage.read_text(paths.metrics(v.name)))
            for v in variants if storage.exists(paths.metrics(v.name))}
    if not rows:
        raise FileNotFoundError(f"no metrics under {storage.join(paths.root, 'metrics')}: run the evaluate part first")
    first = next(iter(rows.values()))
    result = {
        "what": "E-CAR vs flow-DiT of matched parameter count, same training budget, same sample rows",
        "scale": scale_name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "root": paths.root,
        "manifest_uri": paths.manifest, "machine": machine(),
        "train_steps": first["train_steps"], "global_batch_size": first["global_batch_size"],
        "samples": first["samples"], "reference_images": first["reference_images"],
        "flop_convention": "multiply-add counted once (DiT's convention), counted by running generate()",
        "latency": "median seconds per image of generate() on this machine, measured per variant in turn",
        "variants": rows,
        "comparisons": comparisons(rows),
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / "headline.json").write_text(json.dumps(result, indent=2))
    (results / "headline.md").write_text(markdown(result))
    plot(rows, results / "headline.png", result["reference_images"])
    return result


# ----- command line -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--root", help="work root (default: outputs/headline, outputs/headline-tiny at --scale tiny)")
    parser.add_argument("--manifest", help="an existing latent data set to reuse (default: ROOT/latents)")
    parser.add_argument("--tokenizer", help="an existing tokenizer to reuse (default: ROOT/tokenizer)")
    parser.add_argument("--train-steps", type=int, help="training steps of every model (default: the scale's)")
    parser.add_argument("--samples", type=int, help="images per variant, and reference images for FID")
    parser.add_argument("--dit-steps", type=int, nargs="+", help="DiT Euler steps (default: 250 100 50 25)")
    parser.add_argument("--dit-depth", type=int, help="DiT depth (default: the one matching E-CAR's parameters)")
    parser.add_argument("--variants", nargs="+", help="only these variants (e.g. ecar dit@250; default: all)")
    parser.add_argument("--actors", type=int, default=1, help="sampling actors (1 CPU each)")
    parser.add_argument("--results-dir", type=Path, help="report output (default: benchmarks/results, ROOT/results at --scale tiny)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    args = parser.parse_args(argv)

    base = SCALES[args.scale]
    scale = Scale(images_per_split=base.images_per_split, tokenizer_steps=base.tokenizer_steps,
                  train_steps=args.train_steps or base.train_steps, ema_decay=base.ema_decay,
                  samples=args.samples or base.samples, dit_steps=tuple(args.dit_steps or base.dit_steps),
                  latency_batches=base.latency_batches)
    root = args.root or ("outputs/headline" if args.scale == "full" else f"outputs/headline-{args.scale}")
    paths = Paths(root=root, manifest=(args.manifest or storage.join(root, "latents")).removesuffix("/manifest.json"),
                  tokenizer=args.tokenizer or storage.join(root, "tokenizer"))
    results = args.results_dir or (RESULTS if args.scale == "full" else Path(root) / "results")
    variants = all_variants(scale.dit_steps)
    if args.variants:
        unknown = sorted(set(args.variants) - {v.name for v in variants})
        if unknown:
            parser.error(f"unknown variants {unknown}; available: {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in args.variants]
    models = [m for m in MODELS if any(v.model == m for v in variants)]

    started = time.perf_counter()
    try:
        if {"data", "train", "sample"} & set(args.parts):
            from ecar.runtime import init_ray

            init_ray(args.address)
        if {"data", "train"} & set(args.parts):
            configs = model_configs(paths, scale, args.dit_depth)
            for name, config in configs.items():
                log.info("%-9s %s: %.2f M parameters", name, config.preset, parameter_count(config) / 1e6)
        if "data" in args.parts:
            prepare_data(configs["ecar"], paths, scale)
        if "train" in args.parts:
            train_models(configs, models, paths, args.address)
        if "sample" in args.parts:
            sample_variants(variants, paths, scale.samples, args.actors)
        if "evaluate" in args.parts:
            import ray

            ray.shutdown()  # latency is timed in this process: not next to an idle Ray cluster of ours
            evaluate_variants(variants, paths, scale.samples, scale.latency_batches)
        if "report" in args.parts:
            result = report(variants, paths, args.scale, results)
            print((results / "headline.md").read_text())
            print(f"wrote {results}/headline.json, headline.md, headline.png "
                  f"({result['samples']} samples and {result['reference_images']} reference images per FID)")
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"headline: {error}", file=sys.stderr)
        return 2
    log.info("headline: parts %s done in %.0f s", " ".join(args.parts), time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
