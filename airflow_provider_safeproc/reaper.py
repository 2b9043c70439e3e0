"""Ending whole process trees: the one place where descendants are found and killed.

Used by the pool (workers and whatever they started) and by the fresh-interpreter runner
(the child and its own pools). Airflow's task runner leaves through ``os._exit``, so nothing
else would end these processes: callers run :func:`reap_process_tree` in a ``finally``.

Linux facts relied on: ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child
exits, not the process, so it must be set for workers started by a long-lived thread;
``PR_SET_CHILD_SUBREAPER`` makes orphaned descendants reparent to us instead of init, so a
tree walk still finds them after their own parent died.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    import psutil

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc: ctypes.CDLL | None = None


def _prctl(option: int, arg: int) -> bool:
    global _libc
    if not hasattr(os, "fork") or os.uname().sysname != "Linux":
        return False
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc.prctl(option, arg, 0, 0, 0) == 0


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits (Linux)."""
    return _prctl(_PR_SET_PDEATHSIG, int(sig))


def set_child_subreaper() -> bool:
    """Make orphaned descendants reparent to this process, so they stay findable (Linux)."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _children_by_parent() -> dict[int, list[int]]:
    """ppid -> child pids of every process visible in /proc (no psutil: signal-handler safe)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ")".
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 2 or fields[0] == b"Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendant_pids(pid: int | None = None) -> list[int]:
    """Pids of the live (non-zombie) descendants of ``pid``, parents before their children.

    Reads /proc directly: no psutil, no lock, so a signal handler or the pool's lean helper
    process may call it.
    """
    children = _children_by_parent()
    found: list[int] = []
    queue = [os.getpid() if pid is None else pid]
    seen = set(queue)
    while queue:
        for child in children.get(queue.pop(0), ()):
            if child not in seen:
                seen.add(child)
                found.append(child)
                queue.append(child)
    return found


def descendants(pid: int | None = None) -> list[psutil.Process]:
    """Every live descendant of ``pid`` (default: this process), zombies excluded."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    alive = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
    return alive


def _tree(roots: Iterable[int], include_roots: bool) -> dict[int, psutil.Process]:
    import psutil

    found: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
        except psutil.Error:
            continue
        if include_roots:
            found[pid] = root
        with contextlib.suppress(psutil.Error):
            for child in root.children(recursive=True):
                found[child.pid] = child
    return found


def _signal_all(procs: Iterable[psutil.Process], sig: int) -> None:
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error, OSError):
            proc.send_signal(sig)


def reap_process_tree(
    roots: int | Iterable[int],
    *,
    include_roots: bool = True,
    grace: float = 1.0,
) -> list[int]:
    """End ``roots`` and all their descendants: SIGTERM, then SIGKILL after ``grace`` seconds.

    Blocks for at most about ``grace`` plus a short SIGKILL wait. The tree is walked again
    after each round, so processes forked while we were signalling are caught too. Returns the
    pids that were signalled. Never raises for processes that are already gone.
    """
    import psutil

    root_pids = [roots] if isinstance(roots, int) else list(roots)
    signalled: set[int] = set()
    deadline = time.monotonic() + max(grace, 0.0)
    sig = signal.SIGTERM
    while True:
        procs = _tree(root_pids, include_roots)
        live = {pid: p for pid, p in procs.items() if _alive(p)}
        if not live:
            break
        # Children first: once a parent dies its children reparent and drop out of the walk.
        _signal_all(reversed(list(live.values())), sig)
        signalled.update(live)
        remaining = deadline - time.monotonic()
        if sig == signal.SIGKILL or remaining <= 0:
            sig = signal.SIGKILL
            _signal_all(live.values(), sig)
            psutil.wait_procs(list(live.values()), timeout=1.0)
            if not any(_alive(p) for p in _tree(root_pids, include_roots).values()):
                break
            continue
        _gone, alive = psutil.wait_procs(list(live.values()), timeout=remaining)
        if alive:
            sig = signal.SIGKILL
    return sorted(signalled)


def kill_process_tree_now(roots: Iterable[int], *, include_roots: bool = True) -> None:
    """SIGKILL ``roots`` and their descendants at once, waiting for nothing.

    Safe to call from a signal handler or another thread: it reads /proc itself (no psutil,
    no import, no lock) and never blocks on a child. Children are killed before their parents,
    so none escapes by reparenting mid-walk. Zombies are left for their parents (or
    :func:`reap_process_tree`) to collect.
    """
    children = _children_by_parent()
    order: list[int] = []
    seen: set[int] = set()
    for root in roots:
        if include_roots and root not in seen:
            order.append(root)
        seen.add(root)
        queue = [root]
        while queue:
            for child in children.get(queue.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    order.append(child)
                    queue.append(child)
    for pid in reversed(order):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _alive(proc: psutil.Process) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def processes_tagged(key: str, value: str) -> list[psutil.Process]:
    """Live processes of this user whose initial environment has ``key=value``.

    Finds descendants that escaped the tree (reparented to init after their parent died).
    Only the environment a process was exec'd with is visible in ``/proc``.
    """
    import psutil

    uid = os.getuid()
    found = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != uid or proc.pid == os.getpid():
                continue
            if proc.environ().get(key) == value and _alive(proc):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found
