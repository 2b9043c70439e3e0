"""Code written for the stdlib's ``ProcessPoolExecutor`` works unchanged.

Manager proxies in items, ``multiprocessing`` queues, locks and events in ``initargs`` (the
usual way to send workers' logging to the parent), ``mp_context=``, the stdlib's exception
classes, and results that are freed once the caller has them. The functions here are
imported by reference in the workers (this module is on their ``sys.path``), as a user's
module would be, so the initializer and the items share its globals.
"""

from __future__ import annotations

import gc
import logging
import logging.handlers
import multiprocessing
import os
import pickle
import signal
import weakref
from concurrent.futures.process import BrokenProcessPool

import pytest

from airflow_provider_safeproc import SafeProcessPoolExecutor
from airflow_provider_safeproc.errors import ConfigurationError, SerializationError

_SHARED: tuple = ()


def _keep(*objects) -> None:
    global _SHARED
    _SHARED = objects


def _put_under_lock(x: int) -> int:
    queue, lock, event = _SHARED
    with lock:
        queue.put((x, os.getpid()))
    event.set()
    return x * 2


def _log_to_queue(queue) -> None:
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(queue)]
    root.setLevel(logging.INFO)


def _log(x: int) -> int:
    logging.getLogger("items").info("item %d says hello", x)
    return x


def _store(proxy, x: int) -> int:
    proxy[x] = os.getpid()
    return x


def _context_for(start_method: str):
    # The stdlib's rule: objects of the fork context reach fork workers only.
    return multiprocessing.get_context("fork" if start_method == "fork" else "spawn")


def test_queues_locks_and_events_reach_workers_through_initargs(pool_kind):
    ctx = _context_for(pool_kind.start_method)
    queue, lock, event = ctx.Queue(), ctx.Lock(), ctx.Event()
    with SafeProcessPoolExecutor(
        2, **pool_kind.kwargs, initializer=_keep, initargs=(queue, lock, event)
    ) as pool:
        assert list(pool.map(_put_under_lock, range(6))) == [0, 2, 4, 6, 8, 10]
    assert sorted(queue.get(timeout=10)[0] for _ in range(6)) == list(range(6))
    assert event.is_set()
    queue.close()
    queue.join_thread()


def test_workers_logging_reaches_the_parent_through_a_queue_handler(pool_kind):
    ctx = _context_for(pool_kind.start_method)
    queue = ctx.Queue()
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    listener = logging.handlers.QueueListener(queue, Collect())
    listener.start()
    try:
        with SafeProcessPoolExecutor(
            2, **pool_kind.kwargs, initializer=_log_to_queue, initargs=(queue,)
        ) as pool:
            assert list(pool.map(_log, range(3))) == [0, 1, 2]
    finally:
        listener.stop()
    assert sorted(r.getMessage() for r in records) == [f"item {i} says hello" for i in range(3)]


def test_objects_of_the_fork_context_are_refused_where_the_stdlib_refuses_them(pool_kind):
    if pool_kind.start_method == "fork":
        pytest.skip("with start_method='fork' they are accepted: the workers inherit them")
    lock = multiprocessing.get_context("fork").Lock()
    with pytest.raises(ConfigurationError, match=r"made by the 'fork' context.*start_method='fork'"):
        SafeProcessPoolExecutor(1, **pool_kind.kwargs, initializer=_keep, initargs=(lock,))


def test_a_queue_as_an_items_argument_is_refused_with_the_alternative():
    with SafeProcessPoolExecutor(1) as pool, pytest.raises(SerializationError) as info:
        pool.submit(_keep, multiprocessing.get_context("spawn").Queue())
    assert "through inheritance" in str(info.value)
    assert "initargs" in str(info.value)
    assert "multiprocessing.Manager()" in str(info.value)


def test_manager_proxies_work_in_items(pool_kind):
    with multiprocessing.get_context("spawn").Manager() as manager:
        shared = manager.dict()
        with SafeProcessPoolExecutor(2, **pool_kind.kwargs) as pool:
            assert sorted(pool.map(_store, [shared] * 4, range(4))) == [0, 1, 2, 3]
        assert sorted(shared.keys()) == [0, 1, 2, 3]


def test_mp_context_gives_the_start_method(start_method):
    with SafeProcessPoolExecutor(1, mp_context=multiprocessing.get_context(start_method)) as pool:
        assert pool.submit(pow, 2, 3).result(timeout=30) == 8
    with pytest.raises(ConfigurationError, match="disagree"):
        SafeProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), start_method="fork")


def _die(_: int) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _unpicklable_result(_: int):
    return (x for x in ())  # a generator: cannot be pickled


def test_stdlib_handlers_catch_the_equivalent_errors():
    with SafeProcessPoolExecutor(1) as pool:
        with pytest.raises(BrokenProcessPool):  # a lost worker
            pool.submit(_die, 0).result(timeout=30)
        with pytest.raises(pickle.PicklingError):  # an argument that cannot be serialized
            pool.submit(len, (_ for _ in ()))
        with pytest.raises(pickle.PicklingError):  # a result that cannot be serialized
            pool.submit(_unpicklable_result, 0).result(timeout=30)
        assert pool.submit(pow, 2, 3).result(timeout=30) == 8  # and the pool goes on
    pool.kill()
    with pytest.raises(BrokenProcessPool):  # a broken pool
        pool.submit(pow, 2, 3)


class _Big:
    """A result the caller drops: it must be freed, not kept by the map."""

    def __init__(self, i: int) -> None:
        self.i = i


def _big(i: int) -> _Big:
    return _Big(i)


def test_map_lets_go_of_each_result_once_handed_out():
    with SafeProcessPoolExecutor(2) as pool:
        results = pool.map(_big, range(10))
        freed = 0
        for result in results:
            ref = weakref.ref(result)
            del result
            gc.collect()
            freed += ref() is None
    assert freed == 10


def test_map_outcomes_lets_go_of_each_outcome_once_handed_out():
    with SafeProcessPoolExecutor(2) as pool:
        freed = 0
        for outcome in pool.map_outcomes(_big, range(10)):
            ref = weakref.ref(outcome.value)
            del outcome
            gc.collect()
            freed += ref() is None
    assert freed == 10
