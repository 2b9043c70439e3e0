"""Which engine runs, and what only the billiard engine must prove: no wedge, fast losses.

The contract both engines keep is in the other modules of this folder, run on each engine
through the ``pool_kind`` fixture. Here: the choice of engine and its refusals, and billiard's
known hazards (a worker killed while it holds the shared input-queue lock wedges a stock
``billiard.Pool``; a lost worker is noticed only after ``lost_worker_timeout``, 10 s).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
import time

import cloudpickle
import pytest

from airflow_provider_safeproc import SafeProcessPoolExecutor
from airflow_provider_safeproc.errors import ConfigurationError, WorkerLostError
from airflow_provider_safeproc.pool.native.engine import NativeEngine
from tests.harness.processes import wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_native_runs_where_the_machine_has_what_it_needs(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="airflow_provider_safeproc")
    with SafeProcessPoolExecutor(1) as pool:
        assert pool.submit(pow, 2, 3).result(timeout=30) == 8
    assert pool.engine == "native"
    assert "chosen automatically" in pool.engine_reason
    assert "engine 'native' (chosen automatically" in caplog.text


def test_billiard_runs_where_the_native_engine_cannot(monkeypatch: pytest.MonkeyPatch, caplog):
    """A platform without the Linux features, simulated: the choice falls to billiard, says why,
    and an explicit native is refused before any process starts, naming the reason."""
    reason = "it needs Linux (memfd_create, SOCK_SEQPACKET, PR_SET_CHILD_SUBREAPER, /proc), not darwin"
    monkeypatch.setattr(NativeEngine, "unavailable_reason", classmethod(lambda cls: reason))
    caplog.set_level(logging.INFO, logger="airflow_provider_safeproc")
    with SafeProcessPoolExecutor(2) as pool:
        assert sorted(pool.map(abs, [-2, -1, 0])) == [0, 1, 2]
    assert pool.engine == "billiard"
    assert pool.engine_reason == f"chosen automatically: the native engine cannot run here ({reason})"
    assert "engine 'billiard'" in caplog.text
    with pytest.raises(
        ConfigurationError, match=r"engine='native' cannot run on this machine: it needs Linux"
    ):
        SafeProcessPoolExecutor(1, engine="native")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"engine": "threads"}, "engine must be one of 'native', 'billiard' or None, got 'threads'"),
        (
            {"engine": "billiard", "start_method": "fork"},
            "start_method='fork'.*not available with the billiard engine",
        ),
    ],
)
def test_nonsense_engine_arguments_are_refused(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        SafeProcessPoolExecutor(1, **kwargs)


def _pid(_: int) -> int:
    return os.getpid()


def test_killing_idle_billiard_workers_does_not_wedge_the_pool():
    """In a stock billiard pool an idle worker sits in its read holding the shared queue's
    lock: killing it leaves the lock taken and every later task unread. Here each worker has
    its own pipe."""
    with SafeProcessPoolExecutor(2, engine="billiard") as pool:
        assert len(set(pool.map(_pid, range(8), chunksize=1))) >= 1
        for pid in pool.worker_pids:
            os.kill(pid, signal.SIGKILL)
        assert list(pool.map(abs, range(-20, 0), chunksize=1)) == list(range(20, 0, -1))


def _tiny(i: int) -> int:
    time.sleep(0.002)
    return i


def test_a_kill_loop_settles_every_item_exactly_once(pool_kind):
    """Random workers SIGKILLed every 30 ms (spawned ones, which take longer to start: every
    300 ms) while 400 short items run: each item gets exactly one outcome, in order (a value,
    or WorkerLostError when its worker died under it), and the pool goes on."""
    interval = 0.3 if pool_kind.start_method == "spawn" else 0.03
    with SafeProcessPoolExecutor(2, **pool_kind.kwargs) as pool:
        stop = threading.Event()

        def killer():
            rng = random.Random(7)
            while not stop.wait(interval):
                pids = pool.worker_pids
                if pids:
                    try:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                    except OSError:
                        pass

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            outcomes = list(pool.map_outcomes(_tiny, range(400), chunksize=4, retries=3))
        finally:
            stop.set()
            thread.join()
        assert [o.index for o in outcomes] == list(range(400))
        assert all(o.value == o.index for o in outcomes if o.ok)
        assert all(isinstance(o.error, WorkerLostError) for o in outcomes if not o.ok)
        assert sum(o.ok for o in outcomes) >= 300
        assert pool.submit(pow, 2, 3).result(timeout=30) == 8


def _sleep_then_report(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_a_lost_billiard_worker_is_noticed_at_once():
    """billiard's own detection waits lost_worker_timeout (10 s by default)."""
    with SafeProcessPoolExecutor(1, engine="billiard") as pool:
        future = pool.submit(_sleep_then_report, 30)
        assert wait_until(lambda: pool.worker_pids, 10)
        time.sleep(0.3)  # the item runs
        killed_at = time.monotonic()
        os.kill(pool.worker_pids[0], signal.SIGKILL)
        with pytest.raises(WorkerLostError, match="killed by SIGKILL"):
            future.result(timeout=30)
        assert time.monotonic() - killed_at < 1.0
