"""Each outcome once, in order, and never a spurious one (the AIRFLOW-585 race), under fire.

Hypothesis draws item durations, items that raise, items that kill their own worker, worker
SIGKILLs from outside at random moments, a chunk size above 1 and retries; the pool, of
either engine, runs in a daemonic parent of either kind. Every run of an item leaves a start and an end marker
named after the worker's pid. Then:

- each index comes exactly once: in input order from ``map_outcomes``, in any order from
  ``map_unordered``, whether the input is a list or a generator read a small window at a time;
- a value is reported only for an item that ended, a ``WorkerLostError`` only for an item
  that ran (or was about to) in that very worker, after that worker is dead.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import cloudpickle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness.daemon import run_in_daemon

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# A few seconds in `make test`; SAFEPROC_PROPERTY_EXAMPLES=200 for a long hunt.
EXAMPLES = int(os.environ.get("SAFEPROC_PROPERTY_EXAMPLES", "14"))


def _scenario(plan, chunksize, kill_delays_ms, retries, marks, engine, mode, window):
    import random
    import signal
    import threading
    import time

    import psutil

    from airflow_provider_safeproc import SafeProcessPoolExecutor
    from airflow_provider_safeproc.errors import WorkerLostError

    def mark(kind, index, run):
        Path(marks, f"{kind}-{index}-{os.getpid()}-{run}").touch()

    def item(index):
        duration_ms, behaviour = plan[index]
        run = uuid.uuid4().hex[:8]  # one run of the item: its start and end markers share it
        mark("start", index, run)
        time.sleep(duration_ms / 1000)
        if behaviour == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        mark("end", index, run)
        if behaviour == "raise":
            raise ValueError(index)
        return index * 2

    def dead(pid):
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    with SafeProcessPoolExecutor(2, engine=engine) as pool:

        def killer():
            rng = random.Random(len(plan))
            for delay in kill_delays_ms:
                time.sleep(delay / 1000)
                pids = pool.worker_pids
                if pids:
                    try:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                    except OSError:
                        pass

        thread = threading.Thread(target=killer)
        thread.start()
        seen = []
        items = range(len(plan)) if window is None else (i for i in range(len(plan)))
        run_map = pool.map_unordered if mode == "unordered" else pool.map_outcomes
        for outcome in run_map(item, items, chunksize=chunksize, retries=retries, buffersize=window):
            error = outcome.error
            lost = isinstance(error, WorkerLostError)
            seen.append(
                {
                    "index": outcome.index,
                    "ok": outcome.ok,
                    "value": outcome.value,
                    "error": None if error is None else type(error).__name__,
                    "pid": error.pid if lost else None,
                    "dead_when_reported": dead(error.pid) if lost else None,
                    "attempts": outcome.attempts,
                }
            )
        thread.join()
    return seen


plans = st.lists(
    st.tuples(st.sampled_from([0, 0, 1, 5, 15]), st.sampled_from(["ok"] * 6 + ["raise", "die"])),
    min_size=1,
    max_size=40,
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=plans,
    chunksize=st.integers(2, 6),
    kill_delays_ms=st.lists(st.integers(1, 120), max_size=3),
    retries=st.integers(0, 1),
    daemon_kind=st.sampled_from(["multiprocessing", "billiard"]),
    engine=st.sampled_from(["native", "billiard"]),
    mode=st.sampled_from(["ordered", "unordered"]),
    window=st.sampled_from([None, 1, 3]),
)
def test_each_outcome_once_in_order_and_never_spurious(
    plan, chunksize, kill_delays_ms, retries, daemon_kind, engine, mode, window, tmp_path_factory
):
    marks = tmp_path_factory.mktemp("marks")
    seen = run_in_daemon(
        _scenario,
        plan,
        chunksize,
        kill_delays_ms,
        retries,
        str(marks),
        engine,
        mode,
        window,
        kind=daemon_kind,
        timeout=120,
    )
    indexes = [o["index"] for o in seen]
    if mode == "unordered":
        seen.sort(key=lambda o: o["index"])
        indexes.sort()
    assert indexes == list(range(len(plan)))
    names = [p.name.split("-") for p in marks.iterdir()]
    starts = {(int(i), int(pid), run) for kind, i, pid, run in names if kind == "start"}
    ends = {(int(i), int(pid), run) for kind, i, pid, run in names if kind == "end"}
    ended_items = {i for i, _, _ in ends}
    for outcome, (_duration, behaviour) in zip(seen, plan, strict=True):
        index = outcome["index"]
        assert 1 <= outcome["attempts"] <= retries + 1
        if outcome["ok"]:
            assert behaviour == "ok"
            assert outcome["value"] == index * 2
            assert index in ended_items
        elif outcome["error"] == "ValueError":
            assert behaviour == "raise"
            assert index in ended_items
        else:
            assert outcome["error"] == "WorkerLostError", outcome
            assert behaviour == "die" or kill_delays_ms, outcome
            pid = outcome["pid"]
            assert outcome["dead_when_reported"], outcome
            # A run that wrote its end marker can still be lost: the worker may die after the
            # marker, before the item's result leaves it; and one with no start marker yet: the
            # worker may die after stamping the item, before its first line ran. What must never
            # happen is a loss pinned on a worker while the item ran in others only, or reported
            # while that worker lived.
            runs_there = {(i, p, run) for i, p, run in starts if (i, p) == (index, pid)}
            runs_elsewhere = {(i, p, run) for i, p, run in starts if i == index and p != pid}
            assert runs_there or not runs_elsewhere, (
                f"item {index} reported lost in worker {pid}, where it never started"
            )
        if behaviour == "die":
            assert not outcome["ok"]
