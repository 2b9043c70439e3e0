"""The seam between the pool's front and the engine that owns its processes.

The front (:mod:`~airflow_provider_safeproc.pool.executor`) checks arguments, serializes,
keeps the jobs and hands results to the caller. An engine starts and ends processes and
moves work and results between them and the :class:`~airflow_provider_safeproc.pool.workqueue.WorkQueue`,
on a thread of its own:

- **work out**: it takes dispatches with ``queue.take_incoming()`` and
  ``queue.next_dispatch()`` when it has a worker free, records the hand-out with
  ``WorkerRecord.assign`` and tells a busy worker to stop a cancelled job early;
- **events back**: a worker started (``WorkerRecord.pid``), an item started (its status
  stamp), results (``queue.settle_results``), an output line (``queue.output``), a worker
  lost with work (``queue.settle_lost``, with the worker's last stamp), the pool broken
  (``queue.state.mark_broken``), and, when it has ended, ``queue.close()``.

So every engine settles items through the same rules (:mod:`~airflow_provider_safeproc.pool.settle`).
What the front asks of an engine is the small interface below.
"""

from __future__ import annotations

import abc
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from airflow_provider_safeproc.errors import ConfigurationError
from airflow_provider_safeproc.pool.protocol import WorkerConfig
from airflow_provider_safeproc.pool.workqueue import WorkQueue

__all__ = ["Engine", "EngineSettings", "create_engine"]


@dataclass(frozen=True)
class EngineSettings:
    max_workers: int
    start_method: str
    item_timeout: float | None
    worker: WorkerConfig
    #: ``start_method="fork"``: (initializer, initargs) as objects, inherited by the workers
    inherited_initializer: tuple[Callable[..., Any], tuple[Any, ...]] | None = None


class Engine(abc.ABC):
    """Owns a pool's processes; driven by its own thread, fed by a :class:`WorkQueue`."""

    #: the name users pick it by (``engine=...``)
    name: ClassVar[str]
    #: whether large buffers go to workers beside the pickle, in shared memory (:mod:`.buffers`)
    shares_buffers: ClassVar[bool] = False

    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls) -> str | None:
        """Why this engine cannot run on this machine, or None when it can."""

    def __init__(self, queue: WorkQueue, settings: EngineSettings) -> None:
        self.queue = queue
        self.settings = settings
        self.owner_pid = os.getpid()  # a forked copy of the owner must leave the pool alone

    @abc.abstractmethod
    def start(self) -> None:
        """Start the engine's thread; returns at once. Processes start when work arrives."""

    @abc.abstractmethod
    def wake(self) -> None:
        """The queue changed (work, a stop, a cancelled map): look at it. Signal-handler safe."""

    @abc.abstractmethod
    def kill(self) -> None:
        """SIGKILL every process of the pool now. Signal-handler safe: no lock, no waiting."""

    @abc.abstractmethod
    def join(self, timeout: float | None = None) -> None:
        """Wait for the engine's thread to end (after a stop); never from that thread."""

    def preload(self, modules: tuple[str, ...]) -> None:  # noqa: B027 - optional: most engines ignore it
        """Modules the work will need, worth importing once where workers start from (any
        thread; see :mod:`.preload`). Engines whose workers do not share one origin ignore it."""

    @abc.abstractmethod
    def forget_after_fork(self) -> None:
        """In a forked copy of the owner: drop descriptors, touch no process."""

    @property
    @abc.abstractmethod
    def worker_pids(self) -> tuple[int, ...]:
        """Pids of the live workers (read without a lock)."""


# name -> "module:class", imported only when chosen
_ENGINES = {
    "native": "airflow_provider_safeproc.pool.native.engine:NativeEngine",
    "billiard": "airflow_provider_safeproc.pool.billiard.engine:BilliardEngine",
}


def engine_class(name: str) -> type[Engine]:
    module_name, _, class_name = _ENGINES[name].partition(":")
    cls: type[Engine] = getattr(importlib.import_module(module_name), class_name)
    return cls


def choose_engine(name: str | None) -> tuple[str, str]:
    """The engine to run and why: the one asked for (ConfigurationError when it cannot run
    here, with the reason), else native where the platform has what it needs, else billiard."""
    if name is not None:
        reason = engine_class(name).unavailable_reason()
        if reason is not None:
            raise ConfigurationError(f"engine={name!r} cannot run on this machine: {reason}")
        return name, "asked for"
    reason = engine_class("native").unavailable_reason()
    if reason is None:
        return "native", "chosen automatically: this machine has what it needs"
    return "billiard", f"chosen automatically: the native engine cannot run here ({reason})"


def create_engine(name: str, queue: WorkQueue, settings: EngineSettings) -> Engine:
    """The engine called ``name`` (see :func:`choose_engine`)."""
    return engine_class(name)(queue, settings)
