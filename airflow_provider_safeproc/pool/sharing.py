"""``multiprocessing`` queues, locks, semaphores and events handed to workers through ``initargs``.

The stdlib lets a pool's initializer take them (the usual way to send workers' logging to the
parent with a ``QueueHandler``) because they travel with the worker's start: by inheritance
with ``fork``, or pickled while the worker is being spawned, their pipes passed as descriptors
and their semaphores reopened by name. This pool does the same:

- ``forkserver`` and ``spawn``: ``(initializer, initargs)`` is pickled once, as the stdlib
  pickles a spawned process's arguments; the descriptors it names are kept open, at their
  numbers, in the pool's helper and every worker. Objects made by the ``fork`` context cannot
  go this way (their semaphores have no name): refused with a clear error, as the stdlib does.
- ``fork``: nothing is pickled; the objects are inherited through the forks, and only their
  descriptors need finding, so that the workers keep them open.

As arguments of a call, such objects keep the stdlib's refusal ("... should only be shared
between processes through inheritance"), with a pointer to ``initargs`` or a ``Manager``
(see ``serialization.dumps``).
"""

from __future__ import annotations

import collections
import io
from typing import Any

from airflow_provider_safeproc.errors import ConfigurationError
from airflow_provider_safeproc.serialization import Pickler, dumps

__all__ = ["find_shared_fds", "pickle_for_workers"]


class _SpawningPopen:
    """Stands in for the stdlib's spawning ``Popen`` while initargs are pickled: collects fds."""

    def __init__(self) -> None:
        from multiprocessing.popen_spawn_posix import _DupFd  # rebuilt by the worker: fd as is

        self.DupFd = _DupFd
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        self.fds.append(fd)
        return fd


class _ForkContextObject(RuntimeError):
    """A semaphore made by the fork context: it has no name to be reopened by."""


def _named_semaphore(lock: Any) -> Any:
    # Python 3.11+ refuses these itself ("A SemLock created in a fork context..."); 3.10 would
    # pickle the semaphore's raw address, which means nothing in another process.
    if lock._semlock.name is None:
        raise _ForkContextObject("a multiprocessing lock or semaphore of the fork context")
    return lock.__reduce_ex__(5)


def _pickler_class(*, find_only: bool) -> type[Any]:
    from multiprocessing import reduction, synchronize

    reducers: dict[type[Any], Any] = dict(reduction.ForkingPickler._extra_reducers)  # type: ignore[attr-defined]
    locks = (synchronize.Lock, synchronize.RLock, synchronize.Semaphore, synchronize.BoundedSemaphore)
    for lock_type in locks:  # fork: only the descriptors matter, semaphores are inherited as they are
        reducers[lock_type] = (lambda _lock: (type(None), ())) if find_only else _named_semaphore

    class _Pickler(Pickler):
        dispatch_table = collections.ChainMap(reducers, Pickler.dispatch_table)

    return _Pickler


def _pickle_spawning(obj: Any, *, find_only: bool) -> tuple[bytes, list[int]]:
    from multiprocessing import context

    popen = _SpawningPopen()
    buffer = io.BytesIO()
    previous = context.get_spawning_popen()
    context.set_spawning_popen(popen)  # type: ignore[arg-type]  # duck-typed, as the stdlib reads it
    try:
        _pickler_class(find_only=find_only)(buffer, protocol=5).dump(obj)
    finally:
        context.set_spawning_popen(previous)
    return buffer.getvalue(), sorted(set(popen.fds))


def pickle_for_workers(obj: Any, *, what: str) -> tuple[bytes, tuple[int, ...]]:
    """``obj`` pickled as for a spawned process, and the descriptors the workers must hold.

    Raises :class:`ConfigurationError` for objects of the ``fork`` context and
    :class:`SerializationError` for anything else that cannot be pickled.
    """
    try:
        blob, fds = _pickle_spawning(obj, find_only=False)
    except RuntimeError as exc:
        if isinstance(exc, _ForkContextObject) or "fork context" in str(exc):
            raise ConfigurationError(
                f"the {what} hold a multiprocessing object made by the 'fork' context, which only a "
                "worker forked from this process can use: create it from "
                "multiprocessing.get_context('spawn') (or 'forkserver'), or use start_method='fork'"
            ) from exc
        dumps(obj, what=what)  # raises the SerializationError naming the part at fault
        raise
    except (Exception, SystemExit):
        dumps(obj, what=what)
        raise
    return blob, tuple(fds)


def find_shared_fds(obj: Any) -> tuple[int, ...]:
    """The descriptors of the queues and pipes in ``obj`` (``fork``: inherited, kept open)."""
    try:
        return tuple(_pickle_spawning(obj, find_only=True)[1])
    except (Exception, SystemExit):
        return ()  # not a reason to refuse: a fork hands workers whatever it is
