"""on_kill and execution_timeout, reached the real way: signals sent to a separate task process.

Each DAG's callables record their pids (including a grandchild pool's workers) and every
process carries an environment tag, so survivors are found even after reparenting.
"""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from tests.harness.airflow_dags import dag_header
from tests.harness.processes import wait_until
from tests.harness.task_process import RECORD_PID, start_task_process

pytestmark = pytest.mark.integration

HEADER = (
    dag_header(
        "import datetime, time",
        "from airflow_provider_safeproc.operators import ParallelPythonOperator, ProcessPoolOperator",
    )
    + RECORD_PID
    + """
def nap(_):
    record_pid()
    time.sleep(300)

def item_with_grandchild_pool(_):
    from concurrent.futures import ProcessPoolExecutor
    record_pid()
    with ProcessPoolExecutor(2) as pool:
        return list(pool.map(nap, range(2)))

def grandchild_pool():
    from concurrent.futures import ProcessPoolExecutor
    record_pid()
    with ProcessPoolExecutor(2) as pool:
        return list(pool.map(nap, range(2)))
"""
)

DAGS = {
    "parallel": HEADER
    + """
with DAG("stop_parallel", schedule=None, start_date=START, catchup=False):
    ParallelPythonOperator(task_id="busy", python_callable=item_with_grandchild_pool, iterable=[1, 2],
                           max_workers=2, execution_timeout=datetime.timedelta(seconds={timeout}))
""",
    "process_pool": HEADER
    + """
with DAG("stop_process_pool", schedule=None, start_date=START, catchup=False):
    ProcessPoolOperator(task_id="busy", python_callable=grandchild_pool,
                        execution_timeout=datetime.timedelta(seconds={timeout}))
""",
}
# Processes the callables record before the task is stopped: 2 items x (worker + 2 grandchildren),
# or the interpreter + 2 grandchildren.
EXPECTED_PIDS = {"parallel": 6, "process_pool": 3}


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.parametrize("operator", ["parallel", "process_pool"])
@pytest.mark.parametrize("how", ["sigterm", "execution_timeout"])
def test_stopping_the_task_ends_every_descendant(operator, how, tmp_path):
    timeout = 8 if how == "execution_timeout" else 300
    source = DAGS[operator].replace("{timeout}", str(timeout))
    task = start_task_process(source, f"stop_{operator}", tmp_path)
    try:
        assert wait_until(lambda: len(task.started_pids()) >= EXPECTED_PIDS[operator], timeout=60), (
            f"only {task.started_pids()} started"
        )
        pids = task.started_pids()
        if how == "sigterm":
            task.proc.send_signal(signal.SIGTERM)  # what the supervisor sends; the runner calls on_kill
        stopped_at = time.monotonic()
        # execution_timeout fires in the task process itself (SIGALRM) after `timeout` s.
        budget = 2.0 if how == "sigterm" else timeout + 2.0
        assert wait_until(lambda: not _alive(pids), timeout=budget), f"still alive: {_alive(pids)}"
        assert wait_until(lambda: not task.tagged_survivors(), timeout=2.0), task.tagged_survivors()
        elapsed = time.monotonic() - stopped_at
        states, out = task.finish(timeout=60)
        assert states == {"busy": "failed"}, out[-3000:]
        if how == "execution_timeout":
            assert "Timeout" in out
        assert elapsed <= budget
    finally:
        task.cleanup()
