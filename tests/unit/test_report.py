"""The comparison report, read back from a real MLflow store (SQLite) by a separate client."""

import mlflow
import pandas as pd
import pytest

from ecar.report import build_report, load_runs, log_report, pareto_front

pytestmark = pytest.mark.unit


@pytest.fixture
def sweep_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("sweep-test", artifact_location=str(tmp_path / "artifacts"))
    trials = [("s2", 2, 0.30, 4.0), ("s3", 3, 0.25, 6.0), ("s4", 4, 0.28, 8.0), ("s5", 5, 0.40, 3.0)]
    with mlflow.start_run(experiment_id=experiment, run_name="parent") as parent:
        for name, stages, loss, gflops in trials:
            with mlflow.start_run(experiment_id=experiment, run_name=name, nested=True):
                mlflow.log_params({"stages.count": stages, "train.lr": 0.001})
                mlflow.log_metrics({"val_loss": loss, "sampling_gflops": gflops})
    yield uri, parent.info.run_id, tmp_path
    mlflow.set_tracking_uri(None)


def test_report_ranks_children_shows_varied_params_and_marks_the_pareto_front(sweep_store):
    uri, parent, tmp_path = sweep_store
    runs = load_runs(uri, "sweep-test", parent_run_id=parent)
    assert len(runs) == 4  # the parent itself is not a trial
    report = build_report(runs, tmp_path / "report", title="stages")
    assert list(report.table["runName"]) == ["s3", "s4", "s2", "s5"]
    assert "stages.count" in report.table and "train.lr" not in report.table  # only what varied
    assert set(report.pareto["runName"]) == {"s3", "s2", "s5"}  # s4 is beaten by s3 on both
    assert report.files["plot"].stat().st_size > 0
    assert "rank" in report.markdown.splitlines()[4] and "s3" in report.markdown
    log_report(uri, parent, report)
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parent, "report")}
    assert artifacts == {"report/report.csv", "report/report.md", "report/pareto.png"}


def test_missing_metric_and_missing_experiment_are_named(sweep_store):
    uri, parent, tmp_path = sweep_store
    runs = load_runs(uri, "sweep-test", parent_run_id=parent)
    with pytest.raises(ValueError, match="fid"):
        build_report(runs, tmp_path / "r", quality="fid")
    with pytest.raises(ValueError, match="no MLflow experiment named 'nope'"):
        load_runs(uri, "nope")


def test_pareto_front_for_maximised_quality():
    frame = pd.DataFrame({"q": [0.9, 0.8, 0.95], "f": [5.0, 1.0, 10.0]})
    assert list(pareto_front(frame, "q", "f", "max").index) == [0, 1, 2]
    frame = pd.DataFrame({"q": [0.9, 0.8], "f": [1.0, 2.0]})
    assert list(pareto_front(frame, "q", "f", "max").index) == [0]
