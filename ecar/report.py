"""Comparison reports read back from MLflow: a ranked table and a quality-vs-FLOPs Pareto plot.

A sweep's trials are child runs of one parent run (tag `mlflow.parentRunId`); an experiment's
runs are compared as they are. The report goes to files (Markdown, CSV, PNG), to the parent
run as artifacts when there is one, and to the terminal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ecar.tracking import MODEL_URI_TAG

QUALITY_DEFAULT = "val_loss"
FLOPS_DEFAULT = "sampling_gflops"


@dataclass(frozen=True)
class Report:
    table: pd.DataFrame  # ranked, best first
    pareto: pd.DataFrame  # the runs no other run beats on both quality and FLOPs
    markdown: str
    files: dict[str, Path]


def load_runs(tracking_uri: str, experiment: str, parent_run_id: str | None = None) -> pd.DataFrame:
    from ecar.tracking import search_runs

    query = f"tags.mlflow.parentRunId = '{parent_run_id}'" if parent_run_id else ""
    runs = search_runs(tracking_uri, experiment, query)
    if runs.empty:
        where = f"under parent run {parent_run_id}" if parent_run_id else f"in experiment {experiment!r}"
        raise ValueError(f"no runs {where}")
    return runs


def resolve_target(tracking_uri: str, target: str) -> tuple[str, str | None]:
    """(experiment name, parent run id or None) for `ecar report TARGET`: a sweep run's name
    (the parent run tagged ecar.sweep_run=TARGET), else an experiment's name."""
    from ecar.tracking import client, redact

    mlflow_client = client(tracking_uri)
    experiments = mlflow_client.search_experiments()
    if experiments:
        found = mlflow_client.search_runs(
            [e.experiment_id for e in experiments], filter_string=f"tags.`ecar.sweep_run` = '{target}'", max_results=1
        )
        if found:
            return mlflow_client.get_experiment(found[0].info.experiment_id).name, found[0].info.run_id
    if mlflow_client.get_experiment_by_name(target) is None:
        raise ValueError(f"{target!r} is neither a sweep run nor an experiment at {redact(tracking_uri)}")
    return target, None


def pareto_front(frame: pd.DataFrame, quality: str, flops: str, mode: str) -> pd.DataFrame:
    """Rows not dominated by another row that is at least as good on both and better on one."""
    sign = 1.0 if mode == "min" else -1.0
    points = frame[[quality, flops]].to_numpy(dtype=float)
    keep = []
    for i, (q, f) in enumerate(points):
        dominated = any(
            sign * q2 <= sign * q and f2 <= f and (sign * q2 < sign * q or f2 < f)
            for j, (q2, f2) in enumerate(points)
            if j != i
        )
        keep.append(not dominated)
    return frame[keep]


def build_report(
    runs: pd.DataFrame,
    output_dir: Path,
    quality: str = QUALITY_DEFAULT,
    mode: str = "min",
    flops: str = FLOPS_DEFAULT,
    title: str = "runs",
) -> Report:
    quality_column, flops_column = f"metrics.{quality}", f"metrics.{flops}"
    if quality_column not in runs:
        raise ValueError(
            f"no run logged the metric {quality!r} (have: "
            f"{', '.join(c[8:] for c in runs.columns if c.startswith('metrics.'))})"
        )
    params = [c for c in runs.columns if c.startswith("params.")]
    # only the parameters that differ between runs say what the sweep varied
    varied = [c for c in params if runs[c].nunique(dropna=False) > 1]
    columns = ["run_id", "tags.mlflow.runName", "status", quality_column]
    columns += [flops_column] if flops_column in runs else []
    # how far a sweep's trial got (ASHA stops some early); the model version its export became
    columns += [c for c in ("metrics.steps_trained", f"tags.{MODEL_URI_TAG}") if c in runs and c not in columns]
    table = runs[columns + varied].copy()
    table = table.sort_values(quality_column, ascending=mode == "min", na_position="last")
    table.insert(0, "rank", range(1, len(table) + 1))
    table.columns = [
        "model"
        if c == f"tags.{MODEL_URI_TAG}"
        else c.removeprefix("metrics.").removeprefix("params.").removeprefix("tags.mlflow.")
        for c in table.columns
    ]
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {"csv": output_dir / "report.csv", "markdown": output_dir / "report.md"}
    table.to_csv(files["csv"], index=False)
    markdown = (
        f"# {title}\n\nranked by `{quality}` ({mode})\n\n" + table.to_markdown(index=False, floatfmt=".4g") + "\n"
    )
    files["markdown"].write_text(markdown)
    pareto = pd.DataFrame()
    if flops in table and table[flops].notna().any():
        complete = table.dropna(subset=[quality, flops])
        pareto = pareto_front(complete, quality, flops, mode)
        files["plot"] = output_dir / "pareto.png"
        _plot(complete, pareto, quality, flops, files["plot"], title)
    return Report(table=table, pareto=pareto, markdown=markdown, files=files)


def _plot(frame: pd.DataFrame, pareto: pd.DataFrame, quality: str, flops: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    axes.scatter(frame[flops], frame[quality], color="0.6", label="runs")
    front = pareto.sort_values(flops)
    axes.plot(front[flops], front[quality], "o-", color="tab:red", label="Pareto front")
    for _, row in frame.iterrows():
        axes.annotate(str(row["runName"]), (row[flops], row[quality]), fontsize=6, alpha=0.8)
    if frame[flops].max() / max(frame[flops].min(), 1e-12) > 20 and not math.isclose(frame[flops].min(), 0):
        axes.set_xscale("log")
    axes.set_xlabel(f"{flops} (per image)")
    axes.set_ylabel(quality)
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def log_report(tracking_uri: str, parent_run_id: str, report: Report) -> None:
    """Attach the report files to the parent run, and show the ranked table as its description."""
    from ecar.tracking import client, set_tags

    mlflow_client = client(tracking_uri)
    for path in report.files.values():
        mlflow_client.log_artifact(parent_run_id, str(path), artifact_path="report")
    set_tags(tracking_uri, parent_run_id, {"mlflow.note.content": report.markdown})
