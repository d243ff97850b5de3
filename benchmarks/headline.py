"""The headline experiment: E-CAR vs a flow-DiT of matched parameter count on Fashion-MNIST latents.

Models, all trained with one budget (same steps, batch, optimizer, learning-rate schedule, EMA,
data and seed): E-CAR (`ecar-fmnist` as preset), its full-window FlowAR-like ablation
(`stages.full_window=true`), E-CAR with the AR fed the clean estimate (`model.ar_next_input=
clean_estimate`, the design before issue 17, for the diversity comparison) and a flow-DiT
(`dit-fmnist` with the depth whose parameter count is the closest to E-CAR's).

Rows (variants), each sampled on the same (class, seed) rows and judged against the same N test
images: E-CAR at its default schedule, a richer one and cheaper ones, the full window and the
clean-estimate model at default, the flow-DiT at 100, 50, 25 and 10 Euler steps and at the step
count whose FLOPs equal E-CAR's default (cost-matched); flow-DiT@250 for FLOPs and latency (FID with
`--dit-250`). Noise figures: FID of N real train images against the N test images (the floor),
of the tokenizer's reconstructions of those train images (the floor through this tokenizer:
what a model that generates the training latents exactly would score), and between two
sampling seeds of E-CAR's default and of the best flow-DiT row (seed noise; a difference below
it is a tie).

    python benchmarks/headline.py                          # everything, outputs/headline -> benchmarks/results
    python benchmarks/headline.py --parts data train       # only some parts; re-run to continue
    python benchmarks/headline.py --variants ecar dit@50   # only some variants (and their models)
    python benchmarks/headline.py --models ecar dit        # only these models and their rows
    python benchmarks/headline.py --scale tiny --root /tmp/headline-tiny   # smoke test, results under the root

Parts: data (images, tokenizer, latents), train, sample, evaluate (with the floors and the seed
rows), report. Each skips what is finished (the model's export.json, the variant's samples
manifest.json, its metrics JSON), and training resumes from its latest checkpoint, so a killed
run re-run completes exactly the rest. What is finished is reused only for what made it: an
export trained under other settings than the preset and overrides give now, or samples and
metrics of another export or schedule, stop the run with the path to delete.

FID over a few thousand images is biased upwards against FID-50k: compare only numbers measured
with the same N (recorded in every output).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python benchmarks/headline.py` from the repository root

from ecar import storage  # noqa: E402
from ecar.config import USER_ERRORS, Config  # noqa: E402
from ecar.log import get_logger  # noqa: E402
from ecar.presets import get_config  # noqa: E402
from jobs.quickstart import SCALES as QUICKSTART_SCALES  # noqa: E402
from jobs.quickstart import Scale  # noqa: E402
from jobs.quickstart import budget as quickstart_budget  # noqa: E402

log = get_logger("ecar.benchmarks.headline")

RESULTS = REPO / "benchmarks" / "results"
PARTS = ("data", "train", "sample", "evaluate", "report")
# Targets of the issue: E-CAR's FID within 10% of the best DiT FID, at >= 10x fewer FLOPs and
# >= 5x lower latency than the DiT setting reaching that FID.
FID_TOLERANCE, FLOPS_TARGET, LATENCY_TARGET = 1.10, 10.0, 5.0
SEED_ROW_SEED = 1  # sampling.seed of the second-seed rows (the first rows use 0)


# The training budget of every model, shared with the quickstart's `--scale full`; chosen from
# measurements on this 2-core machine (benchmarks/results/headline.md says why).
SCALES = {
    "full": QUICKSTART_SCALES["full"],
    "tiny": Scale(
        images_per_split=256,
        tokenizer_steps=20,
        train_steps=6,
        batch_size=16,
        samples=32,
        latency_batches=(1,),
        ema_decay=0.99,
        validate=True,
    ),
}
DIT_STEPS = {"full": (100, 50, 25, 10), "tiny": (4, 2)}

# trained model -> (preset, the overrides that define it)
# (in training order: the main comparison first)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "ecar": ("ecar-fmnist", {}),
    "dit": ("dit-fmnist", {}),
    "ecar-clean": ("ecar-fmnist", {"model.ar_next_input": "clean_estimate"}),
    "ecar-full": ("ecar-fmnist", {"stages.full_window": True}),
}
# one richer than the default 10 + 10 + 10 (does E-CAR gain from more steps, as a DiT does?), three cheaper
ECAR_SCHEDULES = ((20, 20, 20), (6, 4, 2), (4, 4, 4), (2, 2, 2))


@dataclass(frozen=True)
class Variant:
    """One row of the table: a trained model sampled with a schedule (and a sampling seed)."""

    name: str
    model: str
    overrides: tuple[str, ...] = ()
    sample: bool = True  # False: FLOPs and latency only (no samples, no FID)


def steps_variant(model: str, steps: tuple[int, ...], name: str = "") -> Variant:
    label = "-".join(map(str, steps))
    return Variant(name or f"{model}@{label}", model, (f"flow.steps_per_stage={list(steps)}",))


def seed_variant(variant: Variant) -> Variant:
    return Variant(
        f"{variant.name}/seed{SEED_ROW_SEED}", variant.model, (*variant.overrides, f"sampling.seed={SEED_ROW_SEED}")
    )


def all_variants(dit_steps: tuple[int, ...], dit_matched_steps: int, dit_250: bool = False) -> list[Variant]:
    full = dit_steps[0] > 4  # not the smoke test
    ecar = [Variant("ecar", "ecar"), *(steps_variant("ecar", s) for s in ECAR_SCHEDULES if full)]
    others = [Variant("ecar-full", "ecar-full"), Variant("ecar-clean", "ecar-clean")]
    dits = [
        steps_variant("dit", (steps,), f"dit@{steps}")
        for steps in sorted({*dit_steps, dit_matched_steps}, reverse=True)
    ]
    if full:
        dits.insert(0, Variant("dit@250", "dit", ("flow.steps_per_stage=[250]",), sample=dit_250))
    return [*ecar, *others, *dits]


@dataclass(frozen=True)
class Paths:
    """Everything of one experiment under one work root."""

    root: str
    manifest: str  # the latent data set (its manifest.json's prefix)
    tokenizer: str

    @classmethod
    def under(cls, root: str, manifest: str | None = None, tokenizer: str | None = None) -> Paths:
        """The experiment at `root`, on its own latents and tokenizer unless others are given."""
        manifest = (manifest or storage.join(root, "latents")).removesuffix("/manifest.json")
        return cls(root, manifest, tokenizer or storage.join(root, "tokenizer"))

    @property
    def images(self) -> str:
        return storage.join(self.root, "images")

    def export(self, model: str) -> str:
        from ecar.train.trainer import export_uri

        return export_uri(get_config("ecar-fmnist", {"storage.root": self.root}), model)

    def samples(self, variant: str) -> str:
        return storage.join(self.root, "samples", variant.replace("/", "-"))

    def metrics(self, variant: str) -> str:
        return storage.join(self.root, "metrics", f"{variant.replace('/', '-')}.json")

    def read_metrics(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The metrics of every name that has been scored, by name (the others left out)."""
        return {
            name: json.loads(storage.read_text(self.metrics(name)))
            for name in names
            if storage.exists(self.metrics(name))
        }

    def scored_rows(self) -> dict[str, dict[str, Any]]:
        """Every scored row under the root (the headline's, the ablations' and the diversity
        study's), by variant name."""
        files = storage.list_files(storage.join(self.root, "metrics"), ".json")
        rows = [json.loads(storage.read_text(file)) for file in files]
        return {row["variant"]: row for row in rows if "fid" in row}


def results_dir(root: str, given: Path | None) -> Path:
    """Where a study on the headline's models reports: `given`, else benchmarks/results for the
    real run (outputs/headline), else ROOT/results (a trial run never overwrites the results)."""
    return given or (RESULTS if Path(root) == Path("outputs/headline") else Path(root) / "results")


def report_header(what: str, row: dict[str, Any]) -> dict[str, Any]:
    """What every report on these models starts with, from one of its scored rows."""
    return {
        "what": what,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **{key: row[key] for key in ("samples", "reference_images", "train_steps", "global_batch_size")},
    }


# ----- configs: one budget for every model ------------------------------------------------------
def budget(paths: Paths, scale: Scale) -> dict[str, Any]:
    """Settings shared by every model: the quickstart's budget at this scale, plus this
    experiment's data, tokenizer and storage."""
    return {
        **quickstart_budget(scale, paths.root),
        "data.manifest_uri": paths.manifest,
        "tokenizer.checkpoint_uri": paths.tokenizer,
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
    from ecar.train.tokenizer import train_tokenizer

    if storage.exists(storage.join(paths.manifest, "manifest.json"), config.storage):
        log.info("data: latents already at %s", paths.manifest)
        return
    prepare_images(config, paths.images, limit_per_split=scale.images_per_split)
    if not storage.exists(storage.join(paths.tokenizer, "tokenizer.json"), config.storage):
        train_tokenizer(config, paths.images, paths.tokenizer)
    encode_latents(config, paths.images, paths.manifest)


# ----- what is finished is reused only for what it was made of -----------------------------------
def check_export(config: Config, paths: Paths, model: str) -> None:
    """Refuse an export trained under other settings than `config` asks for now (a changed
    preset default or ablation would otherwise keep the old model, and the rows sampled from it)."""
    from ecar.export import read_config, read_metadata
    from ecar.train.preflight import training_changes

    export = paths.export(model)
    changes = training_changes(read_config(export), config)
    step = read_metadata(export)["step"]
    if step != config.train.steps:
        changes.append(f"train.steps: {step} -> {config.train.steps}")
    if changes:
        more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
        raise ValueError(
            f"train {model}: {export} was trained with another {changes[0]}{more}; delete "
            f"{storage.join(paths.root, 'runs', model)} and the samples and metrics of its rows to train it anew"
        )


def check_current(recorded: dict[str, Any], variant: Variant, paths: Paths, where: str) -> None:
    """Refuse samples or metrics (`recorded`, read from `where`) made from another export or
    schedule than the variant's now: a retrained model must not keep its old rows."""
    from ecar.export import read_metadata

    expected = {
        "checkpoint_sha256": read_metadata(paths.export(variant.model))["content_sha256"],
        "overrides": list(variant.overrides),
    }
    stale = [key for key, value in expected.items() if recorded.get(key) != value]
    if stale:
        raise ValueError(
            f"{variant.name}: {where} was made with another {' and '.join(stale)} than {variant.model}'s "
            f"current export and the row's overrides {list(variant.overrides)}; delete it to redo the row"
        )


def train_models(configs: dict[str, Config], models: list[str], paths: Paths, address: str | None) -> None:
    from jobs.train import train_job

    for model in models:
        if storage.exists(storage.join(paths.export(model), "export.json")):
            check_export(configs[model], paths, model)
            log.info("train %s: exported already at %s", model, paths.export(model))
            continue
        log.info("train %s: %d steps", model, configs[model].train.steps)
        result = train_job(configs[model], model, address)
        log.info("train %s: exported %s", model, result.export_uri)


def sample_variants(variants: list[Variant], paths: Paths, num_images: int, actors: int) -> None:
    from ecar.sampler import read_samples_manifest, sample_to_storage

    for variant in variants:
        out = paths.samples(variant.name)
        if not variant.sample:
            continue
        if storage.exists(storage.join(out, "manifest.json")):
            check_current(read_samples_manifest(out), variant, paths, out)
            continue
        log.info(
            "sample %s: %d images with %s", variant.name, num_images, list(variant.overrides) or "the default schedule"
        )
        sample_to_storage(
            paths.export(variant.model),
            out,
            num_images,
            overrides=list(variant.overrides),
            shard_size=max(16, min(250, num_images // 4)),
            batch_size=50,
            actors=actors,
            cpus_per_actor=1.0,
        )


def variant_config(variant: Variant, paths: Paths) -> Config:
    from ecar.export import read_config
    from ecar.sampler import sampling_config

    return sampling_config(read_config(paths.export(variant.model)), list(variant.overrides))


def evaluate_variants(variants: list[Variant], paths: Paths, num_images: int) -> None:
    """Per-variant metrics JSON: FID, precision/recall and classifier score against the first
    `num_images` test images, and FLOPs per image (latency is measured side by side later)."""
    from ecar.evaluation.evaluate import evaluate_samples, sampling_cost
    from ecar.export import read_metadata
    from ecar.sampler import read_samples_manifest

    for variant in variants:
        target = paths.metrics(variant.name)
        if storage.exists(target):
            check_current(json.loads(storage.read_text(target)), variant, paths, target)
            continue
        config, metadata = variant_config(variant, paths), read_metadata(paths.export(variant.model))
        if variant.sample:
            samples = paths.samples(variant.name)
            check_current(read_samples_manifest(samples), variant, paths, samples)
            metrics = evaluate_samples(samples, paths.manifest, "test", num_images, ())
            metrics.update({"samples": num_images, "reference_images": metrics["real_images"]})
        else:
            metrics = {
                **sampling_cost(config),
                "steps_per_stage": list(config.flow.steps_per_stage),
                "cfg_scale": config.sampling.cfg_scale,
            }
        metrics.update(
            {
                "variant": variant.name,
                "model": variant.model,
                "preset": config.preset,
                "overrides": list(variant.overrides),
                "checkpoint_sha256": metadata["content_sha256"],
                "params": parameter_count(config),
                "train_steps": metadata["step"],
                "global_batch_size": config.train.global_batch_size,
            }
        )
        storage.write_text_atomic(target, json.dumps(metrics, indent=2))
        log.info(
            "evaluate %s: FID %s, %.3f GFLOPs/image",
            variant.name,
            f"{metrics['fid']:.2f}" if "fid" in metrics else "-",
            metrics["sampling_gflops"],
        )


def best_dit(variants: list[Variant], paths: Paths) -> Variant | None:
    dits = {v.name: v for v in variants if v.model == "dit" and v.sample}
    scored = paths.read_metrics(dits)
    return dits[min(scored, key=lambda name: scored[name]["fid"])] if scored else None


def seed_rows(variants: list[Variant], paths: Paths, num_images: int, actors: int) -> None:
    """Second-seed samples of E-CAR's default and the best flow-DiT row, evaluated like the others,
    plus the FID between the two seeds' sample sets."""
    from ecar.evaluation.evaluate import images_to_unit, sample_features
    from ecar.evaluation.fid import feature_statistics, frechet_distance
    from ecar.sampler import read_samples, read_samples_manifest

    chosen = [v for v in (next((v for v in variants if v.name == "ecar"), None), best_dit(variants, paths)) if v]
    seeds = [seed_variant(v) for v in chosen]
    from ecar.runtime import init_ray

    init_ray(None)
    sample_variants(seeds, paths, num_images, actors)
    import ray

    ray.shutdown()
    evaluate_variants(seeds, paths, num_images)
    for first, second in zip(chosen, seeds):
        target = paths.metrics(f"{first.name}/between-seeds")
        if storage.exists(target):
            check_current(json.loads(storage.read_text(target)), first, paths, target)
            continue
        features = [
            sample_features(
                paths.samples(v.name), images_to_unit(read_samples(paths.samples(v.name), "images")["images"])
            )
            for v in (first, second)
        ]
        fid = frechet_distance(*feature_statistics(features[0]), *feature_statistics(features[1]))
        identity = {
            "checkpoint_sha256": read_samples_manifest(paths.samples(first.name))["checkpoint_sha256"],
            "overrides": list(first.overrides),
        }
        row = {"variant": first.name, "fid_between_seeds": fid, "samples": num_images, **identity}
        storage.write_text_atomic(target, json.dumps(row, indent=2))
        log.info("seed noise %s: FID between seeds %.2f", first.name, fid)


def floors(paths: Paths, num_images: int, config: Config) -> None:
    """FID (with P/R and classifier score) of N real train images, and of the tokenizer's
    reconstructions of those images, against the N test images every row is judged by."""
    import torch

    from ecar.data.prepare import read_image_split
    from ecar.evaluation.classifier import classifier_probabilities
    from ecar.evaluation.evaluate import (
        classifier_metrics,
        device_name,
        quality_metrics,
        reference_features,
        reference_probabilities,
    )
    from ecar.evaluation.fid import inception_features
    from ecar.tokenizer import load_tokenizer
    from ecar.tokenizer.vae import reconstruct

    real = reference_features(paths.manifest, "test", num_images, config)
    real_probabilities = reference_probabilities(paths.manifest, "test", num_images, config)
    target = paths.metrics("floor-real-train")
    if not storage.exists(target):
        metrics = quality_metrics(real, reference_features(paths.manifest, "train", num_images, config))
        metrics.update(
            classifier_metrics(real_probabilities, reference_probabilities(paths.manifest, "train", num_images, config))
        )
        storage.write_text_atomic(target, json.dumps({"variant": "floor-real-train", **metrics}, indent=2))
        log.info("floor: real train vs test FID %.2f", metrics["fid"])
    target = paths.metrics("floor-tokenizer")
    if not storage.exists(target):
        tokenizer = load_tokenizer(config.override({"tokenizer.checkpoint_uri": paths.tokenizer})).model.eval()
        with torch.no_grad():
            images = reconstruct(tokenizer, read_image_split(paths.images, "train", num_images, config))
        metrics = quality_metrics(real, inception_features(images, device=device_name()))
        metrics.update(classifier_metrics(real_probabilities, classifier_probabilities(images, device=device_name())))
        storage.write_text_atomic(target, json.dumps({"variant": "floor-tokenizer", **metrics}, indent=2))
        log.info("floor: tokenizer reconstructions vs test FID %.2f", metrics["fid"])


def measure_latency(variants: list[Variant], paths: Paths, batches: tuple[int, ...], repeats: int = 3) -> None:
    """CPU seconds per image of generate() for every variant, side by side: the variants take
    turns within each repeat (A B C, A B C, ...), so a load change on the machine hits all of
    them; the median of the repeats is written into each variant's metrics."""
    import statistics

    import torch

    from ecar.export import load_exported

    pending = [
        v
        for v in variants
        if storage.exists(paths.metrics(v.name))
        and "latency_s_per_image_b1" not in json.loads(storage.read_text(paths.metrics(v.name)))
    ]
    if not pending:
        return
    models = {m: load_exported(paths.export(m), "cpu").model for m in {v.model for v in pending}}
    configs = {v.name: variant_config(v, paths) for v in pending}
    times: dict[tuple[str, int], list[float]] = {}
    with torch.no_grad():
        for variant in pending:  # warm-up
            config = configs[variant.name]
            models[variant.model].generate(
                torch.zeros(1, dtype=torch.long), config.sampling, steps_per_stage=config.flow.steps_per_stage
            )
        for repeat in range(repeats):
            for batch in batches:
                labels = torch.arange(batch) % 10
                for variant in pending:
                    config = configs[variant.name]
                    generator = torch.Generator().manual_seed(repeat)
                    started = time.perf_counter()
                    models[variant.model].generate(labels, config.sampling, generator, config.flow.steps_per_stage)
                    times.setdefault((variant.name, batch), []).append((time.perf_counter() - started) / batch)
            log.info("latency: repeat %d/%d done", repeat + 1, repeats)
    for variant in pending:
        metrics = json.loads(storage.read_text(paths.metrics(variant.name)))
        for batch in batches:
            metrics[f"latency_s_per_image_b{batch}"] = statistics.median(times[(variant.name, batch)])
        metrics["latency_repeats"] = repeats
        storage.write_text_atomic(paths.metrics(variant.name), json.dumps(metrics, indent=2))


# ----- report -----------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.is_available(),
    }


def latency_ratios(slow: dict[str, Any], fast: dict[str, Any]) -> dict[str, float]:
    keys = [k for k in fast if k.startswith("latency_s_per_image_b") and k in slow]
    return {k.removeprefix("latency_s_per_image_"): slow[k] / fast[k] for k in keys}


def seed_noise(rows: dict[str, dict[str, Any]], noise: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Two measures per model sampled twice: the spread of its FID against the test images
    between the seeds (the noise of any row's FID, used to call ties), and the FID between the
    two seeds' sample sets (the floor of FID between identical distributions at this N)."""
    out: dict[str, Any] = {}
    for name, row in rows.items():
        second = rows.get(f"{name}/seed{SEED_ROW_SEED}")
        if second is None or "fid" not in row:
            continue
        out[name] = {
            "fid_seed0": row["fid"],
            f"fid_seed{SEED_ROW_SEED}": second["fid"],
            "fid_spread": abs(row["fid"] - second["fid"]),
            "fid_between_seeds": noise.get(name, {}).get("fid_between_seeds"),
        }
    out["tie_threshold"] = max((v["fid_spread"] for v in out.values()), default=0.0)
    return out


def verdict(a: float, b: float, threshold: float) -> str:
    """'better' / 'worse' / 'tie' for FID a against FID b."""
    if abs(a - b) <= threshold:
        return "tie"
    return "better" if a < b else "worse"


def comparisons(rows: dict[str, dict[str, Any]], threshold: float) -> dict[str, Any]:
    """E-CAR against every DiT setting; the issue's targets against the best-FID DiT setting; and
    at every FLOP budget where both curves have a point, whether E-CAR's is at or below."""
    ecar = rows.get("ecar")
    dits = {name: row for name, row in rows.items() if row["model"] == "dit" and "fid" in row and "/seed" not in name}
    if ecar is None or not dits:
        return {}
    versus = {
        name: {
            "fid_ratio": ecar["fid"] / row["fid"],
            "verdict": verdict(ecar["fid"], row["fid"], threshold),
            "flops_ratio": row["sampling_gflops"] / ecar["sampling_gflops"],
            "latency_ratio": latency_ratios(row, ecar),
        }
        for name, row in dits.items()
    }
    best = min(dits, key=lambda name: dits[name]["fid"])
    # the cost comparison is against the cheapest DiT setting that reaches E-CAR's FID (within the
    # seed noise); when none does, against the best one (a DiT would need still more)
    as_good = [name for name, row in dits.items() if row["fid"] <= ecar["fid"] + threshold]
    matched = min(as_good, key=lambda name: dits[name]["sampling_gflops"]) if as_good else None
    reference = matched or best
    target = versus[reference]
    targets = {
        "against": best,
        "cost_against": reference,
        "best_dit_fid": dits[best]["fid"],
        "ecar_fid": ecar["fid"],
        "fid_within_10pct": ecar["fid"] <= FID_TOLERANCE * dits[best]["fid"],
        "fid_verdict": versus[best]["verdict"],
        "flops_10x": target["flops_ratio"] >= FLOPS_TARGET,
        "flops_ratio": target["flops_ratio"],
        "latency_5x": {batch: ratio >= LATENCY_TARGET for batch, ratio in target["latency_ratio"].items()},
        "latency_ratio": target["latency_ratio"],
    }
    targets["met"] = (
        targets["fid_within_10pct"]
        and targets["flops_10x"]
        and bool(targets["latency_5x"])
        and all(targets["latency_5x"].values())
    )
    # the E-CAR curve (its schedules) against the DiT curve, by interpolating the
    # DiT's FID in log-FLOPs at each E-CAR point inside the DiT's FLOP range
    ecar_curve = sorted(
        (
            (r["sampling_gflops"], r["fid"], n)
            for n, r in rows.items()
            if r["model"] == "ecar" and "fid" in r and "/seed" not in n
        )
    )
    dit_curve = sorted((r["sampling_gflops"], r["fid"]) for r in dits.values())
    curve = []
    import math

    for gflops, fid, name in ecar_curve:
        for (x0, y0), (x1, y1) in zip(dit_curve, dit_curve[1:]):
            if x0 <= gflops <= x1:
                w = (math.log(gflops) - math.log(x0)) / (math.log(x1) - math.log(x0))
                dit_fid = y0 + w * (y1 - y0)
                curve.append(
                    {
                        "variant": name,
                        "gflops": gflops,
                        "ecar_fid": fid,
                        "dit_fid_interpolated": dit_fid,
                        "verdict": verdict(fid, dit_fid, threshold),
                    }
                )
    return {
        "ecar_vs": versus,
        "targets": targets,
        "curve": curve,
        "curve_at_or_below": all(point["verdict"] != "worse" for point in curve) if curve else None,
        "cheapest_dit_as_good_as_ecar": matched,
    }


COLUMNS = [
    ("variant", "{}"),
    ("steps_per_stage", "{}"),
    ("fid", "{:.2f}"),
    ("precision", "{:.3f}"),
    ("recall", "{:.3f}"),
    ("classifier_score", "{:.2f}"),
    ("sampling_gflops", "{:.2f}"),
    ("latency_s_per_image_b1", "{:.4f}"),
    ("latency_s_per_image_b16", "{:.4f}"),
    ("samples", "{}"),
]
FLOOR_NAMES = {"floor-real-train": "real train images", "floor-tokenizer": "tokenizer reconstructions of train images"}


def markdown_table(columns: list[tuple[str, str]], rows: Iterable[dict[str, Any]]) -> list[str]:
    """A Markdown table, one line a row: each column's value formatted, or "-" where it is missing."""
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[name]) if name in row else "-" for name, fmt in columns) + " |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    rows, compared, noise = result["variants"], result["comparisons"], result["seed_noise"]
    n = result["reference_images"]
    lines = [
        f"# Headline: E-CAR vs flow-DiT on Fashion-MNIST latents ({result['scale']} scale)",
        "",
        f"{result['date']}; every model trained {result['train_steps']} steps at batch "
        f"{result['global_batch_size']} with the same schedule and data; {result['samples']} samples per row "
        f"(class-balanced, the same (class, seed) rows for every row); FID, precision/recall (k = 3) and "
        f"classifier score against the first {n} test images (FID-{n}: biased upwards against FID-50k, compare "
        f"only within this table); CFG 1.5; latency on {result['machine']['cpus']} CPU cores, torch "
        f"{result['machine']['torch']}, rows measured side by side.",
        "",
        *markdown_table(COLUMNS, rows.values()),
    ]
    if result.get("not_measured"):
        lines += ["", f"**Not measured yet** (the run is under way): {', '.join(result['not_measured'])}."]
    lines += [
        "",
        f"Noise figures (N = {n} against the same test images):",
        "",
        "| reference | FID | precision | recall | classifier score |",
        "|---|---|---|---|---|",
    ]
    for name, label in FLOOR_NAMES.items():
        if name in result["floors"]:
            f = result["floors"][name]
            lines.append(
                f"| {label} (floor) | {f['fid']:.2f} | {f['precision']:.3f} | {f['recall']:.3f} | "
                f"{f['classifier_score']:.2f} |"
            )
    for name, value in noise.items():
        if name == "tie_threshold":
            continue
        between = value["fid_between_seeds"]
        lines.append(
            f"| {name}: seed 0 vs seed {SEED_ROW_SEED} | FID vs test {value['fid_seed0']:.2f} / "
            f"{value[f'fid_seed{SEED_ROW_SEED}']:.2f} (spread {value['fid_spread']:.2f}); FID between the "
            f"two seeds' samples {between:.2f} | | | |"
            if between is not None
            else f"| {name}: seed spread | {value['fid_spread']:.2f} | | | |"
        )
    lines += [
        "",
        f"FID differences of at most {noise.get('tie_threshold', 0.0):.2f} (the larger seed spread) are "
        "reported as ties.",
    ]
    if compared:
        lines += [
            "",
            "E-CAR (default schedule) against each flow-DiT setting (ratios > 1: E-CAR is cheaper):",
            "",
            "| flow-DiT setting | FID E-CAR / DiT | verdict | FLOPs DiT / E-CAR | latency DiT / E-CAR |",
            "|---|---|---|---|---|",
        ]
        for name, ratio in compared["ecar_vs"].items():
            latency = ", ".join(f"{b} {r:.1f}x" for b, r in ratio["latency_ratio"].items()) or "-"
            lines.append(
                f"| {name} | {ratio['fid_ratio']:.2f} | {ratio['verdict']} | {ratio['flops_ratio']:.1f}x | {latency} |"
            )
        t = compared["targets"]
        latency_met = (
            ", ".join(f"{b}: {r:.1f}x {'yes' if t['latency_5x'][b] else 'no'}" for b, r in t["latency_ratio"].items())
            or "not measured"
        )
        lines += [
            "",
            f"Targets against the best-FID flow-DiT setting ({t['against']}, FID {t['best_dit_fid']:.2f}):",
            f"- E-CAR FID {t['ecar_fid']:.2f} <= 1.10 x {t['best_dit_fid']:.2f}: "
            f"{'yes' if t['fid_within_10pct'] else 'no'} (verdict within the seed noise: {t['fid_verdict']})",
            f"- >= 10x fewer FLOPs than {t['cost_against']} (the cheapest flow-DiT setting reaching E-CAR's FID "
            f"within the noise, else the best): {t['flops_ratio']:.1f}x, {'yes' if t['flops_10x'] else 'no'}",
            f"- >= 5x lower latency than {t['cost_against']}: {latency_met}",
            f"- all met: {'yes' if t['met'] else 'no'}",
            f"- cheapest flow-DiT setting with FID <= E-CAR's (+ noise): "
            f"{compared['cheapest_dit_as_good_as_ecar'] or 'none'}",
        ]
        if compared["curve"]:
            lines += [
                "",
                "E-CAR's curve against the flow-DiT's at equal FLOPs (DiT FID interpolated in log FLOPs):",
                "",
                "| E-CAR row | GFLOPs | E-CAR FID | flow-DiT FID at these FLOPs | verdict |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {p['variant']} | {p['gflops']:.2f} | {p['ecar_fid']:.2f} | {p['dit_fid_interpolated']:.2f} | "
                f"{p['verdict']} |"
                for p in compared["curve"]
            ]
            lines.append(
                f"\nAt or below the flow-DiT curve at every shared budget: "
                f"{'yes' if compared['curve_at_or_below'] else 'no'}"
            )
    lines += budget_lines(result)
    return "\n".join(lines) + "\n"


CURVES = {
    "ecar": ("E-CAR (schedules)", "*-"),
    "ecar-full": ("E-CAR full window (FlowAR-like)", "s"),
    "ecar-clean": ("E-CAR, AR fed the clean estimate", "D"),
    "dit": ("flow-DiT (Euler steps)", "o-"),
}


def plot(rows: dict[str, dict[str, Any]], path: Path, reference_images: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for model, (label, style) in CURVES.items():
        points = sorted(
            (r["sampling_gflops"], r["fid"], r["steps_per_stage"])
            for n, r in rows.items()
            if r["model"] == model and "fid" in r and "/seed" not in n
        )
        if not points:
            continue
        axes.plot([p[0] for p in points], [p[1] for p in points], style, label=label, markersize=9)
        for gflops, fid, steps in points:
            axes.annotate(
                "+".join(map(str, steps)), (gflops, fid), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
    axes.set_xscale("log")
    axes.set_xlabel("GFLOPs per image (sampling, CFG 1.5)")
    axes.set_ylabel(f"FID-{reference_images} (lower is better)")
    axes.set_title("Fashion-MNIST latents: FID against sampling cost")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def grid(variants: list[Variant], paths: Paths, path: Path, per_class: int = 2) -> None:
    """The same (class, seed) rows from every sampled variant, one row per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ecar.sampler import read_samples

    shown = [
        v
        for v in variants
        if v.sample and "/seed" not in v.name and storage.exists(storage.join(paths.samples(v.name), "manifest.json"))
    ]
    if not shown:
        return
    columns = 10 * per_class
    figure, axes = plt.subplots(len(shown), 1, figsize=(columns * 0.5, len(shown) * 0.62))
    for axis, variant in zip(np.atleast_1d(axes), shown):
        images = read_samples(paths.samples(variant.name), "images")["images"][:columns]  # rows 0.. : classes 0-9, 0-9
        strip = np.concatenate(list(images[..., 0] if images.shape[-1] == 1 else images), axis=1)
        axis.imshow(strip, cmap="gray", vmin=0, vmax=255)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_ylabel(variant.name, rotation=0, ha="right", va="center", fontsize=7)
    figure.suptitle("The same (class, seed) rows from every model and schedule", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def loss_curves(paths: Paths, path: Path) -> dict[str, list[tuple[int, float]]]:
    """Held-out flow loss of every trained model by step, from its MLflow training run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    from ecar.export import read_config, read_metadata
    from ecar.tracking import resolve_tracking_uri

    curves: dict[str, list[tuple[int, float]]] = {}
    for model in MODELS:
        export = paths.export(model)
        if not storage.exists(storage.join(export, "export.json")):
            continue
        run_id = read_metadata(export).get("mlflow_run_id", "")
        client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(read_config(export)))
        # a step logged twice (a restart before the first checkpoint) counts as its last attempt
        latest = {
            m.step: m.value
            for m in sorted(client.get_metric_history(run_id, "val_loss") if run_id else [], key=lambda m: m.timestamp)
        }
        history = sorted(latest.items())
        if history:
            curves[model] = history
    if curves:
        figure, axes = plt.subplots(figsize=(6, 4))
        for model, history in curves.items():
            axes.plot([h[0] for h in history], [h[1] for h in history], "o-", markersize=3, label=model)
        axes.set_xlabel("training step")
        axes.set_ylabel("held-out flow loss (512 test latents, fixed noise)")
        axes.set_yscale("log")
        axes.set_title("Held-out loss during training (E-CAR: mean over stages)")
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
    return curves


def training_budget(paths: Paths) -> dict[str, Any]:
    """How every model was trained (read back from the E-CAR export: the budget is shared) and
    the worker-layout measurement it was chosen by (benchmarks/results/train.json)."""
    from ecar.data.manifest import read_manifest
    from ecar.export import read_config

    export = paths.export("ecar")
    if not storage.exists(storage.join(export, "export.json")):
        return {}
    train = read_config(export).train
    train_rows = read_manifest(paths.manifest)["splits"]["train"]["rows"]
    measured = RESULTS / "train.json"
    layout = json.loads(measured.read_text()).get("threads", {}) if measured.exists() else {}
    return {
        "steps": train.steps,
        "train_latents": train_rows,
        "global_batch_size": train.global_batch_size,
        "workers": train.num_workers,
        "torch_threads": train.torch_threads,
        "zero_stage": train.zero_stage,
        "lr": train.lr,
        "min_lr": train.min_lr,
        "warmup_steps": train.warmup_steps,
        "ema_decay": train.ema_decay,
        "checkpoint_every": train.checkpoint_every,
        "eval_every": train.eval_every,
        "val_rows": train.val_rows,
        "seed": train.seed,
        "layout_measured": {
            "faster": layout.get("faster"),
            "speedup": layout.get("speedup"),
            "s_per_step": {row["setting"]: row["s_per_step_median"] for row in layout.get("rows", [])},
        },
    }


def budget_lines(result: dict[str, Any]) -> list[str]:
    """The sizing choices of the run and their reasons (issue 11, item 1)."""
    t = result.get("training")
    if not t:
        return []
    layout = t["layout_measured"]
    speeds = "; ".join(f"{name} {seconds:.2f} s/step" for name, seconds in layout["s_per_step"].items())
    curves = result.get("loss_curves", {})
    flattening = "; ".join(
        f"{model} {history[len(history) // 2][1]:.4f} at step {history[len(history) // 2][0]} -> "
        f"{history[-1][1]:.4f} at {history[-1][0]}"
        for model, history in curves.items()
        if len(history) >= 2
    )
    return [
        "",
        "## How the run was sized (2 CPU cores, no GPU)",
        "",
        f"- **Worker layout**: {t['workers']} DeepSpeed ZeRO-{t['zero_stage']} workers x {t['torch_threads']} torch "
        f"thread, measured through the real `ecar train` path at one global batch against 1 worker x 2 threads "
        f"({speeds}; {layout['faster']} is {layout['speedup']:.2f}x faster; `benchmarks/results/train.json`).",
        f"- **Budget, the same for every model**: {t['steps']} steps at global batch {t['global_batch_size']} "
        f"({t['steps'] * t['global_batch_size'] / t['train_latents']:.2g} epochs of the {t['train_latents']:,} "
        "training latents), AdamW lr "
        f"{t['lr']:g} with {t['warmup_steps']} warm-up steps and cosine decay to {t['min_lr']:g}, "
        f"EMA {t['ema_decay']}, seed {t['seed']}. The held-out loss ({t['val_rows']} test latents, fixed noise, "
        f"every {t['eval_every']} steps) between the middle and the end of training: {flattening} "
        "(`headline-loss.png`). More steps for four models did not fit ~5 hours of this machine.",
        f"- **Interruptions**: a checkpoint every {t['checkpoint_every']} steps; a re-run "
        "resumes each model from its latest checkpoint, skips exported models, finished sample shards and scored "
        "rows.",
        "- **Data order**: every model reads the same latents in the same global order (a seeded shuffle split "
        "into per-worker streams that keep the global batch order and the noise independent of the number of "
        "workers); no flip augmentation (Fashion-MNIST's garments are not mirror-symmetric by class).",
        f"- **Samples per FID**: {result['samples']} per row, class-balanced, the same (class, seed) rows for every "
        f"model, against the first {result['reference_images']} test images; the floors and seed rows use the "
        "same N.",
    ]


def between_seeds(paths: Paths, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The FID between the two sampling seeds' sample sets, by variant, where it was measured."""
    found = paths.read_metrics(f"{name}/between-seeds" for name in names)
    return {name.removesuffix("/between-seeds"): row for name, row in found.items()}


def report(variants: list[Variant], paths: Paths, scale_name: str, results: Path) -> dict[str, Any]:
    rows = paths.read_metrics([v.name for v in variants] + [f"{v.name}/seed{SEED_ROW_SEED}" for v in variants])
    if not rows:
        raise FileNotFoundError(f"no metrics under {storage.join(paths.root, 'metrics')}: run the evaluate part first")
    results.mkdir(parents=True, exist_ok=True)  # before the first figure goes into it
    noise = seed_noise(rows, between_seeds(paths, [v.name for v in variants]))
    result = {
        **report_header(
            "E-CAR vs flow-DiT of matched parameter count, same training budget, same sample rows",
            next(r for r in rows.values() if "fid" in r),
        ),
        "scale": scale_name,
        "root": paths.root,
        "manifest_uri": paths.manifest,
        "machine": machine(),
        "flop_convention": "multiply-add counted once (DiT's convention), counted by running generate()",
        "latency": "median seconds per image of generate() on this machine; rows take turns within each repeat",
        "variants": rows,
        # planned rows with no metrics yet (a report of a run still under way says what it lacks)
        "not_measured": [v.name for v in variants if v.name not in rows],
        "floors": paths.read_metrics(FLOOR_NAMES),
        "seed_noise": noise,
        "comparisons": comparisons(rows, noise["tie_threshold"]),
        "loss_curves": loss_curves(paths, results / "headline-loss.png"),
        "training": training_budget(paths),
    }
    (results / "headline.json").write_text(json.dumps(result, indent=2))
    (results / "headline.md").write_text(markdown(result))
    plot(rows, results / "headline.png", result["reference_images"])
    grid(variants, paths, results / "headline-grid.png")
    return result


def cost_matched_steps(configs: dict[str, Config]) -> int:
    """The flow-DiT step count whose sampling FLOPs are the closest to E-CAR's default schedule."""
    from ecar.evaluation.evaluate import sampling_cost

    ecar = sampling_cost(configs["ecar"])["sampling_gflops"]
    per_step = sampling_cost(configs["dit"].override({"flow.steps_per_stage": [1]}))["sampling_gflops"]
    return max(1, round(ecar / per_step))


# ----- command line -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--root", help="work root (default: outputs/headline, outputs/headline-tiny at --scale tiny)")
    parser.add_argument("--manifest", help="an existing latent data set to reuse (default: ROOT/latents)")
    parser.add_argument("--tokenizer", help="an existing tokenizer to reuse (default: ROOT/tokenizer)")
    parser.add_argument("--train-steps", type=int, help="training steps of every model (default: the scale's)")
    parser.add_argument("--samples", type=int, help="images per row, and reference images for FID")
    parser.add_argument("--dit-steps", type=int, nargs="+", help="flow-DiT Euler steps (default: 100 50 25 10)")
    parser.add_argument("--dit-250", action="store_true", help="also sample and score flow-DiT@250 (hours on CPU)")
    parser.add_argument("--dit-depth", type=int, help="DiT depth (default: the one matching E-CAR's parameters)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="only these models (training and rows)")
    parser.add_argument("--variants", nargs="+", help="only these rows (e.g. ecar dit@50; default: all)")
    parser.add_argument("--actors", type=int, default=2, help="sampling actors (1 CPU each)")
    parser.add_argument(
        "--results-dir", type=Path, help="report output (default: benchmarks/results, ROOT/results at --scale tiny)"
    )
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    args = parser.parse_args(argv)

    scale = dataclasses.replace(
        SCALES[args.scale],
        train_steps=args.train_steps or SCALES[args.scale].train_steps,
        samples=args.samples or SCALES[args.scale].samples,
    )
    dit_steps = tuple(args.dit_steps or DIT_STEPS[args.scale])
    root = args.root or ("outputs/headline" if args.scale == "full" else f"outputs/headline-{args.scale}")
    paths = Paths.under(root, args.manifest, args.tokenizer)
    results = args.results_dir or (RESULTS if args.scale == "full" else Path(root) / "results")
    started = time.perf_counter()
    try:
        configs = model_configs(paths, scale, args.dit_depth)
        variants = all_variants(dit_steps, cost_matched_steps(configs), args.dit_250)
        if args.variants:
            unknown = sorted(set(args.variants) - {v.name for v in variants})
            if unknown:
                parser.error(f"unknown variants {unknown}; available: {[v.name for v in variants]}")
            variants = [v for v in variants if v.name in args.variants]
        if args.models:
            variants = [v for v in variants if v.model in args.models]
        models = args.models or [m for m in MODELS if any(v.model == m for v in variants)]
        if {"data", "train", "sample"} & set(args.parts):
            from ecar.runtime import init_ray

            init_ray(args.address)
        if {"data", "train"} & set(args.parts):
            for name, config in configs.items():
                log.info("%-10s %s: %.2f M parameters", name, config.preset, parameter_count(config) / 1e6)
        if "data" in args.parts:
            prepare_data(configs["ecar"], paths, scale)
        if "train" in args.parts:
            train_models(configs, models, paths, args.address)
        if "sample" in args.parts:
            sample_variants(variants, paths, scale.samples, args.actors)
        if "evaluate" in args.parts:
            import ray

            ray.shutdown()  # latency is timed in this process: not next to an idle Ray cluster of ours
            evaluate_variants(variants, paths, scale.samples)
            floors(paths, scale.samples, configs["ecar"])
            seed_rows(variants, paths, scale.samples, args.actors)
            measure_latency(variants, paths, scale.latency_batches)
        if "report" in args.parts:
            result = report(variants, paths, args.scale, results)
            print((results / "headline.md").read_text())
            print(
                f"wrote {results}/headline.json, headline.md, headline.png, headline-grid.png, headline-loss.png "
                f"({result['samples']} samples and {result['reference_images']} reference images per FID)"
            )
    except USER_ERRORS as error:
        print(f"headline: {error}", file=sys.stderr)
        return 2
    log.info("headline: parts %s done in %.0f s", " ".join(args.parts), time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
