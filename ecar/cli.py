"""The `ecar` command: one subcommand per job, presets and dotted overrides everywhere.

Exit codes: 0 success, 1 the job failed, 2 a user error (bad preset, key, value or path),
reported in one line without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from ecar.config import USER_ERRORS, ConfigError

# Subcommands implemented as job modules (`jobs/NAME.py` with `main(argv) -> int`), so that the
# same code runs as `ecar NAME ...` and as `ray job submit -- python -m jobs.NAME ...`.
JOB_COMMANDS = {
    "prepare": ("jobs.prepare", "turn an image source into image shards on storage"),
    "train-tokenizer": ("jobs.train_tokenizer", "train the KL-VAE tokenizer on Ray Train"),
    "encode": ("jobs.encode", "encode image shards into latent shards plus a manifest (Ray Data)"),
    "sample": ("jobs.sample", "sample many images from an exported checkpoint into storage"),
    "evaluate": ("jobs.evaluate", "FID, precision/recall, FLOPs and latency of a sampling run"),
    "train": ("jobs.train", "train E-CAR or the flow-DiT on Ray Train + DeepSpeed from a latent data set"),
    "tune": ("jobs.tune", "run a named sweep on Ray Tune (ASHA, MLflow parent/child runs, report)"),
    "quickstart": ("jobs.quickstart", "the whole pipeline on Fashion-MNIST, end to end, on a local Ray cluster"),
}


def _flops(args: argparse.Namespace) -> int:
    from ecar.flops import count, format_report
    from ecar.presets import get_config

    report = count(get_config(args.preset, args.overrides), generation=not args.forward_only)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


def _presets(args: argparse.Namespace) -> int:
    from ecar.presets import PRESETS, get_config

    for name in sorted(PRESETS):
        model = get_config(name).model
        print(
            f"{name:<12} {model.kind:<5} width {model.width:<5} latent "
            f"{model.latent_channels}x{model.latent_size}x{model.latent_size}"
        )
    return 0


def _config(args: argparse.Namespace) -> int:
    from ecar.presets import get_config

    config = get_config(args.preset, args.overrides)
    print(config.to_json() if args.json else config.to_yaml(), end="")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ecar.config import Config
    from ecar.report import build_report, load_runs, log_report, resolve_target
    from ecar.tracking import resolve_tracking_uri

    tracking_uri = args.tracking_uri or resolve_tracking_uri(Config())
    experiment, parent = args.experiment, args.parent_run
    if args.target:
        experiment, parent = resolve_target(tracking_uri, args.target)
    if not experiment:
        raise ConfigError("name a sweep run or an experiment (ecar report NAME), or pass --experiment")
    runs = load_runs(tracking_uri, experiment, parent)
    report = build_report(
        runs, Path(args.output), args.metric, args.mode, args.flops_metric, title=args.target or parent or experiment
    )
    if parent:
        log_report(tracking_uri, parent, report)
    print(report.markdown)
    print("wrote " + ", ".join(str(path) for path in report.files.values()))
    return 0


def _alias(args: argparse.Namespace) -> int:
    from ecar.config import Config
    from ecar.tracking import resolve_tracking_uri, set_alias

    tracking_uri = args.tracking_uri or resolve_tracking_uri(Config())
    registered = set_alias(tracking_uri, args.model, args.alias)
    name = registered.model_uri.removeprefix("models:/").rsplit("/", 1)[0]
    print(
        f"models:/{name}@{args.alias} -> {registered.model_uri} "
        f"(training run {registered.run_id}, export {registered.export_uri})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecar",
        description="Train and sample E-CAR image generators on Ray.",
        epilog="example: ecar flops ecar-fmnist flow.steps_per_stage=[8,8,8]",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    flops = commands.add_parser(
        "flops",
        help="parameters and FLOPs of a preset (forward and one generated image)",
        description="Count parameters, FLOPs of one forward at batch 1, and FLOPs of generating one "
        "image, by running the real code under torch's FLOP counter (multiply-add = 1 FLOP).",
        epilog="example: ecar flops dit-xl-2 --json",
    )
    flops.add_argument("preset", help="preset name (ecar presets lists them)")
    flops.add_argument("overrides", nargs="*", help="dotted overrides, e.g. flow.steps_per_stage=[8,8,8]")
    flops.add_argument("--json", action="store_true", help="print the report as JSON")
    flops.add_argument("--forward-only", action="store_true", help="count one forward pass only, not the sampling loop")
    flops.set_defaults(run=_flops)

    presets = commands.add_parser("presets", help="list the named presets", epilog="example: ecar presets")
    presets.set_defaults(run=_presets)

    config = commands.add_parser(
        "config",
        help="print a preset's full config with overrides applied",
        epilog="example: ecar config ecar-fmnist train.lr=1e-4 --json",
    )
    config.add_argument("preset")
    config.add_argument("overrides", nargs="*")
    config.add_argument("--json", action="store_true")
    config.set_defaults(run=_config)

    report = commands.add_parser(
        "report",
        help="rank a sweep's or an experiment's runs from MLflow; Pareto plot vs FLOPs",
        description="Read runs back from MLflow (search_runs) and write a ranked table (Markdown, CSV) and a "
        "Pareto plot of quality against sampling FLOPs; a sweep's report is also logged to its "
        "parent run.",
        epilog="example: ecar report stages-20261129-061500 --metric fid\n"
        "         ecar report --experiment ecar --metric fid",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("target", nargs="?", help="a sweep run's name (ecar tune --name) or an experiment's name")
    report.add_argument("--experiment", help="MLflow experiment name (instead of TARGET)")
    report.add_argument("--parent-run", help="with --experiment: a parent run id whose child runs are compared")
    report.add_argument(
        "--tracking-uri",
        help="default: tracking.tracking_uri, MLFLOW_TRACKING_URI, else the embedded store outputs/mlflow.db",
    )
    report.add_argument("--metric", default="val_loss", help="the quality metric to rank by")
    report.add_argument("--mode", choices=["min", "max"], default="min")
    report.add_argument("--flops-metric", default="sampling_gflops")
    report.add_argument("--output", default="outputs/report", help="folder for report.md/.csv/pareto.png")
    report.set_defaults(run=_report)

    alias = commands.add_parser(
        "alias",
        help="point an alias of a registered model (e.g. champion) at one of its versions",
        description="Every training run's export is a version of a registered model (tracking.registered_model, "
        "default: the preset's name). Point an alias at a version; `ecar sample --checkpoint "
        "models:/NAME@ALIAS` then samples it.",
        epilog="example: ecar alias models:/ecar-fmnist/3 champion\n"
        "         ecar alias models:/ecar-fmnist@candidate champion   # champion -> candidate's version",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    alias.add_argument("model", help="models:/NAME/VERSION, or models:/NAME@OTHER_ALIAS for that alias's version")
    alias.add_argument("alias", help="the alias to set, e.g. champion")
    alias.add_argument(
        "--tracking-uri",
        help="default: MLFLOW_TRACKING_URI, else the embedded store outputs/mlflow.db",
    )
    alias.set_defaults(run=_alias)

    for name, (module, summary) in JOB_COMMANDS.items():
        job = commands.add_parser(name, help=summary, add_help=False, prefix_chars="\0")
        job.add_argument("arguments", nargs=argparse.REMAINDER)
        job.set_defaults(job_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "job_module"):
            return importlib.import_module(args.job_module).main(args.arguments)
        return args.run(args)
    except USER_ERRORS as error:
        print(f"ecar {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
