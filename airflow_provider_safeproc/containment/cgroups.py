"""cgroup v2 containment, where the task may create cgroups: airtight, and exact per worker.

A pool gets a cgroup beside the task's (a child of the task's own cgroup, named
``safeproc-<keeper pid>-<token>``), and in it one child cgroup per worker, which the worker
enters before it runs anything. The keeper moves the helper into the pool's cgroup while the
helper starts: not needed for containment, but the first move into a cgroup in a while waits
for a kernel-wide RCU grace period (10-20 ms), and paid there it delays no worker. No
controller is enabled in them, so the "no internal processes" rule never applies and nothing
about the host's resource limits changes: they are only a membership the kernel keeps, which
no ``setsid``, double fork, exec or cleared environment escapes. ``cgroup.kill`` (Linux 5.14+)
then ends a whole cgroup at once, race-free against forks.

Used where all of this holds, checked once per pool: a cgroup2 mount, the task's own cgroup
under it and writable (root, or a delegated subtree: systemd's ``Delegate=yes``), and
``cgroup.kill`` present. Containers usually mount ``/sys/fs/cgroup`` read-only: then
:meth:`PoolCgroup.create` returns None and tags do the per-worker part. Set
``SAFEPROC_CGROUPS=0`` to never use cgroups.
"""

from __future__ import annotations

import os
import select
import time

_DISABLE = "SAFEPROC_CGROUPS"
_PREFIX = "safeproc-"


def _own_cgroup_dir() -> str | None:
    """The directory of this process's cgroup v2, or None (no cgroup2 mount, or outside it)."""
    if os.environ.get(_DISABLE, "").lower() in ("0", "off", "false", "no"):
        return None
    try:
        with open("/proc/self/mountinfo") as f:
            mounts = f.read().splitlines()
        with open("/proc/self/cgroup") as f:
            own = next((line[3:] for line in f.read().splitlines() if line.startswith("0::")), None)
    except OSError:
        return None
    if own is None or ".." in own:
        return None
    for line in mounts:
        fields, _, fs = line.partition(" - ")
        parts = fields.split()
        if fs.split()[:1] == ["cgroup2"] and len(parts) > 4 and parts[3] == "/":
            path = os.path.join(parts[4], own.strip().lstrip("/"))
            return path if os.path.isdir(path) else None
    return None


def _write(path: str, text: str) -> bool:
    # os.write, not open().write(): a buffered file reports a refused write only at close.
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        os.write(fd, text.encode())
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def join_cgroup(group: str, pid: int = 0) -> bool:
    """Move ``pid`` (0: this process) into the cgroup at ``group``."""
    return _write(os.path.join(group, "cgroup.procs"), str(pid))


class PoolCgroup:
    """One pool's cgroup and its workers' child cgroups (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def create(cls, name: str) -> PoolCgroup | None:
        """A new cgroup ``safeproc-<name>`` beside this process's, or None where that is not
        possible here. ``name`` starts with the keeper's pid (see :func:`_remove_stale`)."""
        base = _own_cgroup_dir()
        if base is None:
            return None
        _remove_stale(base)
        path = os.path.join(base, _PREFIX + name)
        try:
            os.mkdir(path)
        except OSError:
            return None
        if not os.path.exists(os.path.join(path, "cgroup.kill")):  # Linux < 5.14
            _rmdir(path)
            return None
        return cls(path)

    def join(self, group: str | None = None, pid: int = 0) -> bool:
        """Move ``pid`` (0: this process) into ``group`` (default: the pool's own cgroup)."""
        return join_cgroup(group or self.path, pid)

    def worker_group(self, name: str) -> str | None:
        """A new child cgroup for one worker (created before the worker exists)."""
        path = os.path.join(self.path, name)
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        except OSError:
            return None
        return path

    def kill(self, group: str | None = None) -> bool:
        """SIGKILL every process in ``group`` (default: the whole pool) and its children cgroups."""
        return _write(os.path.join(group or self.path, "cgroup.kill"), "1")

    def remove_empty(self, group: str) -> bool:
        """Remove a worker's cgroup once nothing lives in it; False while something does."""
        return _rmdir(group)

    def remove(self, timeout: float = 2.0) -> None:
        """Wait (up to ``timeout``) until the pool's cgroup is empty, then remove it and its children."""
        if _wait_unpopulated(self.path, timeout):
            for entry in os.scandir(self.path):
                if entry.is_dir(follow_symlinks=False):
                    _rmdir(entry.path)
            _rmdir(self.path)


def _wait_unpopulated(path: str, timeout: float) -> bool:
    events = os.path.join(path, "cgroup.events")
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(events, os.O_RDONLY)
    except OSError:
        return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)  # the kernel wakes it when "populated" changes
        while True:
            if b"populated 0" in os.pread(fd, 4096, 0):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(min(left, 0.05) * 1000)
    except OSError:
        return False
    finally:
        os.close(fd)


def _remove_stale(base: str) -> None:
    """Empty cgroups of pools whose keeper is gone (all three SIGKILLed at once, say).

    Only empty ones: ``rmdir`` refuses a populated cgroup, and what lives there may still be
    someone's. Cheap: one directory listing per pool start.
    """
    try:
        entries = [
            e for e in os.scandir(base) if e.name.startswith(_PREFIX) and e.is_dir(follow_symlinks=False)
        ]
    except OSError:
        return
    for entry in entries:
        keeper = entry.name[len(_PREFIX) :].partition("-")[0]
        if keeper.isdigit() and not os.path.exists(f"/proc/{keeper}"):
            for child in os.scandir(entry.path):
                if child.is_dir(follow_symlinks=False):
                    _rmdir(child.path)
            _rmdir(entry.path)


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True
