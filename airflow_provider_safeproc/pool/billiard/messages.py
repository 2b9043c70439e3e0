"""What the billiard engine (task process) and its helper say to each other, as frames."""

from __future__ import annotations

from typing import Any, NamedTuple

from airflow_provider_safeproc.pool.protocol import RunChunk, WorkerConfig

# engine -> helper


class HelperConfig(NamedTuple):
    """The first frame: what the helper builds its billiard pool with."""

    worker: WorkerConfig
    processes: int
    context: str  # billiard's start method: "fork" (from the lean helper) or "spawn"
    maxtasksperchild: int | None
    max_memory_per_child_kib: int | None
    status_dir: str


class RunTask(NamedTuple):
    """Run ``run`` (a chunk, its bytes in the frame's blob); ``fn_blob``: the map's callable."""

    seq: int
    run: RunChunk
    fn_blob: bytes | None


class Quit(NamedTuple):
    """End the pool: idle workers at once, busy ones after ``grace`` (TERM, then KILL)."""

    grace: float


# helper -> engine


class HelperReady(NamedTuple):
    pid: int


class WorkerUp(NamedTuple):
    """A billiard worker started; its status stamps are in the file at ``status_path``."""

    pid: int
    status_path: str


class Accepted(NamedTuple):
    """billiard's ACK: the worker ``pid`` took the task ``seq``."""

    seq: int
    pid: int


class Done(NamedTuple):
    """billiard's READY: the task ``seq`` returned (its results came as ``FromWorker``)."""

    seq: int


class FromWorker(NamedTuple):
    """A message of the pool protocol from worker ``pid`` (results, a log line...), blob after."""

    pid: int
    message: Any


class Output(NamedTuple):
    """A line the worker ``pid`` wrote to its fd 1 or 2 (C code, a subprocess)."""

    pid: int
    text: str


class WorkerDown(NamedTuple):
    """The worker ``pid`` ended; everything it sent came before this."""

    pid: int
    exitcode: int | None


class HelperFailed(NamedTuple):
    """The helper cannot go on (billiard refused to start workers): why."""

    reason: str
