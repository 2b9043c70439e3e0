"""Counting and ending the processes a test left behind (by pid or by a tag, never by name)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable

import psutil

from airflow_provider_safeproc.reaper import reap_process_tree


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def descendants(pid: int | None = None) -> list[psutil.Process]:
    """Every live descendant of ``pid`` (default: this process), zombies excluded."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    return [child for child in children if _alive(child)]


def processes_tagged(key: str, value: str) -> list[psutil.Process]:
    """Live processes of this user whose initial environment has ``key=value``.

    Finds descendants that escaped the tree (reparented to init after their parent died).
    Only the environment a process was exec'd with is visible in ``/proc``.
    """
    uid = os.getuid()
    found = []
    for proc in psutil.process_iter(["uids"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.info["uids"] is None or proc.info["uids"].real != uid or proc.pid == os.getpid():
                continue
            if proc.environ().get(key) == value and _alive(proc):
                found.append(proc)
    return found


def _stdlib_helper_pids() -> set[int]:
    """The stdlib's per-process helpers that live as long as the test process itself.

    The harness starts daemonic parents with the stdlib's spawn context, which starts a
    resource tracker once per test session. They are the test process's, not the code under test's.
    """
    from multiprocessing import forkserver, resource_tracker

    pids = {
        getattr(resource_tracker._resource_tracker, "_pid", None),
        getattr(forkserver._forkserver, "_forkserver_pid", None),
    }
    return {pid for pid in pids if pid}


def leftover_descendants(grace: float, ignore: Iterable[int] = ()) -> list[psutil.Process]:
    """Live descendants of this process not in ``ignore``, after waiting up to ``grace`` s."""
    skip = set(ignore) | _stdlib_helper_pids()
    deadline = time.monotonic() + grace
    while True:
        alive = [p for p in descendants() if p.pid not in skip]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def describe(procs: Iterable[psutil.Process]) -> str:
    parts = []
    for proc in procs:
        try:
            parts.append(f"pid {proc.pid} ({' '.join(proc.cmdline())[:160] or proc.name()})")
        except psutil.Error:
            parts.append(f"pid {proc.pid} (gone)")
    return "; ".join(parts)


def reap_leftovers(procs: list[psutil.Process]) -> str:
    described = describe(procs)
    reap_process_tree([p.pid for p in procs], grace=0.5)
    return described


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` s passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(interval)
