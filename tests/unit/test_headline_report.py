"""The headline report's judgement (benchmarks/headline.py): ties within the seed noise, the
issue's targets against the right flow-DiT setting, and E-CAR's curve against the DiT's."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import headline  # noqa: E402

pytestmark = pytest.mark.unit


def row(model: str, fid: float, gflops: float, latency: float) -> dict:
    return {
        "model": model,
        "fid": fid,
        "sampling_gflops": gflops,
        "latency_s_per_image_b1": latency,
        "latency_s_per_image_b16": latency / 2,
    }


ROWS = {
    "ecar": row("ecar", 30.0, 6.0, 0.2),
    "ecar@2-2-2": row("ecar", 36.0, 1.5, 0.05),
    "dit@100": row("dit", 28.0, 90.0, 2.0),
    "dit@50": row("dit", 29.0, 45.0, 1.0),
    "dit@25": row("dit", 31.0, 22.5, 0.5),
    "dit@10": row("dit", 40.0, 9.0, 0.2),
    "dit@3": row("dit", 80.0, 2.7, 0.06),
}


def test_costs_are_compared_with_the_cheapest_dit_that_reaches_ecars_fid():
    compared = headline.comparisons(ROWS, threshold=1.5)
    t = compared["targets"]
    assert t["against"] == "dit@100" and t["best_dit_fid"] == 28.0
    assert t["fid_within_10pct"]  # 30 <= 1.1 x 28
    assert t["fid_verdict"] == "worse"  # 2.0 apart, more than the 1.5 noise
    assert t["cost_against"] == "dit@25"  # 31 <= 30 + 1.5; dit@10 (40) does not reach it
    assert t["flops_ratio"] == pytest.approx(22.5 / 6.0)
    assert t["latency_ratio"] == {"b1": pytest.approx(2.5), "b16": pytest.approx(2.5)}
    assert not t["flops_10x"] and not t["met"]
    assert compared["cheapest_dit_as_good_as_ecar"] == "dit@25"


def test_when_no_dit_reaches_ecar_the_costs_are_against_the_best_dit():
    rows = {**ROWS, "ecar": row("ecar", 20.0, 6.0, 0.1)}
    t = headline.comparisons(rows, threshold=1.0)["targets"]
    assert t["cost_against"] == "dit@100" and t["fid_verdict"] == "better"
    assert t["flops_ratio"] == pytest.approx(15.0) and t["flops_10x"]
    assert t["latency_5x"] == {"b1": True, "b16": True} and t["met"]


def test_ecars_curve_is_judged_against_the_dit_fid_interpolated_in_log_flops():
    curve = {p["variant"]: p for p in headline.comparisons(ROWS, threshold=1.5)["curve"]}
    # 6 GFLOPs lies between dit@3 (2.7, 80) and dit@10 (9, 40)
    w = math.log(6.0 / 2.7) / math.log(9.0 / 2.7)
    assert curve["ecar"]["dit_fid_interpolated"] == pytest.approx(80 + w * (40 - 80))
    assert curve["ecar"]["verdict"] == "better"
    assert "ecar@2-2-2" not in curve  # 1.5 GFLOPs: below every DiT point, no comparison
    assert headline.comparisons(ROWS, threshold=1.5)["curve_at_or_below"] is True


def test_ties_within_the_noise():
    assert headline.verdict(30.0, 31.0, 1.0) == "tie"
    assert headline.verdict(30.0, 31.5, 1.0) == "better"
    assert headline.verdict(32.5, 31.0, 1.0) == "worse"
