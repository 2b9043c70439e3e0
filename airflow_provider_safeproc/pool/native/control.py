"""Control messages between the pool and its helper process (the guardian).

Each is one pickled named tuple per SOCK_SEQPACKET datagram; :class:`SpawnWorker` carries the
new worker's descriptors (its socket, its output pipe, its status slot) through SCM_RIGHTS.
"""

from __future__ import annotations

from typing import NamedTuple

# pool -> guardian


class SpawnWorker(NamedTuple):
    key: int


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


ToGuardian = SpawnWorker | Quit
FromGuardian = GuardianReady | WorkerStarted | SpawnFailed | WorkerExited
