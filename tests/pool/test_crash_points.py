"""Crash, exit and error injected at each step of an item's life: one clear error, no hang.

The matrix CPython's own suite runs against ``ProcessPoolExecutor`` (test_deadlock.py), for
each start method. Where the stdlib breaks the whole pool, this one fails the item alone:
each case checks the item's error, that the pool still works after it, and (through the
autouse fixture) that no process is left.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import subprocess
import sys
import textwrap
import time
from concurrent.futures.process import BrokenProcessPool

import cloudpickle
import pytest

from airflow_provider_safeproc import SafeProcessPoolExecutor
from airflow_provider_safeproc.errors import (
    DeserializationError,
    SerializationError,
    WorkerLostError,
)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 30


@pytest.fixture
def pool(pool_kind):
    with SafeProcessPoolExecutor(2, **pool_kind.kwargs, log=lambda line: None) as pool:
        yield pool
        assert pool.submit(pow, 2, 3).result(timeout=TIMEOUT) == 8, "the pool must go on"


def _crash() -> None:
    faulthandler.disable()
    faulthandler._sigsegv()


def _os_exit() -> None:
    os._exit(3)


def _sys_exit() -> None:
    sys.exit(1)


def _raise() -> None:
    raise ValueError("boom while unpickling")


class CrashAtUnpickle:
    def __reduce__(self):
        return _crash, ()


class OsExitAtUnpickle:
    def __reduce__(self):
        return _os_exit, ()


class SysExitAtUnpickle:
    def __reduce__(self):
        return _sys_exit, ()


class ErrorAtUnpickle:
    def __reduce__(self):
        return _raise, ()


class CrashAtPickle:
    def __reduce__(self):
        _crash()


class OsExitAtPickle:
    def __reduce__(self):
        os._exit(4)


class SysExitAtPickle:
    def __reduce__(self):
        sys.exit(1)


class ErrorAtPickle:
    def __reduce__(self):
        raise pickle.PicklingError("boom while pickling")


def _return_instance(cls):
    return cls()


# --- in the worker: loading the arguments ------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "exitcode"), [(CrashAtUnpickle(), -11), (OsExitAtUnpickle(), 3)], ids=["crash", "os_exit"]
)
def test_death_while_loading_the_arguments_fails_the_item(pool, obj, exitcode):
    future = pool.submit(id, obj)
    with pytest.raises(WorkerLostError) as info:
        future.result(timeout=TIMEOUT)
    assert isinstance(info.value, BrokenProcessPool)  # caught where the stdlib's error is
    assert info.value.exitcode == exitcode
    assert info.value.during == "loading"
    assert "while loading the arguments of item 0" in str(info.value)


@pytest.mark.parametrize(
    ("obj", "reason"),
    [(ErrorAtUnpickle(), "ValueError: boom while unpickling"), (SysExitAtUnpickle(), "SystemExit: 1")],
    ids=["error", "sys_exit"],
)
def test_error_while_loading_the_arguments_fails_the_item(pool, obj, reason):
    future = pool.submit(id, obj)
    with pytest.raises(DeserializationError) as info:
        future.result(timeout=TIMEOUT)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert info.value.item == 0
    assert "cannot deserialize the arguments of item 0 in worker" in str(info.value)
    assert reason in str(info.value)


def test_an_unloadable_argument_fails_only_its_item_of_a_map(pool):
    outcomes = list(pool.map_outcomes(id, [1, ErrorAtUnpickle(), 3], chunksize=1))
    assert [o.ok for o in outcomes] == [True, False, True]
    assert isinstance(outcomes[1].error, DeserializationError)
    assert outcomes[1].error.item == 1


# --- in the worker: the call -------------------------------------------------------------


@pytest.mark.parametrize(("fn", "exitcode"), [(_crash, -11), (_os_exit, 3)], ids=["crash", "os_exit"])
def test_death_in_the_call_fails_the_item(pool, fn, exitcode):
    with pytest.raises(WorkerLostError) as info:
        pool.submit(fn).result(timeout=TIMEOUT)
    assert info.value.exitcode == exitcode
    assert "while running item 0" in str(info.value)


def test_sys_exit_in_the_call_is_the_items_outcome(pool):
    with pytest.raises(SystemExit):
        pool.submit(_sys_exit).result(timeout=TIMEOUT)


def test_exception_in_the_call_is_the_items_outcome(pool):
    with pytest.raises(ValueError, match="boom while unpickling"):
        pool.submit(_raise).result(timeout=TIMEOUT)


# --- in the worker: serializing the result -----------------------------------------------


@pytest.mark.parametrize(
    ("cls", "exitcode"), [(CrashAtPickle, -11), (OsExitAtPickle, 4)], ids=["crash", "os_exit"]
)
def test_death_while_serializing_the_result_fails_the_item(pool, cls, exitcode):
    future = pool.submit(_return_instance, cls)
    with pytest.raises(WorkerLostError) as info:
        future.result(timeout=TIMEOUT)
    assert info.value.exitcode == exitcode
    assert info.value.during == "sending"
    assert "while serializing the result of item 0" in str(info.value)


@pytest.mark.parametrize(
    ("cls", "reason"),
    [(ErrorAtPickle, "PicklingError: boom while pickling"), (SysExitAtPickle, "SystemExit: 1")],
    ids=["error", "sys_exit"],
)
def test_error_while_serializing_the_result_fails_the_item(pool, cls, reason):
    future = pool.submit(_return_instance, cls)
    with pytest.raises(SerializationError) as info:
        future.result(timeout=TIMEOUT)
    assert isinstance(info.value, pickle.PicklingError)
    assert "cannot serialize the result of item 0" in str(info.value)
    assert reason in str(info.value)


def _tiny(x):
    """Fast enough to run in unstamped segments; two items carry bad results."""
    if x == 150:
        return CrashAtPickle()
    if x == 170:
        return ErrorAtUnpickle()
    return x


def test_a_bad_result_among_tiny_items_fails_only_its_item(pool):
    """Results of tiny items are pickled together: a death there, or a batch the parent cannot
    load, re-runs the batch with a result pickled per item, which pins the one at fault."""
    outcomes = list(pool.map_outcomes(_tiny, range(300)))
    failed = {o.index: o.error for o in outcomes if not o.ok}
    assert sorted(failed) == [150, 170]
    assert isinstance(failed[150], WorkerLostError)
    assert failed[150].during == "sending"
    assert isinstance(failed[170], DeserializationError)
    assert [o.value for o in outcomes if o.ok] == [x for x in range(300) if x not in (150, 170)]


def _crash_with_data(data):
    _crash()


def test_crash_while_a_large_argument_is_in_flight(pool):
    data = "a" * (4 << 20)  # more than a pipe or socket buffer holds
    with pytest.raises(WorkerLostError):
        list(pool.map(_crash_with_data, [data] * 6))
    outcomes = list(pool.map_outcomes(_crash_with_data, [data] * 4))
    assert all(isinstance(o.error, WorkerLostError) for o in outcomes)


# --- in the parent -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "reason"),
    [(ErrorAtPickle(), "boom while pickling"), (SysExitAtPickle(), "SystemExit: 1")],
    ids=["error", "sys_exit"],
)
def test_unserializable_argument_is_raised_from_submit(pool, obj, reason):
    with pytest.raises(SerializationError) as info:
        pool.submit(id, obj)
    assert isinstance(info.value, pickle.PicklingError)
    assert "cannot serialize the argument of item 0" in str(info.value)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("cls", "reason"),
    [(ErrorAtUnpickle, "ValueError: boom while unpickling"), (SysExitAtUnpickle, "SystemExit: 1")],
    ids=["error", "sys_exit"],
)
def test_result_that_cannot_be_rebuilt_in_the_parent_fails_only_its_item(pool, cls, reason):
    future = pool.submit(_return_instance, cls)
    with pytest.raises(DeserializationError) as info:
        future.result(timeout=TIMEOUT)
    assert "cannot deserialize the result of item 0 in the pool's process" in str(info.value)
    assert reason in str(info.value)
    outcomes = list(pool.map_outcomes(_return_instance, [int, cls, float], chunksize=3))
    assert [o.ok for o in outcomes] == [True, False, True]


# --- stopping early, at any moment -------------------------------------------------------

_EVERYDAY = """
import sys
from airflow_provider_safeproc import SafeProcessPoolExecutor
for _ in range({n}):
    with SafeProcessPoolExecutor(2, engine={engine!r}, start_method={method!r}) as ex:
        future = ex.submit(pow, 2, 3)
    assert future.result(timeout=0) == 8, future
    with SafeProcessPoolExecutor(2, engine={engine!r}, start_method={method!r}) as ex:
        futures = [ex.submit(pow, 2, i) for i in range(5)]
        ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() or f.result(timeout=30) == 2 ** i for i, f in enumerate(futures))
print("done")
"""


@pytest.mark.parametrize("load", [False, True], ids=["idle", "loaded"])
def test_leaving_the_with_block_at_once_runs_the_work(pool_kind, load):
    """Shutdown right after submit, before the pool's helper process even started: the
    queued work runs (or, with cancel_futures, is cancelled), whatever the timing. Looped,
    because the window is a few milliseconds wide; once with both cores busy."""
    burners = []
    if load:
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        # The window is in the engine's start: looped 15 times on the native engine, whose pools
        # start in milliseconds; 5 on billiard's, whose helper imports billiard first.
        n = 15 if pool_kind.engine == "native" else 5
        code = _EVERYDAY.format(n=n, engine=pool_kind.engine, method=pool_kind.start_method)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"


def test_work_submitted_and_never_waited_for_runs_at_exit(pool_kind, tmp_path):
    """As the stdlib does: pending work runs when the interpreter exits, and the pool writes
    nothing into descriptors it no longer owns (a file opened late must stay as written)."""
    code = textwrap.dedent(
        f"""
        from airflow_provider_safeproc import SafeProcessPoolExecutor
        SafeProcessPoolExecutor(2, engine={pool_kind.engine!r}, start_method={pool_kind.start_method!r}).submit(print, "apple", flush=True)
        pool = SafeProcessPoolExecutor(2, engine={pool_kind.engine!r}, start_method={pool_kind.start_method!r})
        pool.submit(print, "pear", flush=True)
        late = open({str(tmp_path / "late.txt")!r}, "w")
        late.write("untouched")
        late.flush()
        """
    )
    for _ in range(3):
        # (with fork, the second pool warns about the first one's thread: not what this checks)
        argv = [sys.executable, "-W", "ignore::RuntimeWarning", "-c", code]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        lines = sorted(proc.stderr.splitlines())
        assert lines == ["[item 0] apple", "[item 0] pear"], proc.stderr
        assert (tmp_path / "late.txt").read_text() == "untouched"


def test_submit_after_interpreter_shutdown_raises_runtime_error(pool_kind):
    code = textwrap.dedent(
        f"""
        import atexit
        from airflow_provider_safeproc import SafeProcessPoolExecutor
        pool = SafeProcessPoolExecutor(1, engine={pool_kind.engine!r}, start_method={pool_kind.start_method!r})

        def late():
            try:
                pool.submit(pow, 2, 3)
            except RuntimeError as exc:
                print("refused:", exc)

        atexit.register(late)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "refused: cannot schedule new futures after interpreter shutdown" in proc.stdout


def test_shutdown_while_a_worker_crashes_does_not_hang(pool_kind):
    with SafeProcessPoolExecutor(2, **pool_kind.kwargs) as pool:
        future = pool.submit(time.sleep, 0.1)
        crash = pool.submit(_crash)
        pool.shutdown(wait=True)
    assert future.result(timeout=0) is None
    with pytest.raises(WorkerLostError):
        crash.result(timeout=0)
