"""Facts about the machine a command runs on: how many cores it may really use, whether vLLM is installed."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU limit of this process's cgroup in cores (a container's `cpus:` / `resources.limits.cpu`), or None.

    cgroup v2 writes it as `cpu.max` = "QUOTA PERIOD" (or "max PERIOD" for no limit); v1 as
    `cpu.cfs_quota_us` (-1 for no limit) and `cpu.cfs_period_us`."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores(root: Path = CGROUP_ROOT) -> int:
    """The cores this process may run on: its affinity mask where the OS has one, capped by the cgroup CPU limit
    (rounded up: a limit of 1.5 cores still runs 2 threads usefully part of the time), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def torch_threads(configured: int | None = None, share: int = 1, cap: int = 8) -> int:
    """Torch threads for one of `share` processes on this machine: the configured number, else the usable cores
    (at most `cap`: beyond 8 threads the small matrices of a step gain nothing) divided among them, at least 1."""
    return configured or max(1, min(usable_cores(), cap) // share)


def vllm_available() -> bool:
    """Whether vLLM is installed here (found, not imported: importing it takes seconds)."""
    return importlib.util.find_spec("vllm") is not None
