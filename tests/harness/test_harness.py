"""The harness itself: daemonic parents really are daemonic, dag.test() reports real states."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from tests.harness.airflow_dags import DAG_IMPORTS
from tests.harness.daemon import DaemonError


def _daemon_facts():
    import multiprocessing as mp

    return mp.current_process().daemon, os.getpid()


def _stdlib_pool_square(n):
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        return list(pool.map(abs, range(n)))


def test_daemon_process_is_daemonic(run_in_daemon, daemon_kind):
    daemon, pid = run_in_daemon(_daemon_facts, kind=daemon_kind)
    assert daemon is True
    assert pid != os.getpid()


def test_stdlib_pool_fails_in_daemon(run_in_daemon, daemon_kind):
    """The failure this package exists to end, reproduced by the harness (Celery's case)."""
    with pytest.raises(AssertionError, match="daemonic processes are not allowed to have children"):
        run_in_daemon(_stdlib_pool_square, 3, kind=daemon_kind)


def test_daemon_reraises_with_remote_traceback(run_in_daemon):
    def boom():
        raise KeyError("nope")

    with pytest.raises(KeyError) as info:
        run_in_daemon(boom)
    assert isinstance(info.value.__cause__, DaemonError)
    assert "boom" in info.value.__cause__.remote_traceback


def test_closures_travel(run_in_daemon):
    offset = 41
    assert run_in_daemon(lambda x: x + offset, 1) == 42


def test_stdlib_pool_works_outside_daemon():
    assert not multiprocessing.current_process().daemon


SUCCESS_DAG = (
    DAG_IMPORTS
    + """

@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False)
def harness_ok():
    @task
    def one():
        return {"value": 1}

    @task
    def fails(x):
        raise ValueError("expected failure")

    fails(one())

harness_ok()
"""
)


@pytest.mark.integration
def test_dag_runner_reports_real_states(airflow_dags):
    result = airflow_dags.run(SUCCESS_DAG, "harness_ok")
    assert result.state == "failed"
    result.assert_tasks({"one": "success", "fails": "failed"})
    assert result.xcom("one") == {"value": 1}
