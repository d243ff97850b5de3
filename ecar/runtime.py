"""Connecting a job to Ray: an existing cluster when an address is given, else a local one."""

from __future__ import annotations

import os
import sys


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """`ray job submit` sets RAY_ADDRESS, so a submitted job joins its cluster and never starts
    its own. With no address at all, a fresh single-node cluster is started on loopback."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address is None and "ray" not in sys.modules:
        # Keeps a laptop's one-node cluster on 127.0.0.1 (read when ray is imported).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.data import DataContext

    # ecar's own progress (ecar.progress) counts images and rows; Ray Data's bars would repeat
    # it, and in a non-interactive log they become a status block every few seconds
    DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    if address is None:
        # the dashboard (on loopback) is what lets Ray Train clean up after a dead controller
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False
        )
    else:
        ray.init(address=address)


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """This CPU's native bf16 instruction sets (`avx512_bf16`, `amx_bf16`), from /proc/cpuinfo;
    empty elsewhere. Without them bf16 matrix products are emulated and slower than fp32."""
    try:
        with open(cpuinfo) as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted({"avx512_bf16", "amx_bf16"} & set(flags))
