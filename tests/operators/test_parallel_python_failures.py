"""ParallelPythonOperator: every failure a user can cause fails the task, naming cause and item.

Real Airflow (``dag.test()``), real worker processes and signals. The autouse guard of
``conftest`` fails any test that leaves a process behind.
"""

from __future__ import annotations

import pytest

from tests.harness.airflow_dags import dag_header

pytestmark = pytest.mark.integration

FAILURES_DAG = (
    dag_header(
        "import os, signal, threading, time",
        "from airflow_provider_safeproc.operators import ParallelPythonOperator",
    )
    + """
def hangs_on_3(x):
    if x == 3:
        time.sleep(120)
    return x

def killed_on_2(x):
    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
    return x

def fails_first_attempt(x, marker_dir):
    marker = os.path.join(marker_dir, str(x))
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError(f"first attempt of {x}")
    return x * 10

def unpicklable_result_on_1(x):
    return threading.Lock() if x == 1 else x

LOCK = threading.Lock()

def uses_a_module_lock(x):  # shipped by value with its globals: the lock cannot travel
    with LOCK:
        return x

with DAG("ppf_failures", schedule=None, start_date=START, catchup=False):
    ParallelPythonOperator(task_id="hang", python_callable=hangs_on_3, iterable=list(range(6)),
                           item_timeout=2, max_workers=2)
    ParallelPythonOperator(task_id="killed", python_callable=killed_on_2, iterable=list(range(5)),
                           max_workers=2)
    ParallelPythonOperator(task_id="retried", python_callable=fails_first_attempt, iterable=[1, 2, 3, 4],
                           op_kwargs={"marker_dir": MARKER_DIR}, item_retries=1, max_workers=2)
    ParallelPythonOperator(task_id="retries_exhausted", python_callable=fails_first_attempt,
                           iterable=[7], op_kwargs={"marker_dir": MARKER_DIR + "/none"}, item_retries=0)
    ParallelPythonOperator(task_id="bad_result", python_callable=unpicklable_result_on_1, iterable=[0, 1, 2])
    ParallelPythonOperator(task_id="bad_callable", python_callable=uses_a_module_lock, iterable=[0, 1])
"""
)


def test_each_failure_names_its_cause_and_item(airflow_dags, tmp_path, task_logs):
    (tmp_path / "none").mkdir()
    result = airflow_dags.run(FAILURES_DAG.replace("MARKER_DIR", repr(str(tmp_path))), "ppf_failures")
    result.assert_tasks(
        {
            "hang": "failed",
            "killed": "failed",
            "retried": "success",
            "retries_exhausted": "failed",
            "bad_result": "failed",
            "bad_callable": "failed",
        }
    )
    assert result.xcom("retried") == [10, 20, 30, 40]
    assert result.xcom("retried", key="run_summary")["retries"] == 4
    log = task_logs()
    # An item that hangs: its worker is killed at item_timeout, the item named.
    assert "item 3 failed: ItemTimeoutError: item 3 exceeded item_timeout=2 s" in log
    # A worker killed mid-item (the OOM killer's SIGKILL): no hang, the item and signal named.
    assert "item 2 failed: WorkerLostError: worker process" in log
    assert "while running item 2: killed by SIGKILL" in log
    # Each retry is logged with the item, the attempt and why.
    assert "[item 0] attempt 1 of 2 failed (RuntimeError: first attempt of 1); retrying" in log
    # Retries used up: the item's own exception.
    assert "item 0 failed: RuntimeError: first attempt of 7" in log
    # A result that cannot travel back.
    assert "item 1 failed: SerializationError" in log
    # A callable that cannot travel to the workers: the function and the global that stops it.
    assert (
        "SerializationError: cannot serialize the callable: function uses_a_module_lock, "
        "global LOCK: _thread.lock" in log
    )
