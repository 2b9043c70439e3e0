"""The helper's side of case 4: what a dead worker's items started ends with it, at once.

Both engines' helpers (the native guardian, the billiard helper) give each new worker a cgroup
of its own where the pool has cgroups (:meth:`WorkerContainment.worker_group`), and call
:meth:`WorkerContainment.worker_died` once they reaped one.
"""

from __future__ import annotations

from airflow_provider_safeproc.containment.keeper import Kept
from airflow_provider_safeproc.containment.tags import end_what_a_worker_left


class WorkerContainment:
    """Per-worker cgroups and tags, for the helper that starts and reaps the workers."""

    def __init__(self, kept: Kept) -> None:
        self.cgroup = kept.cgroup
        self.token = kept.token
        self._emptied: list[str] = []  # dead workers' cgroups, to remove once empty

    def worker_group(self, name: str) -> str | None:
        """A cgroup for a worker about to start (it enters it before it runs anything), or None."""
        return self.cgroup.worker_group(name) if self.cgroup is not None else None

    def join(self, group: str | None, pid: int = 0) -> None:
        """Move ``pid`` (0: this process, a worker just forked) into its ``group``."""
        if group is not None and self.cgroup is not None:
            self.cgroup.join(group, pid)

    def worker_died(self, pid: int, group: str | None, live_workers: set[int]) -> None:
        """End what the worker ``pid`` left: every process in its cgroup, and every process
        carrying its tag (should it have failed to enter the cgroup). ``live_workers`` are
        never touched."""
        if group is not None and self.cgroup is not None and self.cgroup.kill(group):
            self._emptied.append(group)
        if self.token is not None:
            end_what_a_worker_left(pid, self.token, keep=live_workers)
        if self.cgroup is not None:  # removed once empty: a moment after the kill
            self._emptied = [g for g in self._emptied if not self.cgroup.remove_empty(g)]
