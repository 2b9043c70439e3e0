"""SafeProcessPoolExecutor: the Executor contract, shipping code and data, errors, sinks.

Written once and run for each engine and start method through the ``pool_kind`` fixture (loky's
idea, without copied files). Functions here are shipped by value (see below), so workers
never import this module or pytest.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import CancelledError

import cloudpickle
import pytest

from airflow_provider_safeproc import MapSummary, SafeProcessPoolExecutor
from airflow_provider_safeproc.errors import (
    BrokenPoolError,
    ConfigurationError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
)
from airflow_provider_safeproc.pool.jobs import ItemOutcome

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def pool(pool_kind: str):
    with SafeProcessPoolExecutor(2, **pool_kind.kwargs) as executor:
        yield executor


def square(x):
    return x * x


def add(x, y):
    return x + y


def fail_on_odd(x):
    if x % 2:
        raise ValueError(f"odd {x}")
    return x


class NeedsTwoArgs(Exception):
    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")
        self.code = code


class Unpicklable:
    def __reduce__(self):
        raise TypeError("Unpicklable refuses to be pickled")


# --- the Executor contract ---------------------------------------------------------------


def test_submit_and_futures_work_with_as_completed_and_wait(pool):
    futures = [pool.submit(add, i, y=10) for i in range(6)]
    assert sorted(f.result(timeout=30) for f in concurrent.futures.as_completed(futures, timeout=30)) == list(
        range(10, 16)
    )
    done, not_done = concurrent.futures.wait(futures, timeout=30)
    assert len(done) == 6
    assert not not_done


def test_map_keeps_input_order_and_zips_iterables(pool):
    assert list(pool.map(add, range(50), range(100, 150))) == [i + 100 + i for i in range(50)]
    assert list(pool.map(square, range(7), chunksize=3)) == [i * i for i in range(7)]
    assert list(pool.map(square, [])) == []


def test_map_raises_the_first_error_in_order(pool):
    results = pool.map(fail_on_odd, [0, 2, 3, 4, 5])
    assert next(results) == 0
    assert next(results) == 2
    with pytest.raises(ValueError, match="odd 3"):
        next(results)


def test_map_timeout_counts_from_the_call():
    with SafeProcessPoolExecutor(1) as pool:
        results = pool.map(time.sleep, [0.0, 1.5], timeout=0.5)
        assert next(results) is None
        with pytest.raises(TimeoutError):
            next(results)


def test_map_outcomes_reports_each_item_once_in_order(pool):
    outcomes = list(pool.map_outcomes(fail_on_odd, range(20), chunksize=3))
    assert [o.index for o in outcomes] == list(range(20))
    for o in outcomes:
        assert isinstance(o, ItemOutcome)
        assert o.attempts == 1
        if o.index % 2:
            assert not o.ok
            assert isinstance(o.error, ValueError)
        else:
            assert o.ok
            assert o.value == o.index
            assert o.error is None


def test_stop_on_error_stops_reading_and_yields_what_was_read_as_cancelled():
    def item(x):
        if x == 1:
            raise RuntimeError("first failure")
        time.sleep(0.05)
        return x

    read: list[int] = []

    def items():
        for x in range(100):
            read.append(x)
            yield x

    with SafeProcessPoolExecutor(1) as pool:
        outcomes = list(pool.map_outcomes(item, items(), chunksize=1, buffersize=4, stop_on_error=True))
    assert [o.index for o in outcomes] == list(range(len(outcomes)))
    assert len(read) < 10  # the window and the item read ahead; never the whole input
    assert len(outcomes) <= len(read)
    assert outcomes[0].ok
    assert not outcomes[1].ok
    cancelled = [o for o in outcomes[2:] if isinstance(o.error, CancelledError)]
    assert cancelled, "items after the failure should not have been run"
    assert all(o.attempts == 0 and not o.ok for o in cancelled)


def test_retries_rerun_items_that_raised(tmp_path):
    def flaky(x):
        marker = tmp_path / f"ran-{x}"
        if not marker.exists():
            marker.write_text("once")
            raise OSError("transient")
        return x

    with SafeProcessPoolExecutor(2) as pool:
        outcomes = list(pool.map_outcomes(flaky, range(4), retries=1))
        summary = pool.summary
    assert [(o.ok, o.value, o.attempts) for o in outcomes] == [(True, i, 2) for i in range(4)]
    assert summary.retries == 4
    assert summary.failures == 0


def test_cancelled_future_never_runs(tmp_path):
    with SafeProcessPoolExecutor(1) as pool:
        blocker = pool.submit(time.sleep, 0.5)
        doomed = pool.submit((tmp_path / "ran").write_text, "x")
        assert doomed.cancel()
        blocker.result(timeout=30)
        assert concurrent.futures.wait([doomed], timeout=10).done == {doomed}
    assert doomed.cancelled()
    assert not (tmp_path / "ran").exists()


def test_shutdown_rejects_new_work_and_cancel_futures_cancels_queued():
    pool = SafeProcessPoolExecutor(1)
    first = pool.submit(time.sleep, 0.5)
    queued = [pool.submit(square, i) for i in range(5)]
    deadline = time.monotonic() + 30
    while not first.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.shutdown(wait=True, cancel_futures=True)
    assert first.result() is None
    assert all(f.cancelled() for f in queued)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(square, 1)


# --- shipping code and data --------------------------------------------------------------


def test_lambdas_and_closures(pool):
    offset = 41
    assert pool.submit(lambda: offset + 1).result(timeout=30) == 42
    assert list(pool.map(lambda x: x + offset, [1, 2])) == [42, 43]


def test_function_from_a_dag_file_module(pool, tmp_path):
    """Functions in Airflow DAG files live in ``unusual_prefix_*`` modules no worker can import."""
    path = tmp_path / "my_dag.py"
    path.write_text("FACTOR = 3\n\ndef triple(x):\n    return x * FACTOR\n")
    name = "unusual_prefix_0123456789abcdef_my_dag"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    sys.modules[name] = module
    try:
        assert list(pool.map(module.triple, [1, 2])) == [3, 6]
        assert pool.submit(module.triple, 5).result(timeout=30) == 15
    finally:
        del sys.modules[name]


def test_each_chunk_is_serialized_once(pool):
    class Counted:
        pickles = 0

        def __init__(self, value):
            self.value = value

        def __reduce__(self):
            type(self).pickles += 1
            return (int, (self.value,))

    items = [Counted(i) for i in range(40)]
    assert list(pool.map(square, items, chunksize=7)) == [i * i for i in range(40)]
    assert Counted.pickles == 40


def test_unpicklable_argument_fails_that_item_where_iteration_reaches_it(pool):
    results = pool.map(square, [1, 2, Unpicklable(), 4], chunksize=2)
    assert next(results) == 1
    assert next(results) == 4
    with pytest.raises(SerializationError) as info:
        next(results)
    assert info.value.item == 2
    assert "Unpicklable" in str(info.value)
    assert "item 2" in str(info.value)
    outcomes = list(pool.map_outcomes(square, [1, 2, Unpicklable(), 4], chunksize=2))
    assert [o.ok for o in outcomes] == [True, True, False, True]
    assert isinstance(outcomes[2].error, SerializationError)
    assert outcomes[3].value == 16
    with pytest.raises(SerializationError, match=r"item \d+.*_thread.lock"):
        pool.submit(square, threading.Lock())


def test_unpicklable_callable_fails_at_submit(pool):
    lock = threading.Lock()
    with pytest.raises(SerializationError, match=r"callable.*lock"):
        pool.submit(lambda: lock)
    with pytest.raises(SerializationError, match="callable"):
        pool.map_outcomes(lambda x: lock, [1])


def test_unpicklable_result_fails_only_that_item(pool):
    def result_of(x):
        return threading.Lock() if x == 1 else x

    outcomes = list(pool.map_outcomes(result_of, range(3), chunksize=3))
    assert [o.ok for o in outcomes] == [True, False, True]
    assert isinstance(outcomes[1].error, SerializationError)
    assert "lock" in str(outcomes[1].error)
    assert outcomes[1].error.item == 1
    with pytest.raises(SerializationError, match=r"result.*lock"):
        pool.submit(result_of, 1).result(timeout=30)


# --- failures ------------------------------------------------------------------------------


def test_exception_keeps_its_type_and_the_worker_traceback(pool):
    future = pool.submit(fail_on_odd, 3)
    with pytest.raises(ValueError, match="odd 3") as info:
        future.result(timeout=30)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "fail_on_odd" in str(cause)
    assert "ValueError: odd 3" in str(cause)


def test_exception_that_cannot_be_rebuilt_becomes_remote_error(pool):
    def raise_it():
        raise NeedsTwoArgs(7, "bad")

    with pytest.raises(RemoteError) as info:
        pool.submit(raise_it).result(timeout=30)
    assert info.value.exc_type.endswith("NeedsTwoArgs")
    assert "7: bad" in info.value.message
    assert "raise_it" in info.value.traceback


def test_initializer_runs_in_each_worker(pool_kind):
    def init(value):
        os.environ["SAFEPROC_INIT"] = value

    with SafeProcessPoolExecutor(2, **pool_kind.kwargs, initializer=init, initargs=("yes",)) as pool:
        assert set(pool.map(lambda _: os.environ.get("SAFEPROC_INIT"), range(6), chunksize=1)) == {"yes"}


def test_failing_initializer_breaks_the_pool_instead_of_looping():
    def init():
        raise KeyError("no config")

    with SafeProcessPoolExecutor(1, initializer=init) as pool:
        future = pool.submit(square, 2)
        with pytest.raises(BrokenPoolError, match=r"initializer failed.*KeyError") as info:
            future.result(timeout=30)
        assert isinstance(info.value.__cause__, KeyError)
        with pytest.raises(BrokenPoolError):
            pool.submit(square, 3)


# --- what the caller sees -----------------------------------------------------------------


def test_output_and_logging_reach_the_log_sink_tagged_with_the_item(pool_kind):
    lines: list[str] = []

    def noisy(x):
        print(f"printed {x}")
        print(f"partial {x}", end="", flush=True)
        print(f"to stderr {x}", file=sys.stderr)
        logging.getLogger("user.code").warning("logged %s", x)
        os.write(1, f"raw fd write {x}\n".encode())
        subprocess.run(["echo", f"from a subprocess {x}"], check=True)
        time.sleep(0.02)  # let the fd-level output arrive while the item still runs
        return x

    with SafeProcessPoolExecutor(2, **pool_kind.kwargs, log=lines.append) as pool:
        assert list(pool.map(noisy, range(19), chunksize=10)) == list(range(19))
    for x in (0, 17, 18):  # the tag is the item's index in the input
        assert f"[item {x}] printed {x}" in lines
        assert f"[item {x}] partial {x}" in lines
        assert f"[item {x}] to stderr {x}" in lines
        assert f"[item {x}] WARNING user.code: logged {x}" in lines
        assert f"[item {x}] raw fd write {x}" in lines
        assert f"[item {x}] from a subprocess {x}" in lines


def test_progress_sink_and_summary(pool):
    seen: list[tuple[int, int]] = []
    pool_with_progress = SafeProcessPoolExecutor(2, progress=lambda done, total: seen.append((done, total)))
    with pool_with_progress:
        outcomes = list(pool_with_progress.map_outcomes(fail_on_odd, range(30), chunksize=4))
        summary = pool_with_progress.summary
    assert len(outcomes) == 30
    assert seen[-1] == (30, 30)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert isinstance(summary, MapSummary)
    assert (summary.items, summary.failures, summary.retries) == (30, 15, 0)
    assert 1 <= len(summary.worker_pids) <= 2
    assert summary.wall_time > 0
    assert summary.items_per_second > 0
    line = str(summary)
    assert "30 items" in line
    assert "15 failed" in line
    assert "items/s" in line
    assert pool.summary is None


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_workers": 0}, "max_workers"),
        ({"max_workers": -1}, "max_workers"),
        ({"max_workers": True}, "max_workers"),
        ({"max_workers": 2.0}, "max_workers"),
        ({"max_workers": "2"}, "max_workers"),
        ({"start_method": "threads"}, "start_method.*forkserver"),
        ({"item_timeout": 0}, "item_timeout"),
        ({"item_timeout": -1.5}, "item_timeout"),
        ({"item_timeout": "5"}, "item_timeout"),
        ({"max_tasks_per_child": 0}, "max_tasks_per_child"),
        ({"max_tasks_per_child": 1.5}, "max_tasks_per_child"),
        ({"max_memory_per_child": 0}, "max_memory_per_child"),
        ({"max_memory_per_child": -10}, "max_memory_per_child"),
        ({"initializer": "not callable"}, "initializer"),
        ({"log": 3}, "log"),
    ],
)
def test_nonsense_arguments_are_rejected_before_any_process_starts(kwargs, message):
    with pytest.raises(ConfigurationError, match=message) as info:
        SafeProcessPoolExecutor(**kwargs)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("chunksize", [0, -2, 1.5, True, "3"])
def test_nonsense_chunksize_is_rejected_at_map_time(pool, chunksize):
    with pytest.raises(ConfigurationError, match="chunksize"):
        pool.map(square, range(3), chunksize=chunksize)
    with pytest.raises(ConfigurationError, match="chunksize"):
        pool.map_outcomes(square, range(3), chunksize=chunksize)


def test_default_max_workers_is_the_effective_cpu_count():
    from airflow_provider_safeproc.cpu import effective_cpu_count

    with SafeProcessPoolExecutor() as pool:
        assert pool.max_workers == effective_cpu_count()


def test_outcomes_and_errors_survive_pickling(pool):
    outcome = next(pool.map_outcomes(fail_on_odd, [1]))
    again = pickle.loads(pickle.dumps(outcome.error))
    assert isinstance(again, ValueError)


def test_dag_file_function_can_use_a_stdlib_pool_inside_a_worker(pool, tmp_path):
    """The operators wrap the callable in a partial; a DAG-file function it hands to a stdlib
    fork pool is pickled by reference there, so the worker gives its module a sys.modules entry.
    """
    import functools

    source = (
        "import multiprocessing, os\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "def pid(_):\n    return os.getpid()\n"
        "def fan_out(x):\n"
        "    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context('fork')) as inner:\n"
        "        return len(set(inner.map(pid, range(4)))) >= 1\n"
    )
    name = "unusual_prefix_0badcafe_nested_dag"
    module = types.ModuleType(name)
    exec(compile(source, str(tmp_path / "nested_dag.py"), "exec"), module.__dict__)
    sys.modules[name] = module
    try:
        wrapped = functools.partial(lambda fn, item: fn(item), module.fan_out)
        outcomes = list(pool.map_outcomes(wrapped, [1, 2]))
        assert [o.value for o in outcomes] == [True, True], [o.error for o in outcomes]
    finally:
        del sys.modules[name]
