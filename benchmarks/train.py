"""Training throughput and memory on CPU, through the real job (Ray Train + DeepSpeed + the
streaming latent reader + MLflow), written to benchmarks/results/train.json.

1. Throughput: `ecar-fmnist` (16x16x4 latents) at 1 and 2 workers (ZeRO-2, 0.5 CPU and one
   torch thread per worker, so Ray Data keeps a CPU): samples/s and tokens/s per worker and
   the share of step time spent waiting for the next batch (the target is < 5%).
2. Memory: `ecar-b` at 2 workers under ZeRO 0, 2 and 3: the model state each worker holds
   between steps (weights, AdamW moments, DeepSpeed's fp32 partitions, the EMA; counted tensor
   by tensor), against what ZeRO predicts for fp32 AdamW with an fp32 EMA (Rajbhandari et al.
   2020; Psi parameters, N workers): ZeRO-0 4Psi weights + 8Psi moments + 4Psi EMA = 16Psi;
   ZeRO-2 4Psi weights + (4Psi fp32 master + 8Psi moments)/N + 4Psi EMA; ZeRO-3 partitions
   everything, its fp32 partitions being the weights: 16Psi/N. Also each worker's peak
   resident memory during training steps (gradients and activations included, allocator
   slack too), which is what a machine must have.

3. Threads: at one global batch (64, as the headline experiment), 1 worker x 2 torch threads
   against 2 workers x 1 thread (ZeRO-2), on real latents when `--manifest` names them:
   seconds per optimizer step, measured alternately (A B A B) so load drifts hit both.
4. Tokenizer: the KL-VAE tokenizer's training (Ray Train DDP, batch 64, real Fashion-MNIST
   image shards) at 1 worker x 1 thread (the config's default), 1 worker x 2 threads and
   2 workers x 1 thread: seconds per step from the per-step loss timestamps in MLflow, runs
   alternating as above.
5. Precision: the quickstart's layout (2 ZeRO-2 workers x 1 thread, global batch 32) in fp32 and
   in bf16, alternating as above, with the CPU's native bf16 instruction sets.

    python benchmarks/train.py [throughput] [memory]     # both: ~10 minutes on 2 cores
    python benchmarks/train.py threads --manifest outputs/headline/latents
    python benchmarks/train.py precision --manifest outputs/headline/latents
    python benchmarks/train.py tokenizer                 # ~8 minutes
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # one-node cluster on loopback
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"
MIB = 2**20
MEMORY_NOTE = (
    "Model state is counted tensor by tensor and matches ZeRO's arithmetic. Peak RSS is a process "
    "high-water mark: its floor is the Python/torch/DeepSpeed/Ray baseline plus what the allocator kept "
    "after every rank built the whole model before DeepSpeed partitioned it (ecar does not build under "
    "deepspeed.zero.Init, which would skip the model's in-place initialisation of partitioned parameters), "
    "so at this size it does not show the ZeRO-3 saving; ZeRO-2 shows part of its saving."
)


def _metric_windows(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _fit(preset: str, overrides: list[str], manifest: str, root: Path, name: str, tracking: str):
    from jobs.train import resolve_config, train_job

    config = resolve_config(preset, overrides, manifest=manifest, output=str(root / "out"))
    started = time.perf_counter()
    result = train_job(config, name, tracking_uri=tracking)
    return config, result, time.perf_counter() - started


def throughput(manifest: str, root: Path, tracking: str, client) -> list[dict]:
    rows = []
    for workers in (1, 2):
        overrides = [
            f"train.num_workers={workers}",
            "train.cpus_per_worker=0.5",
            "train.zero_stage=2",
            "train.micro_batch_size=16",
            "train.global_batch_size=32",
            "train.steps=24",
            "train.log_every=4",
            "train.sample_every=1000",
            "train.checkpoint_every=1000",
            "data.shuffle_buffer_rows=256",
        ]
        config, result, seconds = _fit("ecar-fmnist", overrides, manifest, root, f"throughput-{workers}", tracking)
        run = result.mlflow_run_id
        # the first window holds the warm-up (first batches, allocator growth): left out
        samples = _metric_windows(client, run, "samples_per_s_per_worker")[1:]
        tokens = _metric_windows(client, run, "tokens_per_s_per_worker")[1:]
        wait = _metric_windows(client, run, "data_wait_fraction")[1:]
        rows.append(
            {
                "workers": workers,
                "preset": "ecar-fmnist",
                "zero_stage": 2,
                "micro_batch_size": 16,
                "accumulation_steps": 32 // (16 * workers),
                "steps": 24,
                "samples_per_s_per_worker": statistics.mean(samples),
                "tokens_per_s_per_worker": statistics.mean(tokens),
                "data_wait_fraction_mean": statistics.mean(wait),
                "data_wait_fraction_max": max(wait),
                "fit_wall_s": seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(root / "out" / "runs" / f"throughput-{workers}", ignore_errors=True)
    return rows


THREAD_SETTINGS = {  # name -> overrides; both ask Ray for 0.5 CPU per worker, leaving room for reads
    "1 worker x 2 threads": ["train.num_workers=1", "train.torch_threads=2", "train.micro_batch_size=64"],
    "2 workers x 1 thread": ["train.num_workers=2", "train.torch_threads=1", "train.micro_batch_size=32"],
}
# the quickstart's layout (2 ZeRO-2 workers x 1 thread, global batch 32) in fp32 and in bf16
PRECISION_SETTINGS = {
    name: ["train.num_workers=2", "train.torch_threads=1", "train.micro_batch_size=16", f"train.precision={name}"]
    for name in ("fp32", "bf16")
}


def alternate(
    settings: dict[str, list[str]],
    batch: int,
    manifest: str,
    root: Path,
    tracking: str,
    client,
    steps: int = 30,
    repeats: int = 2,
) -> dict:
    """Seconds per optimizer step of ecar-fmnist at global batch `batch` for each of `settings`
    (name -> overrides), the runs alternating (A B A B) so that load drifts hit every setting."""
    per_setting: dict[str, list[float]] = {name: [] for name in settings}
    for repeat in range(repeats):
        for index, (name, overrides) in enumerate(settings.items()):
            common = [
                "train.cpus_per_worker=0.5",
                "train.zero_stage=2",
                f"train.global_batch_size={batch}",
                f"train.steps={steps}",
                "train.log_every=5",
                "train.sample_every=100000",
                "train.checkpoint_every=100000",
                "train.val_rows=0",
            ]
            run_name = f"alternate-{index}-{repeat}"
            config, result, seconds = _fit("ecar-fmnist", common + overrides, manifest, root, run_name, tracking)
            workers = config.train.num_workers
            samples = _metric_windows(client, result.mlflow_run_id, "samples_per_s_per_worker")[1:]
            step_s = [config.train.global_batch_size / (rate * workers) for rate in samples]
            per_setting[name].extend(step_s)
            print(
                json.dumps(
                    {"setting": name, "repeat": repeat, "s_per_step": statistics.median(step_s), "fit_wall_s": seconds}
                ),
                flush=True,
            )
            shutil.rmtree(root / "out" / "runs" / run_name, ignore_errors=True)
    rows = [
        {
            "setting": name,
            "overrides": settings[name],
            "s_per_step_median": statistics.median(values),
            "s_per_step_min": min(values),
            "s_per_step_max": max(values),
            "windows": len(values),
        }
        for name, values in per_setting.items()
    ]
    fastest = min(rows, key=lambda row: row["s_per_step_median"])
    slowest = max(rows, key=lambda row: row["s_per_step_median"])
    return {
        "preset": "ecar-fmnist",
        "global_batch_size": batch,
        "zero_stage": 2,
        "steps_per_run": steps,
        "data": manifest,
        "rows": rows,
        "faster": fastest["setting"],
        "speedup": slowest["s_per_step_median"] / fastest["s_per_step_median"],
        "note": "5-step windows after the first (warm-up) of every run; runs alternate between settings",
    }


TOKENIZER_SETTINGS = {  # name -> overrides; 2 x 0.5 CPU leaves Ray Data a CPU, as training does
    "1 worker x 1 thread": ["tokenizer.num_workers=1", "tokenizer.cpus_per_worker=1.0", "tokenizer.torch_threads=0"],
    "1 worker x 2 threads": ["tokenizer.num_workers=1", "tokenizer.cpus_per_worker=1.0", "tokenizer.torch_threads=2"],
    "2 workers x 1 thread": ["tokenizer.num_workers=2", "tokenizer.cpus_per_worker=0.5", "tokenizer.torch_threads=1"],
}


def tokenizer(root: Path, tracking: str, client, steps: int = 40, repeats: int = 2) -> dict:
    """Seconds per step of the KL-VAE tokenizer's training for each TOKENIZER_SETTINGS entry, on
    4,000 real Fashion-MNIST training images (the quickstart's tokenizer at batch 64)."""
    from ecar.data.prepare import prepare_images
    from ecar.presets import get_config
    from ecar.train.tokenizer import train_tokenizer

    base = get_config("ecar-fmnist").override({"storage.root": str(root / "out")})
    images = str(root / "images")
    prepare_images(base, images, limit_per_split=4000)
    per_setting: dict[str, list[float]] = {name: [] for name in TOKENIZER_SETTINGS}
    for repeat in range(repeats):
        for index, (name, overrides) in enumerate(TOKENIZER_SETTINGS.items()):
            common = [f"tokenizer.steps={steps}", "tokenizer.eval_images=16", "tokenizer.fid_images=0"]
            config = base.override(common + overrides + [f"tokenizer.seed={repeat}"])  # a run of its own
            output = root / "out" / f"tokenizer-{index}-{repeat}"
            started = time.perf_counter()
            train_tokenizer(config, images, str(output), tracking_uri=tracking)
            seconds = time.perf_counter() - started
            run = client.search_runs(
                [client.get_experiment_by_name(config.tracking.experiment_name).experiment_id],
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )[0]
            stamps = [
                m.timestamp / 1000
                for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
            ]
            step_s = [b - a for a, b in zip(stamps[5:], stamps[6:])]  # after 5 warm-up steps
            per_setting[name].extend(step_s)
            print(
                json.dumps(
                    {"setting": name, "repeat": repeat, "s_per_step": statistics.median(step_s), "fit_wall_s": seconds}
                ),
                flush=True,
            )
            shutil.rmtree(output, ignore_errors=True)
    rows = [
        {
            "setting": name,
            "overrides": TOKENIZER_SETTINGS[name],
            "s_per_step_median": statistics.median(values),
            "s_per_step_p10": statistics.quantiles(values, n=10)[0],
            "s_per_step_p90": statistics.quantiles(values, n=10)[-1],
            "steps_timed": len(values),
        }
        for name, values in per_setting.items()
    ]
    fastest = min(rows, key=lambda row: row["s_per_step_median"])
    default = rows[0]
    return {
        "model": "ecar-fmnist's KL-VAE tokenizer",
        "batch_size": base.tokenizer.batch_size,
        "steps_per_run": steps,
        "images": "4,000 Fashion-MNIST training images (ecar prepare)",
        "rows": rows,
        "faster": fastest["setting"],
        "speedup_over_default": default["s_per_step_median"] / fastest["s_per_step_median"],
        "note": "step times from the per-step loss timestamps, the first 5 steps of every run left out; "
        "runs alternate between settings",
    }


def expected_model_state_mib(params: int, stage: int, workers: int) -> float:
    """MiB per worker held between steps (module docstring), by ZeRO stage."""
    psi, n = params, workers
    table = {0: 16 * psi, 2: 4 * psi + 12 * psi / n + 4 * psi, 3: 16 * psi / n}
    return table[stage] / MIB


def memory(manifest: str, root: Path, tracking: str, client) -> dict:
    from ecar.models import build_model
    from ecar.presets import get_config

    params = sum(p.numel() for p in build_model(get_config("ecar-b")).parameters())
    rows = []
    for stage in (0, 2, 3):
        overrides = [
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            f"train.zero_stage={stage}",
            "train.micro_batch_size=1",
            "train.global_batch_size=2",
            "train.steps=3",
            "train.log_every=1",
            "train.sample_every=1000",
            "train.checkpoint_every=1000",
            "train.use_gpu=false",
            "train.precision=fp32",
            "data.shuffle_buffer_rows=0",
        ]
        config, result, seconds = _fit("ecar-b", overrides, manifest, root, f"memory-zero{stage}", tracking)
        metrics = client.get_run(result.mlflow_run_id).data.metrics
        rows.append(
            {
                "zero_stage": stage,
                "model_state_mib_per_worker": metrics["model_state_mib_max_worker"],
                "expected_model_state_mib_per_worker": expected_model_state_mib(params, stage, 2),
                "peak_rss_during_steps_mib_max_worker": metrics["peak_rss_mib_max_worker"],
                "peak_rss_growth_over_imports_mib_max_worker": metrics["peak_rss_growth_mib_max_worker"],
                "fit_wall_s": seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(root / "out" / "runs" / f"memory-zero{stage}", ignore_errors=True)
    for row in rows:
        row["model_state_saving_vs_zero0_mib"] = (
            rows[0]["model_state_mib_per_worker"] - row["model_state_mib_per_worker"]
        )
        row["expected_saving_vs_zero0_mib"] = (
            rows[0]["expected_model_state_mib_per_worker"] - row["expected_model_state_mib_per_worker"]
        )
        row["peak_rss_saving_vs_zero0_mib"] = (
            rows[0]["peak_rss_during_steps_mib_max_worker"] - row["peak_rss_during_steps_mib_max_worker"]
        )
    return {"preset": "ecar-b", "parameters": params, "workers": 2, "micro_batch_size": 1, "rows": rows}


def main() -> int:
    import argparse

    import mlflow

    from ecar.runtime import cpu_bf16_flags, init_ray
    from ecar.train.synthetic import write_synthetic_latents

    root = Path(tempfile.mkdtemp(prefix="ecar-bench-train-"))
    try:
        tracking = f"sqlite:///{root / 'mlflow.db'}"
        client = mlflow.tracking.MlflowClient(tracking_uri=tracking)
        fmnist = write_synthetic_latents(str(root / "latents-fmnist"), rows=4096, shape=(4, 16, 16), shards=16)
        imagenet = write_synthetic_latents(str(root / "latents-b"), rows=64, shape=(16, 16, 16), shards=2)
        init_ray(num_cpus=2)
        started = time.perf_counter()
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument(
            "parts",
            nargs="*",
            choices=["throughput", "memory", "threads", "precision", "tokenizer"],
            help="what to (re-)measure; the others keep their recorded figures",
        )
        parser.add_argument("--manifest", help="real latents for threads and precision (default: synthetic)")
        args = parser.parse_args()
        parts = args.parts or ["throughput", "memory"]
        report = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        report.update(
            {
                "what": __doc__.split("\n\n")[0],
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "device": "cpu",
                    "note": "shared 2-core machine; other jobs may have been running",
                },
                "data": "synthetic latents in the encode job's Parquet layout on local disk, read by "
                "ecar.data.reader.latent_dataset through Ray Data",
            }
        )
        if "throughput" in parts:
            report["throughput"] = throughput(fmnist, root, tracking, client)
        if "threads" in parts:
            report["threads"] = alternate(THREAD_SETTINGS, 64, args.manifest or fmnist, root, tracking, client)
        if "precision" in parts:
            report["precision"] = alternate(PRECISION_SETTINGS, 32, args.manifest or fmnist, root, tracking, client)
            report["precision"]["cpu_flags"] = cpu_bf16_flags()
        if "tokenizer" in parts:
            report["tokenizer"] = tokenizer(root, tracking, client)
        if "memory" in parts:
            report["memory"] = memory(imagenet, root, tracking, client)
            report["memory"]["note"] = MEMORY_NOTE
        report["wall_s_of_" + "_and_".join(parts)] = time.perf_counter() - started
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {RESULTS}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
