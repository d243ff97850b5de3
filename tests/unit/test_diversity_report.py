"""The diversity report's judgement (benchmarks/diversity.py): E-CAR against the flow-DiT
reference, and each sampling change against E-CAR's default under issue 17's bar."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import diversity  # noqa: E402

pytestmark = pytest.mark.unit


def row(fid: float, recall: float, spread: float) -> dict:
    return {"fid": fid, "recall": recall, "precision": 0.5, "within_class_spread": spread}


def test_a_change_meets_the_bar_only_with_the_dits_recall_and_the_defaults_fid():
    found = {
        "ecar": row(80.0, 0.13, 0.81),
        "ecar+more-recall": row(81.0, 0.22, 0.90),  # FID within the noise, recall above the DiT's
        "ecar+worse-fid": row(90.0, 0.25, 0.95),  # recall, but FID beyond the noise
        "ecar+noise": row(80.5, 0.14, 0.82),  # a recall change within its seed noise
        diversity.REFERENCE: row(56.0, 0.21, 0.80),
    }
    text = "\n".join(diversity.findings(found, threshold=1.5, recall_noise=0.015))
    assert "at least as varied as the flow-DiT's: spread 0.810 against 0.800" in text
    assert "Recall: E-CAR 0.130 against the flow-DiT's 0.210 (0.62x)" in text
    assert "ecar+noise: recall 0.140 (+0.010, within the seed noise)" in text
    assert "ecar+worse-fid: recall 0.250 (+0.120), FID 90.00 (+10.00)" in text
    assert text.endswith("FID within 1.50 of the default's): ecar+more-recall.")


def test_nothing_is_judged_without_both_references():
    assert diversity.findings({"ecar": row(80.0, 0.13, 0.81)}, threshold=1.0) == []
    lines = diversity.findings({"ecar": row(80.0, 0.13, 0.7), diversity.REFERENCE: row(56.0, 0.21, 0.8)}, 1.0)
    assert "less varied" in lines[2] and lines[-1].startswith("- Recall") and lines[-1].endswith("56.00.")
