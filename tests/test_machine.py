"""The usable cores: affinity capped by a container's cgroup CPU limit (v2 `cpu.max`, v1 CFS quota)."""

from __future__ import annotations

import os

import pytest

from tropd.machine import cgroup_cpu_limit, torch_threads, usable_cores


def affinity() -> int:
    return len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("cpu_max", "limit"),
    [("max 100000\n", None), ("150000 100000\n", 1.5), ("50000 100000", 0.5), ("garbage", None)],
)
def test_cgroup_v2_cpu_max(tmp_path, cpu_max, limit):
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert cgroup_cpu_limit(tmp_path) == limit


@pytest.mark.parametrize(("quota", "limit"), [("-1", None), ("200000", 2.0), ("25000", 0.25)])
def test_cgroup_v1_cfs_quota(tmp_path, quota, limit):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == limit


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path) is None
    assert usable_cores(tmp_path) == affinity()


def test_a_limit_caps_the_cores_and_rounds_up(tmp_path):
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cores(tmp_path) == 1  # half a core still gets one thread
    (tmp_path / "cpu.max").write_text(f"{100000 * (affinity() + 4)} 100000\n")
    assert usable_cores(tmp_path) == affinity()  # a limit above the affinity changes nothing


def test_torch_threads_share_the_cores_and_respect_a_configured_number():
    assert torch_threads(3) == 3
    assert torch_threads(share=10_000) == 1
    assert torch_threads(cap=1) == 1
    assert torch_threads() == min(usable_cores(), 8)
