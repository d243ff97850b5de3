"""The README's main job, end to end at reduced size (slow: minutes on 2 cores)."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_quickstart_runs_end_to_end_and_resumes(tmp_path):
    root = tmp_path / "quickstart"
    command = [sys.executable, "-m", "jobs.quickstart", "--storage", str(root), "--scale", "quick"]
    first = subprocess.run(command, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((root / "quickstart.json").read_text())
    assert summary["fid_images"] == 16 and summary["fid"] > 0
    assert summary["classifier_score"] >= 1.0 and summary["real_classifier_score"] >= 1.0
    assert (root / "samples.png").stat().st_size > 0
    assert (root / "runs" / "quickstart" / "export" / "export.json").exists()
    # a re-run finds every step done: it trains nothing new and samples nothing new
    second = subprocess.run(command, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 to do" in second.stderr
