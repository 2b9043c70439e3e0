"""Ending whole process trees: the one place where descendants are found and killed.

Used by the pool's helper process, the pool's dispatcher, the fresh interpreter's child and
the operators. Airflow's task runner leaves through ``os._exit``, so nothing else would end
these processes: callers end them in a ``finally``.

Stdlib only, and nothing from this package: the fresh interpreter's child script loads this
file by path in interpreters that do not have the package (see ``interpreter/child.py``).
Every function reads ``/proc`` itself (no psutil, no lock), so a signal handler or a lean
helper process may call it.

Linux facts relied on: ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child
exits, not the process, so it must be set for workers started by a long-lived thread;
``PR_SET_CHILD_SUBREAPER`` makes orphaned descendants reparent to us instead of init, so a
tree walk still finds them after their own parent died.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

try:  # the C module: signal.py imports enum, milliseconds the fresh interpreter need not spend
    import _signal as _sig  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover
    import signal as _sig

SIGTERM: int = _sig.SIGTERM
SIGKILL: int = _sig.SIGKILL

__all__ = [
    "collect_children",
    "descendant_pids",
    "end_process_tree",
    "kill_process_tree_now",
    "reap_process_tree",
    "set_child_subreaper",
    "set_parent_death_signal",
    "signal_process",
    "stat_fields",
    "tree_of",
    "wait_for_child",
]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_POLL = 0.01
_libc: Any = None


def _prctl(option: int, arg: int) -> bool:
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        import ctypes  # here: only processes that need prctl pay for the import

        _libc = ctypes.CDLL(
            None, use_errno=True
        )  # the C library is linked in (find_library would run ldconfig)
    return bool(_libc.prctl(option, arg, 0, 0, 0) == 0)


def set_parent_death_signal(sig: int = SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits (Linux)."""
    return _prctl(_PR_SET_PDEATHSIG, int(sig))


def set_child_subreaper() -> bool:
    """Make orphaned descendants reparent to this process, so they stay findable (Linux)."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` from field 3 (state) on, or None if it is gone.

    Field n of proc(5) is at index n - 3. The command name (field 2) may hold spaces and
    parentheses, so the split starts after the last ")".
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def _children_by_parent() -> dict[int, list[int]]:
    """ppid -> pids of the live (non-zombie) processes visible in /proc."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = stat_fields(entry)
        if fields is None or len(fields) < 2 or fields[0] == b"Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _edges(children: dict[int, list[int]], root: int, seen: set[int]) -> Iterator[tuple[int, int]]:
    """``(pid, parent pid)`` below ``root``, parents before their children; ``seen`` grows."""
    queue = [root]
    while queue:
        parent = queue.pop(0)
        for child in children.get(parent, ()):
            if child not in seen:
                seen.add(child)
                yield child, parent
                queue.append(child)


def _tree(roots: Iterable[int], include_roots: bool) -> list[int]:
    """Live pids of ``roots``' trees, parents before their children."""
    children = _children_by_parent()
    alive = {pid for pids in children.values() for pid in pids}
    order: list[int] = []
    seen: set[int] = set()
    for root in roots:
        if root in seen:
            continue
        seen.add(root)
        if include_roots and root in alive:
            order.append(root)
        order.extend(child for child, _parent in _edges(children, root, seen))
    return order


def tree_of(pid: int) -> list[tuple[int, int]]:
    """``(pid, parent pid)`` of every live descendant of ``pid``, parents before their children."""
    return list(_edges(_children_by_parent(), pid, {pid}))


def descendant_pids(pid: int | None = None) -> list[int]:
    """Pids of the live (non-zombie) descendants of ``pid`` (default: this process), parents first."""
    return _tree([os.getpid() if pid is None else pid], include_roots=False)


def signal_process(pid: int, sig: int) -> bool:
    """``os.kill`` that tells instead of raising: False when the process is gone."""
    try:
        os.kill(pid, sig)
    except OSError:
        return False
    return True


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        signal_process(pid, sig)


def kill_process_tree_now(roots: Iterable[int], *, include_roots: bool = True) -> None:
    """SIGKILL ``roots`` and their descendants at once, waiting for nothing.

    Safe from a signal handler or another thread. Children are killed before their parents,
    so none escapes by reparenting mid-walk. Zombies are left for their parents to collect.
    """
    _signal_all(reversed(_tree(list(roots), include_roots)), SIGKILL)


def wait_for_child(pid: int, timeout: float | None) -> int | None:
    """Reap the child ``pid`` and return its wait status, or None if it still runs after
    ``timeout`` seconds (None: wait as long as it takes). Raises ChildProcessError if it is not
    our child (or was reaped already).

    Wakes the moment the child exits (a pidfd, Linux 5.3+), not at the next tick of a polling
    loop (``Popen.wait`` sleeps up to 50 ms between looks): a pool's shutdown waits on this.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        delay = 0.0005
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            if pidfd is not None:
                import select  # here: the fresh interpreter's child never waits this way

                select.select([pidfd], [], [], left)
            else:
                time.sleep(delay if left is None else min(delay, left))
                delay = min(delay * 2, 0.02)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def collect_children(on_reaped: Callable[[int, int], None] | None) -> None:
    """Collect every exited child of this process (we are their parent or their subreaper);
    ``on_reaped(pid, wait status)`` hears of each."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if on_reaped is not None:
            on_reaped(pid, status)


def end_process_tree(
    roots: Iterable[int],
    *,
    include_roots: bool = True,
    grace: float = 1.0,
    reap: bool = False,
    on_reaped: Callable[[int, int], None] | None = None,
    deadline_after_kill: float = 5.0,
) -> list[int]:
    """SIGTERM every process of the trees, SIGKILL what is left after ``grace``, until none is left.

    The trees are walked again after each round, so processes forked meanwhile are caught
    too. ``reap``: this process is the parent (or subreaper) of what it ends, so it collects
    their exit statuses as they die (``on_reaped(pid, status)`` hears of each); without it,
    zombies count as ended. Gives up ``deadline_after_kill`` seconds after the first SIGKILL
    (a process stuck in the kernel cannot be waited for forever). Returns the pids signalled.
    """
    root_pids = list(roots)
    signalled: list[int] = []
    sig = SIGTERM
    term_until = time.monotonic() + max(grace, 0.0)
    give_up: float | None = None
    while True:
        if reap:
            collect_children(on_reaped)
        pids = _tree(root_pids, include_roots)
        if not pids:
            break
        now = time.monotonic()
        if sig == SIGTERM and now >= term_until:
            sig = SIGKILL
        if sig == SIGKILL:
            give_up = give_up if give_up is not None else now + deadline_after_kill
            if now >= give_up:
                break
        _signal_all(reversed(pids), sig)  # children first: none escapes by reparenting
        signalled.extend(p for p in pids if p not in signalled)
        time.sleep(_POLL)
    if reap:
        collect_children(on_reaped)
    return signalled


def reap_process_tree(
    roots: int | Iterable[int],
    *,
    include_roots: bool = True,
    grace: float = 1.0,
) -> list[int]:
    """End ``roots`` and all their descendants: SIGTERM, then SIGKILL after ``grace`` seconds.

    Blocks for at most about ``grace`` plus a short SIGKILL wait. Returns the pids that were
    signalled, sorted. Never raises for processes that are already gone. Direct children of
    this process among them are collected, so none is left a zombie.
    """
    root_pids = [roots] if isinstance(roots, int) else list(roots)
    me = os.getpid()
    ours = {pid for pid in root_pids if _parent_of(pid) == me} if include_roots else set()
    signalled = end_process_tree(root_pids, include_roots=include_roots, grace=grace)
    for pid in ours:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return sorted(signalled)


def _parent_of(pid: int) -> int | None:
    fields = stat_fields(pid)
    return None if fields is None else int(fields[1])
