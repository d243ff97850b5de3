"""benchmarks/gpu.py is run on a GPU machine whenever one is lent; this runs the same code at toy
size on CPU (`--tiny`) so that it cannot rot in between."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def test_gpu_benchmark_runs_end_to_end_at_toy_size(ray_cluster, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "gpu.json"
    assert module.main(["--tiny", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["tiny"] and result["peak_bf16_flops"] is None  # no MFU guessed for a CPU
    assert set(result["training"]) == {"ecar-debug", "dit-fmnist"}
    for figures in result["training"].values():
        assert figures["steps"] == 4 and figures["images_per_s"] > 0 and figures["mfu"] is None
        assert figures["step_s"] == pytest.approx(8 / figures["images_per_s"])
        assert len(figures["windows_images_per_s"]) == 2  # logged at steps 2 and 4
    from ecar.flops import count
    from ecar.presets import get_config

    forward = count(get_config("ecar-debug"), generation=False).forward  # the AR and the flow at every stage
    assert result["training"]["ecar-debug"]["train_flops_per_image"] == pytest.approx(6 * sum(forward.values()))
    assert set(result["sampling_s_per_image"]) == {"ecar", "dit@10", "dit@4"}
    for name, by_batch in result["sampling_s_per_image"].items():
        assert set(by_batch) == {"1", "2"} and all(value > 0 for value in by_batch.values()), name
    assert set(result["sampling_ratios_vs_ecar"]) == {"dit@10", "dit@4"}


def test_peak_table_matches_device_names():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.peak_flops("NVIDIA H200") == 989e12
    assert module.peak_flops("NVIDIA H100 PCIe") == 756e12  # the PCIe card, not the SXM figure
    assert module.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert module.peak_flops("Some Future Accelerator") is None
