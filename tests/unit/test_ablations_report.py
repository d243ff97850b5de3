"""The ablation report's judgement (benchmarks/ablations.py): every row against its baseline (E-CAR's
default unless the ablation names another), ties within the seed noise, and the best flow-DiT row
as the reference."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ablations  # noqa: E402

pytestmark = pytest.mark.unit


def row(model: str, fid: float, gflops: float = 6.0) -> dict:
    return {
        "model": model,
        "params": 9.5e6,
        "sampling_gflops": gflops,
        "steps_per_stage": [10, 10, 10],
        "fid": fid,
        "precision": 0.5,
        "recall": 0.2,
        "classifier_score": 2.5,
    }


ROWS = {
    "ecar": row("ecar", 80.0),
    "ecar/seed1": row("ecar", 81.0),
    "ecar-full": row("ecar-full", 90.0),
    "ecar-flow6": row("ecar-flow6", 70.0),
    "ecar-equal-weights": row("ecar-equal-weights", 80.5),
    "dit@50": row("dit", 56.0, 45.0),
    "dit@10": row("dit", 60.0, 9.0),
    "dit@50/seed1": row("dit", 55.0, 45.0),
}


def test_rows_are_judged_against_their_baseline_with_ties_in_the_noise():
    names = ["ecar-flow6", "ecar-equal-weights"]
    lines = {line["row"]: line for line in ablations.table(ROWS, names, threshold=1.0)}
    assert "verdict" not in lines["ecar"]
    assert lines["ecar-equal-weights"]["baseline"] == "ecar" and lines["ecar-equal-weights"]["verdict"] == "tie"
    # flow6 was trained before the default changed: it is judged against the model it differs from
    assert lines["ecar-flow6"]["baseline"] == "ecar-equal-weights"
    assert lines["ecar-flow6"]["fid_vs_baseline"] == pytest.approx(-10.5) and lines["ecar-flow6"]["verdict"] == "better"
    assert lines["ecar-full"]["verdict"] == "worse" and lines["ecar-full"]["baseline"] == "ecar"
    assert lines["ecar-flow6"]["change"] == ablations.ABLATIONS["ecar-flow6"].change
    # the best flow-DiT row is the reference, never a second-seed row
    assert "dit@50" in lines and "dit@10" not in lines and "dit@50/seed1" not in lines
    assert lines["dit@50"]["verdict"] == "better"


def test_ablations_without_metrics_are_left_out_and_the_summary_names_the_winners():
    lines = ablations.table(ROWS, ["ecar-flow6", "ecar-equal-weights", "ecar-additive"], threshold=1.0)
    assert "ecar-additive" not in {line["row"] for line in lines}
    summary = " ".join(ablations.summary_lines(lines, threshold=1.0))
    assert "beyond the noise: ecar-flow6;" in summary and "ties: ecar-equal-weights." in summary
    assert "ecar-flow6 (70.00, -10.50 against ecar-equal-weights)" in summary


def test_every_ablation_changes_its_baseline_and_builds():
    import headline

    from ecar.presets import get_config

    default = get_config("ecar-fmnist")
    for name, ablation in ablations.ABLATIONS.items():
        config = get_config("ecar-fmnist", ablation.overrides)
        assert config != default, name
        if ablation.baseline != "ecar":  # its baseline is itself an ablation of the default
            assert config != get_config("ecar-fmnist", ablations.ABLATIONS[ablation.baseline].overrides), name
        assert headline.parameter_count(config) > 0, name  # the model builds with these settings


def test_the_reports_read_the_scored_rows_from_a_work_root(tmp_path):
    """headline.report and ablations.report on a root that holds only metrics (no models or
    samples): the tables, the seed noise taken from the second-seed rows, the files written."""
    import json

    import headline

    from ecar import storage

    paths = headline.Paths(str(tmp_path / "root"), str(tmp_path / "root" / "latents"), "")
    scored = {
        **ROWS,
        "floor-real-train": row("real", 12.0),
        "ecar/between-seeds": {"variant": "ecar", "fid_between_seeds": 3.0},
    }
    for name, metrics in scored.items():
        extra = {"samples": 100, "reference_images": 100, "train_steps": 20, "global_batch_size": 8}
        storage.write_text_atomic(paths.metrics(name), json.dumps({"variant": name, **extra, **metrics}))
    variants = [headline.Variant(name, metrics["model"]) for name, metrics in ROWS.items() if "/" not in name]
    variants.append(headline.Variant("ecar-clean", "ecar-clean"))  # planned, not scored yet
    results = tmp_path / "results"

    result = headline.report(variants, paths, "full", results)
    assert result["seed_noise"]["tie_threshold"] == pytest.approx(1.0)  # ecar 80 vs 81, dit@50 56 vs 55
    assert result["seed_noise"]["ecar"]["fid_between_seeds"] == 3.0
    assert result["floors"]["floor-real-train"]["fid"] == 12.0
    assert result["samples"] == 100 and result["train_steps"] == 20
    text = (results / "headline.md").read_text()
    assert "| ecar-flow6 | [10, 10, 10] | 70.00 |" in text
    assert (
        result["not_measured"] == ["ecar-clean"] and "**Not measured yet** (the run is under way): ecar-clean." in text
    )
    assert (results / "headline.png").stat().st_size > 0

    ablation = ablations.report(paths, ["ecar-flow6", "ecar-equal-weights"], results)
    assert ablation["tie_threshold"] == pytest.approx(1.0)
    text = (results / "ablations.md").read_text()
    assert "| ecar-flow6 | " + ablations.ABLATIONS["ecar-flow6"].change + " | 9.50 | 6.00 | 70.00 |" in text
    assert (
        "| ecar-equal-weights | -10.50 | better |" in text
        and "| dit@50 | the best flow-DiT row (reference) | 9.50 | 45.00 |" in text
    )
    assert json.loads((results / "ablations.json").read_text())["rows"][0]["row"] == "ecar"
