"""effective_cpu_count: affinity mask and cgroup v1/v2 quotas, not os.cpu_count()."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_provider_safeproc import cpu


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_takes_the_tightest_limit_on_the_way_up(tmp_path):
    _write(tmp_path / "cpu.max", "max 100000\n")
    _write(tmp_path / "system.slice" / "cpu.max", "300000 100000\n")
    _write(tmp_path / "system.slice" / "task.scope" / "cpu.max", "max 100000\n")
    assert cpu._quota_from_cgroup_v2("/system.slice/task.scope", tmp_path) == 3.0


def test_cgroup_v2_unlimited_or_missing_is_none(tmp_path):
    _write(tmp_path / "a" / "cpu.max", "max 100000\n")
    assert cpu._quota_from_cgroup_v2("/a", tmp_path) is None
    assert cpu._quota_from_cgroup_v2("/nowhere", tmp_path / "empty") is None


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    _write(tmp_path / "cpu,cpuacct" / "docker" / "cpu.cfs_quota_us", "150000\n")
    _write(tmp_path / "cpu,cpuacct" / "docker" / "cpu.cfs_period_us", "100000\n")
    assert cpu._quota_from_cgroup_v1("/docker", tmp_path) == 1.5
    _write(tmp_path / "cpu" / "free" / "cpu.cfs_quota_us", "-1\n")
    _write(tmp_path / "cpu" / "free" / "cpu.cfs_period_us", "100000\n")
    assert cpu._quota_from_cgroup_v1("/free", tmp_path) is None


def test_cgroup_quota_combines_v1_and_v2(tmp_path, monkeypatch):
    _write(tmp_path / "task" / "cpu.max", "250000 100000\n")
    _write(tmp_path / "cpu" / "old" / "cpu.cfs_quota_us", "120000\n")
    _write(tmp_path / "cpu" / "old" / "cpu.cfs_period_us", "100000\n")
    monkeypatch.setattr(cpu, "_own_cgroup_paths", lambda: (["/task"], ["/old"]))
    assert cpu.cgroup_cpu_quota(tmp_path) == 1.2


def test_quota_rounds_up_and_never_goes_below_one(monkeypatch):
    monkeypatch.setattr(cpu, "_affinity_count", lambda: 8)
    monkeypatch.setattr(cpu, "cgroup_cpu_quota", lambda: 1.5)
    assert cpu.effective_cpu_count() == 2
    monkeypatch.setattr(cpu, "cgroup_cpu_quota", lambda: 0.1)
    assert cpu.effective_cpu_count() == 1
    monkeypatch.setattr(cpu, "cgroup_cpu_quota", lambda: None)
    assert cpu.effective_cpu_count() == 8


def test_real_count_is_within_affinity():
    count = cpu.effective_cpu_count()
    assert 1 <= count <= len(os.sched_getaffinity(0))
    quota = cpu.cgroup_cpu_quota()
    if quota is not None:
        assert count <= max(1, math.ceil(quota))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_affinity_mask_limits_the_count():
    """A process pinned to one CPU (``taskset``) sees one, whatever the host has."""
    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
        "from airflow_provider_safeproc.cpu import effective_cpu_count; print(effective_cpu_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
