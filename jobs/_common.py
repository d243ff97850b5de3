"""What every data job's `main` shares: --preset and trailing key=value overrides, and one clear
line (exit code 2, no traceback) for a user's mistake."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ecar.config import USER_ERRORS, Config
from ecar.presets import get_config


def base_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ecar-fmnist", help="named preset (default: ecar-fmnist)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.shard_rows=1024")
    return parser


def run(
    prog: str,
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    work: Callable[[argparse.Namespace, Config], str],
) -> int:
    """Parse, build the config (validated before Ray starts), call `work`; print its summary line."""
    args = parser.parse_args(argv)
    try:
        config = get_config(args.preset, args.overrides)
        summary = work(args, config)
    except USER_ERRORS as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    print(summary)
    return 0


def log_to_mlflow(config: Config, job: str, input_uri: str, output_uri: str, metrics: dict[str, float]) -> str:
    """One MLflow run for a finished data job: the config sections the job reads as params, its
    figures as metrics, the input and output URIs as tags. Returns the run id."""
    import uuid

    from ecar.tracking import finish_run, log_metrics, open_run, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(config)
    tags = {"input_uri": input_uri, "output_uri": output_uri}
    run_id, _ = open_run(config, tracking_uri, f"{job}-{uuid.uuid4().hex[:8]}", job, tags=tags)
    log_metrics(tracking_uri, run_id, metrics)
    finish_run(tracking_uri, run_id)
    return run_id
