"""Run a sweep from ecar/sweeps/definitions/ on Ray Tune: one MLflow parent run, a child run per trial, a report.

    python -m jobs.tune stages --manifest outputs/quickstart/latents --output outputs/sweeps \\
        --fid-images 500 --max-concurrent-trials 1 train.steps=300
    python -m jobs.tune steps --checkpoint outputs/quickstart/runs/quickstart/export --fid-images 500
    python -m jobs.tune stages --manifest outputs/quickstart/latents --fid-images 500 --alias champion
    python -m jobs.tune lr --smoke-test                  # ecar-debug, 2 trials, a few steps

Training sweeps (stages, windows, conditioning, lr) train one model per trial with ASHA early
stopping on the held-out flow loss; sampling sweeps (steps, guidance) score one checkpoint's
samples per schedule. Re-running with the same --name resumes the sweep. Every training trial's
export is a version of a registered model; --alias points an alias at the best trial's version.
"""

from __future__ import annotations

import argparse
import json
import sys

from ecar.config import USER_ERRORS


def build_parser() -> argparse.ArgumentParser:
    from ecar.sweeps import available_sweeps

    parser = argparse.ArgumentParser(
        prog="ecar tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep", help=f"a sweep in ecar/sweeps/definitions/ ({', '.join(available_sweeps())})")
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        help="2 trials of a few steps on the ecar-debug preset (synthetic latents if no --manifest)",
    )
    parser.add_argument(
        "--manifest", default="", help="training sweeps: the latent data set (default: data.manifest_uri)"
    )
    parser.add_argument(
        "--checkpoint",
        default="",
        help="sampling sweeps: an exported checkpoint (runs/NAME/export, or models:/NAME/VERSION, models:/NAME@ALIAS)",
    )
    parser.add_argument("--output", default="", help="storage root for runs and Tune state (default: storage.root)")
    parser.add_argument(
        "--name", default="", help="the sweep run's name; the same name resumes (default: SWEEP-TIMESTAMP)"
    )
    parser.add_argument("--num-samples", type=int, default=1, help="repeats of the grid / samples of random domains")
    parser.add_argument("--max-concurrent-trials", type=int, default=1)
    parser.add_argument(
        "--grace-period",
        type=int,
        default=0,
        help="ASHA: steps before a trial may be stopped (default: one evaluation interval)",
    )
    parser.add_argument("--reduction-factor", type=int, default=2, help="ASHA's reduction factor")
    parser.add_argument(
        "--fid-images",
        type=int,
        default=0,
        help="images per trial for FID (training sweeps: 0 = none; sampling sweeps: default 1000)",
    )
    parser.add_argument(
        "--latency-batches",
        type=int,
        nargs="*",
        default=[],
        help="sampling sweeps: also time generation at these batch sizes",
    )
    parser.add_argument("--report-dir", default="", help="where report.md/.csv/pareto.png go")
    parser.add_argument(
        "--alias",
        default="",
        help="training sweeps: point this alias (e.g. champion) at the model version of the trial best by the "
        "sweep's metric",
    )
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    parser.add_argument(
        "--tracking-uri", default="", help="MLflow tracking URI (default: the config's, else the embedded store)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every trial, e.g. train.steps=300")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ecar.sweeps import load_sweep
    from ecar.sweeps.runner import SweepOptions, run_sweep

    # intermixed: the overrides may follow options (`stages --fid-images 500 train.steps=200`)
    args = build_parser().parse_intermixed_args(argv)
    overrides = list(args.overrides) + ([f"storage.root={args.output}"] if args.output else [])
    for flag in ("num_samples", "max_concurrent_trials", "reduction_factor"):
        if getattr(args, flag) < 1:
            print(f"ecar tune: --{flag.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    try:
        sweep = load_sweep(args.sweep)
        options = SweepOptions(
            name=args.name,
            manifest_uri=args.manifest,
            checkpoint_uri=args.checkpoint,
            overrides=tuple(overrides),
            num_samples=args.num_samples,
            max_concurrent_trials=args.max_concurrent_trials,
            grace_period=args.grace_period,
            reduction_factor=args.reduction_factor,
            fid_images=args.fid_images,
            latency_batches=tuple(args.latency_batches),
            smoke_test=args.smoke_test,
            address=args.address,
            tracking_uri=args.tracking_uri,
            report_dir=args.report_dir,
            alias=args.alias,
        )
        result = run_sweep(sweep, options)
    except USER_ERRORS as error:
        print(f"ecar tune: {error}", file=sys.stderr)
        return 2
    print(result.report_markdown or "(no report: no trial logged the ranking metric)")
    summary = {
        "sweep_run": result.name,
        "parent_run_id": result.parent_run_id,
        "tracking_uri": result.tracking_uri,
        "experiment": result.experiment,
        "report": result.report_files,
        "trials": {s: sum(t["status"] == s for t in result.trials) for s in ("FINISHED", "KILLED", "FAILED")},
        "best_trial": result.best.get("trial_id"),
        "best_model": result.best.get("model_uri"),
        f"best_{sweep.metric}": result.best.get(sweep.metric),
    }
    print(json.dumps(summary, indent=2))
    return 1 if result.trials and all(t["status"] == "FAILED" for t in result.trials) else 0


if __name__ == "__main__":
    sys.exit(main())
