"""How many CPUs this process may really use.

``os.cpu_count()`` reports the host's CPUs. In a container or a Celery worker pinned with
``taskset`` the process gets fewer: sizing a pool by the host count oversubscribes the
quota and makes every worker slower. We take the smallest of the CPU affinity mask and the
cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``) quota, rounded up, never below 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _affinity_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _own_cgroup_paths() -> tuple[list[str], list[str]]:
    """(v2 paths, v1 cpu-controller paths) of this process, from /proc/self/cgroup."""
    v2: list[str] = []
    v1: list[str] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, controllers, path = parts
        if controllers == "":
            v2.append(path)
        elif "cpu" in controllers.split(","):
            v1.append(path)
    return v2, v1


def _quota_from_cgroup_v2(path: str, root: Path) -> float | None:
    best: float | None = None
    # The effective limit is the tightest one on the way up to the root.
    current = Path(path)
    while True:
        candidate = root / str(current).lstrip("/") / "cpu.max"
        try:
            quota, period = candidate.read_text().split()[:2]
            if quota != "max":
                value = int(quota) / int(period)
                best = value if best is None else min(best, value)
        except (OSError, ValueError):
            pass
        if current == current.parent:
            return best
        current = current.parent


def _quota_from_cgroup_v1(path: str, root: Path) -> float | None:
    for base in (root / "cpu,cpuacct", root / "cpu"):
        directory = base / path.lstrip("/")
        try:
            quota = int((directory / "cpu.cfs_quota_us").read_text())
            period = int((directory / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0:
            return quota / period
    return None


def cgroup_cpu_quota(root: Path = _CGROUP_ROOT) -> float | None:
    """The cgroup CPU quota in CPUs (``1.5``), or None when unlimited or unknown."""
    v2, v1 = _own_cgroup_paths()
    quotas = [q for q in (_quota_from_cgroup_v2(p, root) for p in v2) if q is not None]
    quotas += [q for q in (_quota_from_cgroup_v1(p, root) for p in v1) if q is not None]
    return min(quotas) if quotas else None


def effective_cpu_count() -> int:
    """CPUs this process may use: affinity mask and cgroup quota, at least 1."""
    count = _affinity_count()
    quota = cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)
