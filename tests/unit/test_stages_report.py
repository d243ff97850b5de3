"""The per-stage diagnostic's summary (benchmarks/stages.py): how much of the gap to the
tokenizer floor remains when only the last stage is generated."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import stages  # noqa: E402

pytestmark = pytest.mark.unit


def test_the_summary_gives_the_last_stages_share_of_the_gap_to_the_floor():
    row = {"precision": 0.5, "recall": 0.2, "classifier_score": 2.0}
    result = {
        "date": "today",
        "images": 500,
        "steps_per_stage": [10, 10, 10],
        "cfg_scale": 1.5,
        "rows": {
            "k=0": {"row": "k=0", "given": "none", "fid": 100.0, **row},
            "k=1": {"row": "k=1", "given": "4x4", "fid": 90.0, **row},
            "k=2": {"row": "k=2", "given": "4x4 + 8x8", "fid": 60.0, **row},
            "tokenizer": {"row": "tokenizer", "given": "-", "fid": 40.0, **row},
        },
    }
    text = stages.markdown(result)
    assert "| k=2 | 4x4 + 8x8 | 60.00 | 0.500 | 0.200 | 2.00 |" in text
    assert "reaches FID 60.00, against 100.00 when it generates every stage and 40.00" in text
    assert "the last stage alone keeps 33% of the gap to the floor." in text
