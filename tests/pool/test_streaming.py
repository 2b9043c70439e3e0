"""The input window: maps read their input lazily, a bounded number of chunks ahead.

Both engines have it (it belongs to the executor's front). The input is a generator that
counts what was read, so each test sees exactly how far ahead the pool went.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import CancelledError

import pytest

from airflow_provider_safeproc import SafeProcessPoolExecutor
from airflow_provider_safeproc.errors import ConfigurationError, SerializationError
from tests.harness.pool_kinds import POOL_KINDS

ENGINES = sorted({kind.engine for kind in POOL_KINDS})


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Counted:
    """An input that records how many items were taken from it."""

    def __init__(self, items):
        self.read = 0
        self._items = iter(items)

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._items)
        self.read += 1
        return item


class Unpicklable:
    def __reduce__(self):
        raise TypeError("Unpicklable refuses to be pickled")


def double(x):
    return 2 * x


def slow_double(x):
    time.sleep(0.2)
    return 2 * x


def test_an_endless_input_gives_results_as_it_goes_and_is_read_a_window_ahead(engine):
    source = Counted(itertools.count())
    with SafeProcessPoolExecutor(2, engine=engine) as pool:
        results = pool.map(double, source, chunksize=4, buffersize=3)
        assert source.read == 3 * 4 + 1  # three chunks, and one item read ahead to know there is more
        for taken, value in enumerate(results, start=1):
            assert value == 2 * (taken - 1)
            # never more than the window beyond the chunk being handed out
            assert source.read <= (taken // 4 + 1 + 3) * 4 + 1
            if taken == 1000:
                break
        read_when_left = source.read
        del results
        time.sleep(0.1)
    assert source.read == read_when_left  # leaving stops the reading


def test_the_first_result_arrives_before_a_long_input_is_read():
    source = Counted(range(10_000_000))
    with SafeProcessPoolExecutor(2) as pool:
        results = pool.map(double, source)
        assert next(results) == 0
        assert source.read < 10_000_000 // 10
        results.close()


def test_an_item_that_cannot_be_serialized_fails_alone_where_iteration_reaches_it(engine):
    with SafeProcessPoolExecutor(2, engine=engine) as pool:
        results = pool.map(double, Counted([1, 2, Unpicklable(), 4]), chunksize=2)
        assert [next(results), next(results)] == [2, 4]
        with pytest.raises(SerializationError, match="item 2") as info:
            next(results)
        assert info.value.item == 2
        outcomes = list(pool.map_outcomes(double, Counted([1, Unpicklable(), 3]), chunksize=3))
    assert [o.ok for o in outcomes] == [True, False, True]
    assert isinstance(outcomes[1].error, SerializationError)
    assert outcomes[2].value == 6


def test_an_input_that_raises_ends_the_map_there_with_its_error(engine):
    def failing_input():
        yield from range(5)
        raise ValueError("the input broke after 5 items")

    with SafeProcessPoolExecutor(2, engine=engine) as pool:
        taken = []
        with pytest.raises(ValueError, match="after 5 items"):
            for value in pool.map(double, failing_input(), chunksize=2):
                taken.append(value)
        assert taken == [0, 2, 4, 6, 8]
        outcomes = []
        with pytest.raises(ValueError, match="after 5 items"):
            for outcome in pool.map_outcomes(double, failing_input()):
                outcomes.append(outcome.index)
        assert outcomes == [0, 1, 2, 3, 4]


def test_map_unordered_yields_each_item_once_as_it_finishes(engine):
    def sleep_then(x):
        time.sleep(0.4 if x == 0 else 0.01)
        if x == 3:
            raise KeyError(x)
        return x

    with SafeProcessPoolExecutor(2, engine=engine) as pool:
        outcomes = list(pool.map_unordered(sleep_then, Counted(range(20)), chunksize=1, buffersize=4))
    assert sorted(o.index for o in outcomes) == list(range(20))
    assert outcomes[0].index != 0  # the slow first item held nothing up
    by_index = {o.index: o for o in outcomes}
    assert isinstance(by_index[3].error, KeyError)
    assert all(by_index[i].value == i for i in range(20) if i != 3)


def test_map_unordered_with_retries_and_stop_on_error(engine, tmp_path):
    def flaky(x):
        marker = tmp_path / f"ran-{x}"
        if x % 3 == 0 and not marker.exists():
            marker.write_text("once")
            raise OSError("transient")
        return x

    with SafeProcessPoolExecutor(2, engine=engine) as pool:
        outcomes = list(pool.map_unordered(flaky, range(12), retries=1, chunksize=2))
        assert sorted((o.index, o.ok, o.attempts) for o in outcomes) == [
            (i, True, 2 if i % 3 == 0 else 1) for i in range(12)
        ]
        source = Counted(range(1000))
        stopped = list(
            pool.map_unordered(_fail_at_two, source, chunksize=1, buffersize=2, stop_on_error=True)
        )
    assert source.read < 20
    assert sorted(o.index for o in stopped) == list(range(len(stopped)))
    assert any(isinstance(o.error, ZeroDivisionError) for o in stopped), [(o.index, o.error) for o in stopped]


def _fail_at_two(x):
    if x == 2:
        raise ZeroDivisionError(x)
    time.sleep(0.05)
    return x


def test_leaving_early_stops_reading_and_never_starts_what_was_read(tmp_path):
    def mark(x):
        (tmp_path / f"ran-{x}").touch()
        time.sleep(0.3)
        return x

    source = Counted(range(3_000_000))
    with SafeProcessPoolExecutor(2) as pool:
        results = pool.map(mark, source, chunksize=1, buffersize=8)
        assert next(results) == 0
        started = time.monotonic()
        results.close()
        left_in = time.monotonic() - started
    ran = len(list(tmp_path.iterdir()))
    assert ran <= 4  # the items running when the caller left (and the first); not the window
    assert source.read <= 8 + 1
    assert left_in < 5  # leaving does not wait for the running items (generous: a shared machine)


def test_shutdown_while_a_map_is_still_iterated_reads_the_rest_like_the_stdlib(engine):
    source = Counted(range(200))
    with SafeProcessPoolExecutor(2, engine=engine) as pool:
        results = pool.map(double, source, chunksize=5, buffersize=2)
        assert source.read < 200
    assert source.read == 200  # shutdown read what the stdlib would have read at map()
    assert list(results) == [2 * i for i in range(200)]


def test_shutdown_with_cancel_futures_stops_reading_and_iteration_raises_cancelled():
    source = Counted(range(200))
    pool = SafeProcessPoolExecutor(2)
    results = pool.map(slow_double, source, chunksize=1, buffersize=2)
    pool.shutdown(wait=True, cancel_futures=True)
    assert source.read <= 3
    with pytest.raises(CancelledError):
        list(results)


def test_a_pool_that_broke_raises_where_the_map_could_read_no_further():
    source = Counted(range(100))
    pool = SafeProcessPoolExecutor(1)
    results = pool.map(slow_double, source, chunksize=1, buffersize=1)
    pool.kill()
    with pytest.raises(Exception, match="killed") as info:
        list(results)
    assert type(info.value).__name__ == "BrokenPoolError"
    assert source.read <= 3
    pool.shutdown()


def test_progress_hears_the_length_or_none_without_one():
    heard: list[tuple[int, int | None]] = []
    lock = threading.Lock()

    def progress(done, total):
        with lock:
            heard.append((done, total))

    with SafeProcessPoolExecutor(2, progress=progress) as pool:
        list(pool.map(double, range(10)))
        assert heard[-1] == (10, 10)
        list(pool.map(double, (i for i in range(10))))
        assert heard[-1] == (10, None)
        list(pool.map(pow, range(10), range(4)))  # several iterables: the shortest
        assert heard[-1] == (4, 4)


def test_buffersize_and_chunksize_are_checked_before_anything_is_read():
    source = Counted(range(10))
    with SafeProcessPoolExecutor(1) as pool:
        for bad in (0, -1, 1.5, "2"):
            with pytest.raises(ConfigurationError, match="buffersize"):
                pool.map(double, source, buffersize=bad)
            with pytest.raises(ConfigurationError, match="buffersize"):
                pool.map_unordered(double, source, buffersize=bad)
        with pytest.raises(ConfigurationError, match="chunksize"):
            pool.map_outcomes(double, source, chunksize=0)
    assert source.read == 0
