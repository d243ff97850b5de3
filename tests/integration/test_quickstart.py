"""The README's main job, end to end at reduced size (slow: minutes on 2 cores)."""

import json
import subprocess
import sys

import pytest

from ecar.data.prepare import read_image_split
from ecar.evaluation.classifier import classifier_probabilities, classifier_score
from ecar.evaluation.evaluate import images_to_unit
from ecar.sampler import read_samples
from jobs.quickstart import SCALES, quickstart_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_quickstart_runs_end_to_end_and_resumes(tmp_path):
    root = tmp_path / "quickstart"
    command = [sys.executable, "-m", "jobs.quickstart", "--storage", str(root), "--scale", "quick"]
    first = subprocess.run(command, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((root / "quickstart.json").read_text())
    assert summary["fid_images"] == 16 and summary["fid"] > 0
    # the scores are those of the samples written and of as many real test images
    samples = images_to_unit(read_samples(summary["samples_uri"], "images")["images"])
    real = read_image_split(str(root / "images"), "test", 16, quickstart_config(str(root), SCALES["quick"], []))
    assert summary["classifier_score"] == pytest.approx(
        classifier_score(classifier_probabilities(samples))[0], rel=1e-6
    )
    assert summary["real_classifier_score"] == pytest.approx(
        classifier_score(classifier_probabilities(real))[0], rel=1e-4
    )  # from a float32 cache
    assert (root / "samples.png").stat().st_size > 0
    assert (root / "runs" / "quickstart" / "export" / "export.json").exists()
    # a re-run finds every step done: it trains nothing new and samples nothing new
    second = subprocess.run(command, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 to do" in second.stderr
