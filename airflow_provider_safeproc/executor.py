"""``SafeProcessPoolExecutor``: a process pool that is safe anywhere an Airflow task runs.

A ``concurrent.futures.Executor``, so code written for ``ProcessPoolExecutor`` works
unchanged, including in the places where the stdlib refuses or misbehaves: inside a daemonic
process (Celery's prefork pool), inside one of its own workers, from a threaded parent.

How it is built (module by module):

- ``_launch``/``_guardian``: one helper process per pool, the guardian, starts the workers
  (fork of a lean interpreter by default), reaps them, and ends their whole process tree
  when the pool ends or the caller dies, even by SIGKILL.
- ``_worker``: the worker loop; it never imports ``__main__`` or ``airflow``.
- ``_dispatch``: the dispatcher thread: sockets, queues, worker start and timeouts.
- ``_settle``: the rules that turn worker reports and deaths into outcomes, once each.
- ``_jobs``: jobs, chunks, outcomes, the summary of a map.
- ``reaper``, ``serialization``, ``errors``, ``cpu``: shared with the fresh-interpreter runner.

We do not use billiard's ``Pool``: it swallows pickling errors (the job never completes),
needs 10 s to notice a lost worker, sleeps on shutdown, and its spawn re-imports ``__main__``.
Like billiard, the pool starts processes from daemonic parents (it has no daemon check).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import threading
import warnings
import weakref
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any

from airflow_provider_safeproc._dispatch import PoolCore
from airflow_provider_safeproc._jobs import (
    CANCELLED_STATE,
    FAILED_STATE,
    OK_STATE,
    PENDING_STATE,
    Dispatch,
    ItemOutcome,
    Job,
    MapSummary,
    new_fn_id,
)
from airflow_provider_safeproc._wire import MAX_CHUNK
from airflow_provider_safeproc.cpu import effective_cpu_count
from airflow_provider_safeproc.errors import ConfigurationError, SerializationError
from airflow_provider_safeproc.serialization import dumps, register_unimportable_modules
from airflow_provider_safeproc.validation import START_METHODS, check_positive_int, check_positive_number

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

__all__ = ["ItemOutcome", "MapSummary", "SafeProcessPoolExecutor"]

DEFAULT_START_METHOD = "forkserver"
# Automatic chunks: this many per worker for the whole map (the stdlib's Pool uses 4).
_CHUNKS_PER_WORKER = 8
_live_cores: weakref.WeakSet[PoolCore] = weakref.WeakSet()


def _default_log(line: str) -> None:
    stream = sys.stderr
    if stream is not None:
        stream.write(line + "\n")
        stream.flush()


class SafeProcessPoolExecutor(Executor):
    """A process pool that works in daemonic processes, from threads, and leaves no process behind.

    :param max_workers: worker processes; None means the CPUs this process may really use
        (affinity mask and cgroup quota, see :func:`~airflow_provider_safeproc.cpu.effective_cpu_count`).
    :param start_method: ``"forkserver"`` (default: workers forked from a lean helper
        interpreter), ``"spawn"`` (a fresh interpreter per worker) or ``"fork"`` (workers
        are copies of this process as it is when the pool is created; warns if other
        threads run, as forking them can deadlock).
    :param item_timeout: seconds an item may run; past it the worker (and everything it
        started) is killed and replaced, and the item fails with ``ItemTimeoutError``.
    :param max_tasks_per_child: items a worker runs before it is replaced.
    :param max_memory_per_child: MiB of resident memory after which a worker is replaced
        (checked after each item).
    :param initializer: called with ``initargs`` in each worker when it starts; if it
        raises, the pool breaks (``BrokenPoolError``) instead of restarting workers forever.
    :param log: receives each line that workers print or log, tagged ``[item 17] ...``;
        default: this process's ``sys.stderr``.
    :param progress: receives ``(done, total)`` as the items of a ``map`` finish.
    :raises ConfigurationError: (a ValueError) for any argument that can never work,
        before a process is started.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        start_method: str | None = None,
        item_timeout: float | None = None,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: float | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        log: Callable[[str], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        workers = check_positive_int("max_workers", max_workers)
        self._max_workers = workers if workers is not None else effective_cpu_count()
        if start_method is None:
            start_method = DEFAULT_START_METHOD
        if start_method not in START_METHODS or (start_method == "fork" and not hasattr(os, "fork")):
            raise ConfigurationError(
                f"start_method must be one of {', '.join(START_METHODS)} or None, not {start_method!r}"
            )
        self._item_timeout = check_positive_number("item_timeout", item_timeout)
        max_tasks = check_positive_int("max_tasks_per_child", max_tasks_per_child)
        max_memory = check_positive_number("max_memory_per_child", max_memory_per_child)
        if initializer is not None and not callable(initializer):
            raise ConfigurationError(f"initializer must be callable or None, not {initializer!r}")
        if not isinstance(initargs, tuple):
            raise ConfigurationError(f"initargs must be a tuple, not {type(initargs).__name__}")
        for name, sink in (("log", log), ("progress", progress)):
            if sink is not None and not callable(sink):
                raise ConfigurationError(f"{name} must be callable or None, not {sink!r}")
        init_blob = None
        if initializer is not None:
            register_unimportable_modules(initializer, *initargs)
            init_blob = dumps((initializer, initargs), what="initializer and initargs")
        if start_method == "fork":
            _warn_about_threads()
        self._progress = progress
        self._last_job: Job | None = None
        self._submitted = 0
        config = {
            "sys_path": list(sys.path),
            "log_level": logging.getLogger().getEffectiveLevel(),
            "initializer": init_blob,
            "max_tasks": max_tasks,
            "max_memory": None if max_memory is None else int(max_memory * 1024 * 1024),
            # A timeout or a memory limit is checked per item: no fast segments of tiny items.
            "stamp_every_item": self._item_timeout is not None or max_memory is not None,
        }
        core = PoolCore(
            max_workers=self._max_workers,
            start_method=start_method,
            item_timeout=self._item_timeout,
            config=config,
            log=log or _default_log,
        )
        self._core = core
        _live_cores.add(core)
        core.start()
        # Garbage collection ends the pool once its queued work is done.
        self._finalizer = weakref.finalize(self, core.request_stop)

    # --- properties ----------------------------------------------------------------------
    @property
    def max_workers(self) -> int:
        return self._max_workers

    @property
    def summary(self) -> MapSummary | None:
        """What the last ``map``/``map_outcomes`` did so far (final once it was consumed)."""
        job = self._last_job
        return None if job is None else job.summary()

    # --- work ----------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)``; raises ``SerializationError`` at once if it can't be sent."""
        if _interpreter_exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        index = self._submitted
        register_unimportable_modules(fn, *args, *kwargs.values())
        try:
            blob = dumps([(fn, args, kwargs)], what="callable and arguments", item=index)
        except SerializationError:
            _raise_precise_error(fn, args, kwargs, index)
            raise
        self._submitted += 1
        future: Future = Future()
        job = Job(n=1, fn_id=None, fn_blob=None, star=True, chunks=[blob], chunk_bases=[0], future=future)
        job.tag_offset = index
        self._core.put([Dispatch(job, 0, [0])])
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
    ) -> Iterator[Any]:
        """Like ``Executor.map``: results in input order; the first error (in order) is raised.

        Every item is serialized (and sent) before this returns. Leaving the iterator early
        cancels the items not yet started. ``timeout`` counts from this call.
        """
        if timeout is not None:
            check_positive_number("timeout", timeout)
        if len(iterables) == 1:  # no 1-tuples to build, pickle and unpack: fn(item)
            job = self._make_job(fn, list(iterables[0]), star=False, chunksize=chunksize)
        else:
            rows = list(zip(*iterables))  # noqa: B905 - stops at the shortest iterable, like Executor.map
            job = self._make_job(fn, rows, star=True, chunksize=chunksize)
        deadline = None if timeout is None else job.started + timeout
        return itertools.chain.from_iterable(self._result_runs(job, deadline))

    def map_outcomes(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[Any],
        *,
        chunksize: int | None = None,
        retries: int = 0,
        stop_on_error: bool = False,
    ) -> Iterator[ItemOutcome]:
        """Run ``fn(item)`` for each item; yield one :class:`ItemOutcome` per item, in input order.

        Never raises for an item: its error is in the outcome. ``retries`` re-runs an item
        that raised, timed out or lost its worker, up to that many more times.
        ``stop_on_error``: after the first failure (retries spent), items not yet started
        are never run; they are still yielded, in order, as outcomes with ``ok=False``,
        ``error=CancelledError()`` and ``attempts=0``. Items already running finish.
        """
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(f"retries must be an int >= 0, not {retries!r}")
        job = self._make_job(
            fn,
            list(items),
            star=False,
            chunksize=chunksize,
            retries=retries,
            stop_on_error=bool(stop_on_error),
        )
        return self._outcomes(job)

    def _make_job(
        self,
        fn: Callable[..., Any],
        items: list[Any],
        *,
        star: bool,
        chunksize: int | None,
        retries: int = 0,
        stop_on_error: bool = False,
    ) -> Job:
        size = check_positive_int("chunksize", chunksize)
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        n = len(items)
        if size is None:
            size = max(1, math.ceil(n / (self._max_workers * _CHUNKS_PER_WORKER)))
        size = min(size, MAX_CHUNK)
        register_unimportable_modules(fn)
        fn_blob = dumps(fn, what="callable")
        chunks, bases = [], []
        for base in range(0, n, size):
            chunk = items[base : base + size]
            try:
                chunks.append(dumps(chunk, what="arguments", item=base))
            except SerializationError:
                register_unimportable_modules(*chunk)
                try:
                    chunks.append(dumps(chunk, what="arguments", item=base))
                except SerializationError:
                    for offset, item in enumerate(chunk):
                        dumps(item, what="argument", item=base + offset)
                    raise
            bases.append(base)
        job = Job(
            n=n,
            fn_id=new_fn_id(),
            fn_blob=fn_blob,
            star=star,
            chunks=chunks,
            chunk_bases=bases,
            retries=retries,
            stop_on_error=stop_on_error,
            progress=self._progress,
        )
        self._last_job = job
        if n:
            self._core.put([Dispatch(job, i, range(len(items[b : b + size]))) for i, b in enumerate(bases)])
        else:
            job.finished = job.started
        return job

    def _outcomes(self, job: Job) -> Iterator[ItemOutcome]:
        try:
            for index in range(job.n):
                job.wait(index, None)
                yield job.outcome(index)
        finally:
            self._abandon(job)

    def _result_runs(self, job: Job, deadline: float | None) -> Iterator[list[Any]]:
        """Runs of consecutive results already there, up to the first pending or failed one.

        ``map`` chains these runs, so 100,000 tiny results are handed out at C speed, with
        no per-item bookkeeping; a failed item raises when the iteration reaches it.
        """
        state, values, n = job.state, job.values, job.n
        try:
            index = 0
            while index < n:
                if job.wait(index, deadline) != OK_STATE:
                    raise values[index]
                end = state.find(PENDING_STATE, index)
                end = n if end < 0 else end
                failed = (state.find(FAILED_STATE, index, end), state.find(CANCELLED_STATE, index, end))
                stop = min([f for f in failed if f >= 0], default=end)
                yield values[index:stop]
                index = stop
        finally:
            self._abandon(job)

    def _abandon(self, job: Job) -> None:
        """The caller stopped iterating: items not started are not worth running."""
        if not job.complete:
            job.cancelled = True
            self._core.wake()

    # --- ending --------------------------------------------------------------------------
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; end the workers once queued work is done (or cancelled).

        With ``wait``, returns when every worker and every process they started has ended.
        """
        self._core.request_stop(cancel=cancel_futures)
        if wait:
            self._core.join()

    def terminate(self) -> None:
        """End now: items not started are cancelled, running ones fail with ``BrokenPoolError``;
        workers and their descendants get SIGTERM, then SIGKILL after a grace. Blocks until done.
        """
        self._core.request_stop(terminate=True)
        self._core.join()

    def kill(self) -> None:
        """SIGKILL every worker and every process they started, at once.

        Safe from a signal handler or another thread (it takes no lock and waits for
        nothing; meant for an operator's ``on_kill``). Unfinished items fail with
        ``BrokenPoolError`` and the pool accepts no more work.
        """
        self._core.kill()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        # Leaving by an exception (a task being stopped, a bug) must not wait for long items.
        if exc_type is None:
            self.shutdown(wait=True)
        else:
            self.terminate()
        return False


def _raise_precise_error(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], index: int) -> None:
    """Serialize the parts of a failed submit one by one, to name what cannot be serialized."""
    dumps(fn, what="callable", item=index)
    for value in (*args, *kwargs.values()):
        dumps(value, what="argument", item=index)


def _warn_about_threads() -> None:
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if others:
        warnings.warn(
            f"start_method='fork' with {len(others)} other thread(s) running ({', '.join(others)}): "
            "a forked worker can deadlock on a lock one of them holds; prefer 'forkserver'",
            RuntimeWarning,
            stacklevel=3,
        )


_interpreter_exiting = False


def _run_pending_work_at_exit() -> None:
    """At interpreter exit, as the stdlib's ``ProcessPoolExecutor`` does: queued work runs.

    Registered with ``threading._register_atexit``, so it runs before non-daemon threads are
    joined and before ``atexit`` handlers and ``weakref`` finalizers, while every pool is still
    whole. Pools stop once their queued work is done; ``submit`` refuses new work from here on.
    """
    global _interpreter_exiting
    _interpreter_exiting = True
    cores = list(_live_cores)
    for core in cores:
        core.request_stop()
    for core in cores:
        core.join()


def _forget_in_child() -> None:
    for core in list(_live_cores):
        core.forget_after_fork()
    _live_cores.clear()


threading._register_atexit(_run_pending_work_at_exit)  # type: ignore[attr-defined]
os.register_at_fork(after_in_child=_forget_in_child)
