"""``SafeProcessPoolExecutor``: the pool's front, on the caller's side.

It checks arguments before any process starts, reads a map's input a window at a time and
serializes it in the caller's thread (:mod:`~airflow_provider_safeproc.pool.feeding`, so an
error names the item), puts the work in the
:class:`~airflow_provider_safeproc.pool.workqueue.WorkQueue` and hands outcomes back
(:mod:`~airflow_provider_safeproc.pool.results`); the engine behind it owns the processes
(see :mod:`airflow_provider_safeproc.pool`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Executor, Future
from typing import Any, ParamSpec, TypeVar

from airflow_provider_safeproc._after_fork import forget_in_forked_child
from airflow_provider_safeproc.context_channel import ContextResolver, pool_context
from airflow_provider_safeproc.cpu import effective_cpu_count
from airflow_provider_safeproc.errors import ConfigurationError, SerializationError
from airflow_provider_safeproc.pool import results
from airflow_provider_safeproc.pool.buffers import dumps_sharing
from airflow_provider_safeproc.pool.engine import Engine, EngineSettings, choose_engine, create_engine
from airflow_provider_safeproc.pool.feeding import WINDOW_PER_WORKER, ChunkSizing, InputReader, length_of
from airflow_provider_safeproc.pool.jobs import Dispatch, ItemOutcome, Job, MapSummary, new_fn_id
from airflow_provider_safeproc.pool.preload import modules_referred_to
from airflow_provider_safeproc.pool.protocol import WorkerConfig
from airflow_provider_safeproc.pool.sharing import find_shared_fds, pickle_for_workers
from airflow_provider_safeproc.pool.workqueue import WorkQueue
from airflow_provider_safeproc.serialization import dumps, register_unimportable_modules
from airflow_provider_safeproc.validation import (
    EngineName,
    StartMethod,
    check_callable,
    check_engine,
    check_item_timeouts,
    check_module_names,
    check_non_negative_int,
    check_positive_int,
    check_positive_number,
    check_tuple,
    start_method_of_context,
)

__all__ = ["ItemOutcome", "MapSummary", "SafeProcessPoolExecutor"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

DEFAULT_START_METHOD: StartMethod = "forkserver"
_logger = logging.getLogger(__name__)
_live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_interpreter_exiting = False


def _default_log(line: str) -> None:
    stream = sys.stderr
    if stream is not None:
        stream.write(line + "\n")
        stream.flush()


class SafeProcessPoolExecutor(Executor):
    """A process pool that works in daemonic processes, from threads, and leaves no process behind.

    A ``concurrent.futures.Executor``: code written for ``ProcessPoolExecutor`` works
    unchanged; what differs on purpose is in the README's table.

    :param max_workers: worker processes; None means the CPUs this process may really use
        (affinity mask and cgroup quota, see :func:`~airflow_provider_safeproc.cpu.effective_cpu_count`).
    :param mp_context: a ``multiprocessing`` context, as the stdlib's pool takes it: its start
        method is used (refused when it contradicts ``start_method``).
    :param start_method: ``"forkserver"`` (default: workers forked from a lean helper
        interpreter), ``"spawn"`` (a fresh interpreter per worker) or ``"fork"`` (workers
        are copies of this process as it is when the pool is created; warns if other
        threads run, as forking them can deadlock; native engine only).
    :param engine: ``"native"`` (Linux: a guardian helper, lean workers, zero-copy data),
        ``"billiard"`` (a billiard pool in a lean helper: portable, e.g. macOS), or None: native
        where the machine has what it needs, billiard elsewhere (logged, with why).
    :param item_timeout: seconds an item may run; past it the worker (and everything it
        started) is killed and replaced, and the item fails with ``ItemTimeoutError``.
    :param item_soft_timeout: seconds after which ``ItemSoftTimeoutError`` is raised inside the
        running item, so it can clean up (close a browser, a connection); an item that catches
        it and returns succeeds. Below ``item_timeout`` when both are given.
    :param max_tasks_per_child: items a worker runs before it is replaced (items, not
        ``submit`` calls or chunks).
    :param max_memory_per_child: MiB of resident memory after which a worker is replaced
        (checked after each item).
    :param initializer: called with ``initargs`` in each worker when it starts; if it
        raises, the pool breaks (``BrokenPoolError``) instead of restarting workers forever.
    :param log: receives each line that workers print or log, tagged ``[item 17] ...``;
        default: this process's ``sys.stderr``.
    :param progress: receives ``(done, total)`` as the items of a map finish; ``total`` is
        None when the input has no length.
    :param preload: modules to import once in the helper the workers are forked from
        (``forkserver``, native engine), so that every worker starts with them instead of
        importing them itself. The modules a mapped or submitted callable refers to are
        preloaded without being named here; name those it imports inside its body.
    :param context_resolver: for a pool used inside an Airflow task: ``resolver(kind, key)``
        with ``kind`` ``"variable"`` or ``"connection"``, called in this process to answer
        ``Variable.get`` and connection lookups (hooks) made in workers, once per distinct key
        (see :mod:`~airflow_provider_safeproc.context_channel`; the operators pass
        :func:`~airflow_provider_safeproc.operators.task_context_resolver`). Without it those
        lookups raise ``TaskContextUnavailableError`` in workers, as XComs always do.
    :raises ConfigurationError: (a ValueError) for any argument that can never work,
        before a process is started.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        mp_context: Any = None,
        start_method: StartMethod | None = None,
        engine: EngineName | None = None,
        item_timeout: float | None = None,
        item_soft_timeout: float | None = None,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: float | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        log: Callable[[str], None] | None = None,
        progress: Callable[[int, int | None], None] | None = None,
        preload: Iterable[str] = (),
        context_resolver: ContextResolver | None = None,
    ) -> None:
        workers = check_positive_int("max_workers", max_workers)
        self._max_workers = workers if workers is not None else effective_cpu_count()
        method = start_method_of_context(mp_context, start_method) or DEFAULT_START_METHOD
        if method == "fork" and not hasattr(os, "fork"):
            raise ConfigurationError("start_method='fork' needs os.fork, which this platform lacks")
        self._engine_name, self._engine_reason = choose_engine(check_engine(engine))
        if self._engine_name == "billiard" and method == "fork":
            raise ConfigurationError(
                "start_method='fork' (workers that are copies of this process) is not available with the "
                "billiard engine, whose workers start from a lean helper process: use 'forkserver' or 'spawn'"
            )
        self._item_timeout, soft_timeout = check_item_timeouts(item_timeout, item_soft_timeout)
        max_tasks = check_positive_int("max_tasks_per_child", max_tasks_per_child)
        max_memory = check_positive_number("max_memory_per_child", max_memory_per_child)
        check_callable("initializer", initializer, allow_none=True)
        check_tuple("initargs", initargs)
        check_callable("log", log, allow_none=True)
        check_callable("progress", progress, allow_none=True)
        preload_modules = check_module_names("preload", preload)
        check_callable("context_resolver", context_resolver, allow_none=True)
        context = pool_context(context_resolver, initializer, initargs)  # a channel for Variables...
        initializer, initargs = context.initializer, context.initargs
        self._context_server = context.server
        if context.server is not None:
            weakref.finalize(self, context.server.close)
        init_blob: bytes | None = None
        shared_fds: tuple[int, ...] = ()
        inherited: tuple[Callable[..., Any], tuple[Any, ...]] | None = None
        if initializer is not None:
            register_unimportable_modules(initializer, *initargs)
            if method == "fork":  # as the stdlib's fork: the objects themselves, inherited
                inherited, shared_fds = (initializer, initargs), find_shared_fds(initargs)
            else:
                init_blob, shared_fds = pickle_for_workers(
                    (initializer, initargs), what="initializer and initargs"
                )
        if method == "fork":
            _warn_about_threads()
        self._progress = progress
        self._last_job: Job | None = None
        self._readers: weakref.WeakSet[InputReader] = weakref.WeakSet()  # maps still being read
        self._submitted = 0
        config = WorkerConfig(
            sys_path=list(sys.path),
            log_level=logging.getLogger().getEffectiveLevel(),
            initializer=init_blob,
            max_tasks=max_tasks,
            max_memory=None if max_memory is None else int(max_memory * 1024 * 1024),
            stamp_every_item=self._item_timeout is not None
            or soft_timeout is not None
            or max_memory is not None,
            item_soft_timeout=soft_timeout,
            # An initializer may name what workers need in their environment before anything
            # is imported (refuse_task_context: Airflow without its database), and the
            # task-context channel's address: the helper the workers are forked from gets it
            # too, for what it preloads.
            environment=context.environment,
            authkey=bytes(multiprocessing.current_process().authkey),
            shared_fds=shared_fds,
        )
        self._queue = WorkQueue(log=log or _default_log, item_timeout=self._item_timeout)
        settings = EngineSettings(self._max_workers, method, self._item_timeout, config, inherited)
        _logger.info("engine %r (%s)", self._engine_name, self._engine_reason)
        engine_ = create_engine(self._engine_name, self._queue, settings)
        self._engine = engine_
        _live_engines.add(engine_)
        forget_in_forked_child(engine_)
        engine_.preload(preload_modules)
        self._hinted: set[int] = set()  # callables whose modules the engine was told of
        engine_.start()
        if context.server is not None:
            context.server.start()
        # Garbage collection ends the pool once its queued work is done.
        self._finalizer = weakref.finalize(self, _request_stop, engine_)

    # --- properties ----------------------------------------------------------------------
    @property
    def max_workers(self) -> int:
        return self._max_workers

    @property
    def engine(self) -> str:
        """The engine that runs the pool: ``"native"`` or ``"billiard"``."""
        return self._engine_name

    @property
    def engine_reason(self) -> str:
        """Why that engine: ``"asked for"``, or why it was chosen automatically."""
        return self._engine_reason

    @property
    def worker_pids(self) -> tuple[int, ...]:
        """Pids of the worker processes alive now (they change as workers are replaced)."""
        return self._engine.worker_pids

    @property
    def summary(self) -> MapSummary | None:
        """What the last ``map``/``map_outcomes`` did so far (final once it was consumed)."""
        job = self._last_job
        return None if job is None else job.summary()

    # --- work ----------------------------------------------------------------------------
    def submit(self, fn: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_R]:
        """Schedule ``fn(*args, **kwargs)``; raises ``SerializationError`` at once if it can't be sent."""
        if _interpreter_exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        check_callable("fn", fn)
        index = self._submitted
        register_unimportable_modules(fn, *args, *kwargs.values())
        self._hint_modules(fn)
        try:
            blob, shared = dumps_sharing(
                [(fn, args, kwargs)],
                what="callable and arguments",
                item=index,
                share=self._engine.shares_buffers,
            )
        except SerializationError:
            _raise_precise_error(fn, args, kwargs, index)
            raise
        self._submitted += 1
        future: Future[_R] = Future()
        job = Job(fn_id=None, fn_blob=None, star=True, total=1, tag_offset=index, future=future)
        chunk = job.add_chunk(1, blob, shared)
        job.exhausted = True
        self._put([Dispatch(job, chunk, range(1))])
        return future

    def _hint_modules(self, fn: Callable[..., Any]) -> None:
        """Tell the engine what ``fn`` will import in the workers (see :mod:`.preload`): once
        per function's code, since a submit loop must not pay it per call."""
        key = id(getattr(fn, "__code__", fn))
        if key not in self._hinted:
            self._hinted.add(key)
            try:
                modules = modules_referred_to(fn)
            except Exception:  # an odd global (a lazy proxy): only an optimisation is lost
                return
            self._engine.preload(modules)

    def _put(self, dispatches: list[Dispatch]) -> None:
        self._queue.put(dispatches)
        self._engine.wake()

    def map(
        self,
        fn: Callable[..., _R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
    ) -> Iterator[_R]:
        """Like ``Executor.map``: results in input order; the first error (in order) is raised.

        The input is read lazily, ``buffersize`` chunks ahead of the caller (see
        :meth:`map_outcomes`); an item that cannot be serialized raises ``SerializationError``
        when the iteration reaches it. Leaving the iterator early stops the reading and
        cancels the items not yet started. ``timeout`` counts from this call. Each result is
        let go once handed out, so big results can be freed as the caller goes.
        """
        check_positive_number("timeout", timeout)
        if len(iterables) == 1:  # no 1-tuples to build, pickle and unpack: fn(item)
            reader = self._start_map(
                fn, iter(iterables[0]), length_of(*iterables), chunksize, buffersize, star=False
            )
        else:
            rows = zip(*iterables)  # noqa: B905 - stops at the shortest iterable, like Executor.map
            reader = self._start_map(fn, rows, length_of(*iterables), chunksize, buffersize, star=True)
        deadline = None if timeout is None else reader.job.started + timeout
        return results.MapResults.over(results.result_runs(reader, deadline, lambda: self._leave(reader)))

    def map_outcomes(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[Any],
        *,
        chunksize: int | None = None,
        buffersize: int | None = None,
        retries: int = 0,
        stop_on_error: bool = False,
    ) -> Iterator[ItemOutcome]:
        """Run ``fn(item)`` for each item; yield one :class:`ItemOutcome` per item, in input order.

        Never raises for an item: its error is in the outcome. ``retries`` re-runs an item
        that raised, timed out or lost its worker, up to that many more times.
        ``stop_on_error``: after the first failure (retries spent) the input is no longer
        read and items read but not started never run; they are still yielded, in order, as
        outcomes with ``ok=False``, ``error=CancelledError()`` and ``attempts=0``. Items
        already running finish.

        ``items`` is read lazily, in the caller's thread: at most ``buffersize`` chunks
        (default: 4 per worker) are read and not yet handed back, so an endless generator
        works and memory stays flat. ``chunksize`` (items per chunk) defaults to an equal
        share per worker for an input with a length; without one, chunks grow from one item
        as the measured speed allows.
        """
        reader = self._start_outcomes(
            fn, items, chunksize, buffersize, retries, stop_on_error, unordered=False
        )
        return results.ordered_outcomes(reader, lambda: self._leave(reader))

    def map_unordered(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[Any],
        *,
        chunksize: int | None = None,
        buffersize: int | None = None,
        retries: int = 0,
        stop_on_error: bool = False,
    ) -> Iterator[ItemOutcome]:
        """:meth:`map_outcomes`, yielding each outcome as soon as its item finishes.

        Every item read is yielded exactly once; ``ItemOutcome.index`` says which it was. A
        slow item holds nothing up: the window moves on as outcomes are taken.
        """
        reader = self._start_outcomes(
            fn, items, chunksize, buffersize, retries, stop_on_error, unordered=True
        )
        return results.unordered_outcomes(reader, lambda: self._leave(reader))

    def _start_outcomes(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[Any],
        chunksize: int | None,
        buffersize: int | None,
        retries: int,
        stop_on_error: bool,
        *,
        unordered: bool,
    ) -> InputReader:
        check_non_negative_int("retries", retries)
        return self._start_map(
            fn,
            iter(items),
            length_of(items),
            chunksize,
            buffersize,
            retries=retries,
            stop_on_error=stop_on_error,
            unordered=unordered,
        )

    def _start_map(
        self,
        fn: Callable[..., Any],
        items: Iterator[Any],
        total: int | None,
        chunksize: int | None,
        buffersize: int | None,
        *,
        star: bool = False,
        retries: int = 0,
        stop_on_error: bool = False,
        unordered: bool = False,
    ) -> InputReader:
        """Check the arguments, queue the first window; the reader that reads the rest."""
        size = check_positive_int("chunksize", chunksize)
        window = check_positive_int("buffersize", buffersize) or WINDOW_PER_WORKER * self._max_workers
        check_callable("fn", fn)
        self._queue.state.check_accepting()
        register_unimportable_modules(fn)
        self._hint_modules(fn)
        job = Job(
            fn_id=new_fn_id(),
            fn_blob=dumps(fn, what="callable"),
            star=star,
            total=total,
            retries=retries,
            stop_on_error=bool(stop_on_error),
            unordered=unordered,
            progress=self._progress,
        )
        self._last_job = job
        reader = InputReader(
            job,
            items,
            sizing=ChunkSizing(size, total, self._max_workers),
            window=window,
            send=self._put,
            wake=self._engine.wake,
            share_buffers=self._engine.shares_buffers,
        )
        self._readers.add(reader)
        reader.fill()
        return reader

    def _leave(self, reader: InputReader) -> None:
        """The caller stopped iterating (done, or left early): read nothing more, and items
        read but not started are not worth running."""
        reader.stop()
        self._readers.discard(reader)
        job = reader.job
        if not job.complete:
            job.cancelled = True
            self._engine.wake()

    # --- ending --------------------------------------------------------------------------
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; end the workers once queued work is done (or cancelled).

        With ``wait``, returns when every worker and every process they started has ended.
        A map still being iterated has the rest of its input read now and queued, as the
        stdlib's ``Executor.map`` had done at the call; with ``cancel_futures`` it is not read,
        and iterating it raises ``CancelledError`` where what was read ends.
        """
        self._stop_reading(cancel=cancel_futures)
        _request_stop(self._engine, cancel=cancel_futures)
        if wait:
            self._engine.join()
            self._close_context_server()

    def terminate(self) -> None:
        """End now: items not started are cancelled, running ones fail with ``BrokenPoolError``;
        workers and their descendants get SIGTERM, then SIGKILL after a grace. Blocks until done.
        """
        self._stop_reading(cancel=True)
        _request_stop(self._engine, terminate=True)
        self._engine.join()
        self._close_context_server()

    def _close_context_server(self) -> None:
        """No worker is left to ask (the engine joined)."""
        if self._context_server is not None:
            self._context_server.close()

    def _stop_reading(self, *, cancel: bool) -> None:
        if os.getpid() != self._engine.owner_pid:
            return
        for reader in list(self._readers):
            if cancel:
                reader.stop(CancelledError())
            else:
                reader.read_all()

    def kill(self) -> None:
        """SIGKILL every worker and every process they started, at once.

        Safe from a signal handler or another thread (it takes no lock and waits for
        nothing; meant for an operator's ``on_kill``). Unfinished items fail with
        ``BrokenPoolError`` and the pool accepts no more work.
        """
        self._engine.kill()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Leaving by an exception (a task being stopped, a bug) must not wait for long items.
        if exc_type is None:
            self.shutdown(wait=True)
        else:
            self.terminate()


def _request_stop(engine: Engine, *, cancel: bool = False, terminate: bool = False) -> None:
    """Ask ``engine``'s pool to stop; nothing in a forked copy of the pool's owner."""
    if os.getpid() != engine.owner_pid:
        return
    engine.queue.state.request_stop(cancel=cancel, terminate=terminate)
    engine.wake()


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


def _run_pending_work_at_exit() -> None:
    """At interpreter exit, as the stdlib's ``ProcessPoolExecutor`` does: queued work runs.

    Registered with ``threading._register_atexit``, so it runs before non-daemon threads are
    joined and before ``atexit`` handlers and ``weakref`` finalizers, while every pool is still
    whole. Pools stop once their queued work is done; ``submit`` refuses new work from here on.
    """
    global _interpreter_exiting
    _interpreter_exiting = True
    engines = list(_live_engines)
    for engine in engines:
        _request_stop(engine)
    for engine in engines:
        engine.join()


threading._register_atexit(_run_pending_work_at_exit)  # type: ignore[attr-defined]
