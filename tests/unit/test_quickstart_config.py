"""The quickstart's precision follows the CPU: bf16 where it has native bf16 instructions."""

from __future__ import annotations

import jobs.quickstart as quickstart
from ecar.runtime import cpu_bf16_flags


def test_native_bf16_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert cpu_bf16_flags(str(cpuinfo)) == ["avx512_bf16"]
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert cpu_bf16_flags(str(cpuinfo)) == []
    assert cpu_bf16_flags(str(tmp_path / "absent")) == []


def test_the_quickstart_trains_in_bf16_only_on_a_cpu_that_computes_it_natively(monkeypatch):
    scale = quickstart.SCALES["default"]
    monkeypatch.setattr(quickstart, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    assert quickstart.quickstart_config("out", scale, []).train.precision == "bf16"
    assert quickstart.quickstart_config("out", scale, ["train.precision=fp32"]).train.precision == "fp32"
    monkeypatch.setattr(quickstart, "cpu_bf16_flags", lambda: [])
    assert quickstart.quickstart_config("out", scale, []).train.precision == "fp32"
