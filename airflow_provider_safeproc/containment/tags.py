"""Tags: which worker started a process, readable in ``/proc`` for as long as the process lives.

Every worker writes ``SAFEPROC_TAG=<pool token>-<its pid>`` over a same-length placeholder in
its *initial* environment block: the block ``/proc/PID/environ`` shows, which ``fork`` copies
and which ``exec`` rebuilds from ``os.environ`` (set too). So the processes an item starts,
forked or exec'd, detached or not, carry their worker's tag, and when a worker dies its helper
ends exactly those (:func:`end_what_a_worker_left`), never a live item's.

A placeholder needs a helper exec'd with :func:`tag_environment` (``forkserver``, ``spawn``,
the billiard engine): a ``fork`` pool's workers have the task's block and go untagged.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from airflow_provider_safeproc.reaper import SIGKILL, stat_fields, tree_of

TAG_KEY = "SAFEPROC_TAG"
_PID_DIGITS = 10  # every tag has the placeholder's length: it is written over it in place
_SWEEP_ROUNDS = 50


def _tag(token: str, pid: int) -> str:
    return f"{token}-{pid:0{_PID_DIGITS}d}"


def tag_environment(token: str) -> dict[str, str]:
    """The environment entry a helper is exec'd with: the placeholder its workers overwrite."""
    return {TAG_KEY: _tag(token, 0)}


def pool_token() -> str | None:
    """The pool's token in a process exec'd with :func:`tag_environment` (else None)."""
    token, _, pid = os.environ.get(TAG_KEY, "").rpartition("-")
    return token if token and len(pid) == _PID_DIGITS and pid.isdigit() else None


def stamp_worker_tag() -> bool:
    """In a new worker, before anything else: tag it, and what it will start, as this worker's.

    False where there is no placeholder (a ``fork`` pool, another OS): the worker goes untagged.
    """
    token = pool_token()
    if token is None:
        return False
    old = os.environ[TAG_KEY]
    new = _tag(token, os.getpid())
    os.environ[TAG_KEY] = new
    return _rewrite_initial_environment(f"{TAG_KEY}={old}".encode(), f"{TAG_KEY}={new}".encode())


def _rewrite_initial_environment(old: bytes, new: bytes) -> bool:
    if len(old) != len(new) or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes  # a worker that stamps pays for it once; the helper already has it

        fields = stat_fields("self")
        if fields is None:
            return False
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end: stat fields 50, 51
        at = _find_entry(ctypes.string_at(start, end - start), old + b"\0")
        if at is None:
            return False
        ctypes.memmove(start + at, new, len(new))
    except (OSError, ValueError, IndexError, ImportError):
        return False
    return True


def _find_entry(block: bytes, prefix: bytes) -> int | None:
    """Offset of the entry of a NUL-separated environment block that starts with ``prefix``."""
    if block.startswith(prefix):
        return 0
    at = block.find(b"\0" + prefix)
    return None if at < 0 else at + 1


def _tag_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            block = f.read()
    except OSError:  # gone, or not ours to read
        return None
    needle = f"{TAG_KEY}=".encode()
    at = _find_entry(block, needle)
    if at is None:
        return None
    end = block.find(b"\0", at)
    return block[at + len(needle) : end if end >= 0 else len(block)].decode("ascii", "replace")


def end_what_a_worker_left(worker_pid: int, token: str, keep: set[int]) -> list[int]:
    """SIGKILL the processes, and their subtrees, that a dead worker's items started.

    Called by the helper, their subreaper, right after it reaped the worker: they are among
    its descendants and carry the worker's tag. ``keep``: the live workers, never candidates.
    Returns the pids killed.
    """
    if not _strays(keep):
        return []  # the common case, a worker that left nothing: one small read
    wanted = _tag(token, worker_pid)

    def doomed() -> list[int]:
        tree = tree_of(os.getpid())
        marked: set[int] = set()
        for pid, parent in tree:  # parents come before their children
            if pid not in keep and (parent in marked or _tag_of(pid) == wanted):
                marked.add(pid)
        return [pid for pid, _parent in reversed(tree) if pid in marked]  # children first

    return _kill_until_none(doomed)


def _strays(workers: set[int]) -> bool:
    """Whether this process has a child that is not a live worker (an orphan it adopted).

    Everything a dead worker left hangs below such a child: its own children reparent here,
    and so do orphans further down (we are their subreaper). Without ``/proc/PID/task/TID/children``
    (a kernel option) the answer is yes.
    """
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            children = {int(pid) for pid in f.read().split()}
    except OSError:
        return True
    return bool(children - workers)


def end_tagged_processes(token: str) -> list[int]:
    """SIGKILL every process of this user that carries ``token`` in its tag: the last resort
    of the task process when the keeper itself was killed and orphans went to init.

    Misses only what dropped its environment. Returns the pids killed.
    """
    prefix = f"{token}-"
    me = os.getpid()

    def doomed() -> list[int]:
        try:
            pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
        except OSError:
            return []
        return [pid for pid in pids if pid != me and (_tag_of(pid) or "").startswith(prefix)]

    return _kill_until_none(doomed)


def _kill_until_none(doomed: Callable[[], list[int]]) -> list[int]:
    """SIGKILL what ``doomed()`` finds, again until it finds nothing: a child forked meanwhile
    inherits the tag and is caught in the next round. Returns the pids killed."""
    killed: list[int] = []
    for _ in range(_SWEEP_ROUNDS):
        found = doomed()
        if not found:
            break
        for pid in found:
            try:
                os.kill(pid, SIGKILL)
            except OSError:
                pass
        killed.extend(p for p in found if p not in killed)
        time.sleep(0.001)
    return killed
