"""Large buffers beside the pickle (``pool.buffers``): what leaves the pickle, copy-on-write, release.

The first tests take the two halves (collect and write, map and rebuild) in one process; the
rest run real pools. Shared memory is anonymous (``memfd``): "released" means no descriptor
of it is open and no mapping of it is left, in the parent and in the workers.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from airflow_provider_safeproc import SafeProcessPoolExecutor
from airflow_provider_safeproc.errors import ItemTimeoutError, SerializationError, WorkerLostError
from airflow_provider_safeproc.pool.buffers import MIN_SHARED_BYTES, BufferCollector, MappedBuffers
from tests.harness.pool_kinds import POOL_KINDS
from tests.harness.processes import wait_until

ENGINES = sorted({kind.engine for kind in POOL_KINDS})
BIG = MIN_SHARED_BYTES // 8 * 4  # float64 elements: four times the threshold


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _round_trip(obj):
    collector = BufferCollector()
    blob, start = collector.dumps(obj, what="arguments")
    shared = collector.write()
    if shared is None:
        return blob, start, None, None
    mapped = MappedBuffers(os.dup(shared.fd), shared.layout)
    return blob, start, shared, mapped.loads(blob, start)


def _memfds(pid: int | str = "self") -> list[str]:
    """The buffers' memfds a process holds open or mapped."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "safeproc-buffers" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                found.append(f"fd {fd}")
        except OSError:
            pass
    with open(f"/proc/{pid}/maps") as maps:
        found += [line.strip() for line in maps if "safeproc-buffers" in line]
    return found


# --- one process ------------------------------------------------------------------------


def test_large_buffers_leave_the_pickle_and_come_back_private_and_writable():
    array = np.arange(BIG, dtype=np.float64)
    data = b"b" * MIN_SHARED_BYTES
    mutable = bytearray(b"m" * MIN_SHARED_BYTES)
    blob, start, shared, (array2, data2, mutable2, small) = _round_trip([array, data, mutable, b"small"])
    assert len(blob) < 4096  # the data is beside the pickle, not in it
    assert start == 0
    assert len(shared.layout) == 3
    assert np.array_equal(array2, array)
    assert array2.flags.writeable
    assert data2 == data
    assert type(data2) is bytes
    assert mutable2 == mutable
    assert type(mutable2) is bytearray
    assert small == b"small"
    array2[:] = -1  # copy-on-write: neither the sender's array nor the memfd changes
    assert array[5] == 5
    again = MappedBuffers(os.dup(shared.fd), shared.layout).loads(blob, start)
    assert again[0][5] == 5
    shared.close()


def test_small_buffers_stay_in_the_pickle():
    _blob, start, shared, _ = _round_trip([np.arange(10), b"x" * 100])
    assert start is None
    assert shared is None


def test_a_large_pickle_of_small_objects_stays_whole_and_large_bytes_anywhere_leave_it():
    many = [f"row {i}".encode() * 10 for i in range(20_000)]  # a 1.5 MB pickle, nothing large
    blob, start, shared, _ = _round_trip(many)
    assert start is None
    assert shared is None
    nested = {"key": ["x", {"deep": b"d" * MIN_SHARED_BYTES}]}
    blob, start, shared, loaded = _round_trip(nested)
    assert len(blob) < 4096
    assert loaded == nested
    shared.close()


class _Blob:
    """Supplies a fresh, short-lived PickleBuffer each time it is pickled (as some reducers do)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol):
        return _Blob, (None,), pickle.PickleBuffer(bytearray(self.data))

    def __setstate__(self, state) -> None:
        self.data = bytes(state)


def test_short_lived_buffers_each_keep_their_own_data():
    """A PickleBuffer freed during pickling must not lend its id, and region, to the next one."""
    first, second = _Blob(b"a" * MIN_SHARED_BYTES), _Blob(b"b" * MIN_SHARED_BYTES)
    *_, shared, loaded = _round_trip([first, second, b"c" * MIN_SHARED_BYTES])
    assert [blob.data[:1] for blob in loaded[:2]] == [b"a", b"b"]
    shared.close()


def test_rebuilt_arrays_hold_no_descriptor():
    before = len(os.listdir("/proc/self/fd"))
    collector = BufferCollector()
    blob, start = collector.dumps(np.zeros(BIG), what="result")
    shared = collector.write()
    kept = [MappedBuffers(os.dup(shared.fd), shared.layout).loads(blob, start) for _ in range(50)]
    shared.close()
    assert len(os.listdir("/proc/self/fd")) <= before  # the mappings stay, the descriptors do not
    assert all(float(a.sum()) == 0.0 for a in kept)


def test_a_read_only_array_stays_read_only():
    array = np.arange(BIG, dtype=np.float64)
    array.flags.writeable = False
    *_, shared, loaded = _round_trip(array)
    assert not loaded.flags.writeable
    assert np.array_equal(loaded, array)
    shared.close()


def test_an_object_met_twice_travels_once():
    data = b"d" * MIN_SHARED_BYTES
    _blob, _start, shared, (first, second) = _round_trip([data, data])
    assert first == second == data
    assert len(shared.layout) == 1
    shared.close()


def test_a_failed_pickle_leaves_no_buffer_behind():
    class Unpicklable:
        def __reduce__(self):
            raise TypeError("no")

    collector = BufferCollector()
    with pytest.raises(SerializationError):
        collector.dumps([np.zeros(BIG), Unpicklable()], what="arguments")
    assert collector.buffers == []
    assert collector.write() is None


# --- pools ------------------------------------------------------------------------------


def total(a):
    return float(a.sum())


def scaled(a):
    return a * 2


def change_in_place_then_fail_once(args):
    a, marker = args
    seen = float(a[0])
    a[:] = -1.0  # as code may do with the stdlib, where the argument is its own copy
    if not os.path.exists(marker):
        Path(marker).touch()
        raise RuntimeError("first attempt")
    return seen


def length_and_type(x):
    return len(x), type(x).__name__


def hold(args):
    a, seconds = args
    time.sleep(seconds)
    return float(a[0])


def kill_self_on_odd(a):
    if int(a[0]) % 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return float(a[0])


def test_arrays_go_and_come_back_whole(engine):
    arrays = [np.full(BIG, i, dtype=np.float64) for i in range(6)]
    with SafeProcessPoolExecutor(2, engine=engine) as pool:
        assert list(pool.map(total, arrays)) == [float(i * BIG) for i in range(6)]
        results = list(pool.map(scaled, arrays))
    assert [float(r[-1]) for r in results] == [2.0 * i for i in range(6)]
    assert all(r.flags.writeable for r in results)
    results[0][:] = 7  # the parent owns its results
    assert float(arrays[0][0]) == 0.0


def test_large_bytes_and_bytearrays_go_and_come_back(engine):
    items = [b"x" * MIN_SHARED_BYTES, bytearray(b"y" * MIN_SHARED_BYTES), b"z"]
    with SafeProcessPoolExecutor(2, engine=engine) as pool:
        assert list(pool.map(length_and_type, items)) == [
            (MIN_SHARED_BYTES, "bytes"),
            (MIN_SHARED_BYTES, "bytearray"),
            (1, "bytes"),
        ]
        echoed = pool.submit(lambda b: b + b"!", items[0]).result()
    assert echoed == items[0] + b"!"


def test_an_item_that_changes_its_argument_changes_neither_the_parent_nor_its_retry(engine, tmp_path):
    arrays = [np.full(BIG, i + 1.0) for i in range(4)]
    items = [(a, str(tmp_path / f"attempted-{i}")) for i, a in enumerate(arrays)]
    with SafeProcessPoolExecutor(2, engine=engine) as pool:
        outcomes = list(pool.map_outcomes(change_in_place_then_fail_once, items, retries=1))
    assert [o.value for o in outcomes] == [1.0, 2.0, 3.0, 4.0]  # each retry saw the original data
    assert [float(a[0]) for a in arrays] == [1.0, 2.0, 3.0, 4.0]


def test_shared_memory_is_released_after_a_map_in_the_parent_and_the_workers():
    before = _memfds()
    with SafeProcessPoolExecutor(2, engine="native") as pool:
        results = list(pool.map(scaled, [np.full(BIG, i) for i in range(8)]))
        pids = pool.worker_pids
        assert _memfds() != before  # the results live on their mappings
        del results
        assert wait_until(lambda: _memfds() == before, 5)
        assert wait_until(lambda: all(_memfds(pid) == [] for pid in pids), 5), [_memfds(p) for p in pids]


def test_shared_memory_is_released_after_lost_workers_and_errors():
    before = _memfds()
    arrays = [np.full(BIG, float(i)) for i in range(6)]
    with SafeProcessPoolExecutor(2, engine="native") as pool:
        outcomes = list(pool.map_outcomes(kill_self_on_odd, arrays, chunksize=1))
        failed = [o.index for o in outcomes if isinstance(o.error, WorkerLostError)]
        assert failed == [1, 3, 5]
        assert [o.value for o in outcomes if o.ok] == [0.0, 2.0, 4.0]
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda a: 1 / 0, arrays[0]).result()
    with SafeProcessPoolExecutor(2, engine="native", item_timeout=0.5) as pool:
        timed_out = list(pool.map_outcomes(hold, [(arrays[0], 600), (arrays[1], 0.01)], chunksize=1))
        assert isinstance(timed_out[0].error, ItemTimeoutError)
        assert pool.submit(total, arrays[1]).result() == float(BIG)
    del outcomes
    assert wait_until(lambda: _memfds() == before, 5), _memfds()


def test_a_killed_parent_leaves_nothing_in_dev_shm(tmp_path):
    """memfds have no name: whatever way the processes end, nothing stays behind."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import time, numpy as np
            from airflow_provider_safeproc import SafeProcessPoolExecutor

            def slow(a):
                time.sleep(30)

            if __name__ == "__main__":
                with SafeProcessPoolExecutor(2, engine="native") as pool:
                    results = pool.map(slow, [np.zeros({BIG}) for _ in range(4)])
                    while len(pool.worker_pids) < 2:
                        time.sleep(0.02)
                    print("running", *pool.worker_pids, flush=True)
                    list(results)
            """
        )
    )
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        assert line[0] == "running", line
        workers = [int(pid) for pid in line[1:]]
        assert wait_until(lambda: any(_memfds(pid) for pid in workers if os.path.exists(f"/proc/{pid}")), 10)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), 5)
    shm_after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert shm_after <= shm_before
