"""Control messages between the pool and its helper process (the guardian).

Each is one pickled named tuple per SOCK_SEQPACKET datagram; :class:`SpawnWorker` carries the
new worker's descriptors (its socket, its output pipe, its status slot) through SCM_RIGHTS.
"""

from __future__ import annotations

from typing import NamedTuple

# pool -> guardian


class SpawnWorker(NamedTuple):
    key: int


class Preload(NamedTuple):
    """Import these modules before forking more workers (see :mod:`...preload`)."""

    modules: tuple[str, ...]


class Quit(NamedTuple):
    """End every worker and descendant: TERM, then KILL after ``grace``.

    ``idle``: the pool closed the workers' sockets while they waited for work, so they exit
    by themselves within milliseconds; the guardian gives them that moment before TERM.
    """

    grace: float
    idle: bool


# guardian -> pool


class GuardianReady(NamedTuple):
    pid: int


class WorkerStarted(NamedTuple):
    key: int
    pid: int


class SpawnFailed(NamedTuple):
    key: int
    traceback: str


class WorkerExited(NamedTuple):
    pid: int
    exitcode: int


class Preloaded(NamedTuple):
    """What :class:`Preload` did: ``failed`` maps a module to why; ``threads`` besides the main
    one after importing (any: workers start as fresh interpreters from now on)."""

    modules: tuple[str, ...]
    failed: dict[str, str]
    threads: int
    seconds: float


ToGuardian = SpawnWorker | Preload | Quit
FromGuardian = GuardianReady | WorkerStarted | SpawnFailed | WorkerExited | Preloaded
