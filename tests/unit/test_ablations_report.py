"""The ablation report's judgement (benchmarks/ablations.py): every row against E-CAR's default,
ties within the seed noise, and the best flow-DiT row as the reference."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ablations  # noqa: E402

pytestmark = pytest.mark.unit


def row(model: str, fid: float) -> dict:
    return {
        "model": model,
        "params": 9.5e6,
        "sampling_gflops": 6.0,
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
    "ecar-weights": row("ecar-weights", 80.5),
    "dit@50": row("dit", 56.0),
    "dit@10": row("dit", 60.0),
    "dit@50/seed1": row("dit", 55.0),
}


def test_rows_are_judged_against_ecars_default_with_ties_in_the_noise():
    lines = {line["row"]: line for line in ablations.table(ROWS, ["ecar-flow6", "ecar-weights"], threshold=1.0)}
    assert "verdict" not in lines["ecar"]
    assert lines["ecar-flow6"]["fid_vs_ecar"] == pytest.approx(-10.0) and lines["ecar-flow6"]["verdict"] == "better"
    assert lines["ecar-weights"]["verdict"] == "tie"
    assert lines["ecar-full"]["verdict"] == "worse"
    assert lines["ecar-flow6"]["change"] == ablations.ABLATIONS["ecar-flow6"][0]
    # the best flow-DiT row is the reference, never a second-seed row
    assert "dit@50" in lines and "dit@10" not in lines and "dit@50/seed1" not in lines
    assert lines["dit@50"]["verdict"] == "better"


def test_ablations_without_metrics_are_left_out_and_the_summary_names_the_winners():
    lines = ablations.table(ROWS, ["ecar-flow6", "ecar-weights", "ecar-additive"], threshold=1.0)
    assert "ecar-additive" not in {line["row"] for line in lines}
    summary = " ".join(ablations.summary_lines(lines, threshold=1.0))
    assert "beyond the noise: ecar-flow6;" in summary and "ties: ecar-weights." in summary
    assert "ecar-flow6 (70.00, -10.00)" in summary


def test_every_ablation_changes_the_preset_and_builds():
    import headline

    from ecar.presets import get_config

    default = get_config("ecar-fmnist")
    for name, (_, overrides) in ablations.ABLATIONS.items():
        config = get_config("ecar-fmnist", overrides)
        assert config != default, name
        assert headline.parameter_count(config) > 0, name  # the model builds with these settings
