"""ProcessPoolOperator and @task.process_pool in real Airflow (dag.test on the SQLite DB)."""

from __future__ import annotations

import re

import pytest

from airflow_provider_safeproc.errors import ConfigurationError
from airflow_provider_safeproc.operators import ProcessPoolOperator
from tests.harness.airflow_dags import dag_header

pytestmark = pytest.mark.integration

HEADER = dag_header("from airflow_provider_safeproc.operators import ProcessPoolOperator")

STDLIB_POOLS_DAG = (
    HEADER
    + """
import os, time

def pid_after_nap(_):
    time.sleep(0.3)
    return os.getpid()

def with_executor():
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(2) as pool:
        return [os.getpid(), sorted(set(pool.map(pid_after_nap, range(4))))]

def with_mp_pool():
    import multiprocessing
    with multiprocessing.Pool(2) as pool:
        return [os.getpid(), sorted(set(pool.map(pid_after_nap, range(4))))]

def with_joblib():
    from joblib import Parallel, delayed
    return [os.getpid(), sorted(set(Parallel(n_jobs=2)(delayed(pid_after_nap)(i) for i in range(4))))]

@dag(schedule=None, start_date=START, catchup=False)
def ppo_stdlib():
    ProcessPoolOperator(task_id="executor", python_callable=with_executor)
    ProcessPoolOperator(task_id="mp_pool", python_callable=with_mp_pool)
    ProcessPoolOperator(task_id="joblib", python_callable=with_joblib)

    @task.process_pool(max_workers=2)
    def handed_a_pool(n, process_pool=None):
        return [os.getpid(), sorted(set(process_pool.map(pid_after_nap, range(n))))]

    handed_a_pool(4)

ppo_stdlib()
"""
)


def _run_stdlib_pools_in_daemon():
    import multiprocessing
    import os
    from pathlib import Path

    from tests.harness.airflow_dags import DagRunner

    assert multiprocessing.current_process().daemon
    result = DagRunner(Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])).run(STDLIB_POOLS_DAG, "ppo_stdlib")
    tasks = ("executor", "mp_pool", "joblib", "handed_a_pool")
    summary = result.xcom("handed_a_pool", key="run_summary")
    return os.getpid(), result.tasks, {t: result.xcom(t) for t in tasks}, summary


@pytest.mark.usefixtures("airflow_db")
def test_stdlib_pools_run_unchanged_from_a_daemonic_task(run_in_daemon, daemon_kind):
    task_pid, tasks, values, summary = run_in_daemon(_run_stdlib_pools_in_daemon, kind=daemon_kind)
    assert set(tasks.values()) == {"success"}, tasks
    for name, (child_pid, worker_pids) in values.items():
        assert child_pid != task_pid, name  # a fresh interpreter, not the daemonic task process
        assert len(worker_pids) == 2, f"{name} ran on {worker_pids}"
        assert child_pid not in worker_pids
    assert summary["outcome"] == "succeeded"
    assert summary["workers"] == 2
    assert summary["wall_time"] > 0


CONTEXT_DAG = (
    HEADER
    + """
def report(label, ds=None, run_id=None, params=None, dag_run=None, logical_date=None):
    import sys
    print(f"reporting {label}", flush=True)
    return {
        "label": label,
        "ds": ds,
        "run_id": run_id,
        "params": params,
        "conf": dag_run.conf,
        "tz_aware": logical_date.tzinfo is not None,
        "airflow_imported": "airflow" in sys.modules,
    }

with DAG("ppo_context", schedule=None, start_date=START, catchup=False, params={"depth": 3}):
    ProcessPoolOperator(task_id="report", python_callable=report, op_args=["{{ params.depth }}-deep"],
                        env_vars={"SAFEPROC_EXAMPLE": "1"})
"""
)


def test_context_values_and_templates_reach_the_callable(airflow_dags, task_logs):
    result = airflow_dags.run(CONTEXT_DAG, "ppo_context", conf={"who": "me"})
    result.assert_tasks({"report": "success"})
    value = result.xcom("report")
    assert value["label"] == "3-deep"
    assert value["params"]["depth"] == 3
    assert value["conf"] == {"who": "me"}
    assert value["run_id"] == result.run_id
    assert value["ds"]
    assert value["tz_aware"] is True
    assert value["airflow_imported"] is False
    log = task_logs()
    assert "reporting 3-deep" in log
    assert "run summary: interpreter " in log
    summary = result.xcom("report", key="run_summary")
    assert summary["outcome"] == "succeeded"
    assert summary["workers"] is None  # no process_pool parameter
    assert f"run summary: interpreter {summary['interpreter_pid']} succeeded in " in log


ERRORS_DAG = (
    HEADER
    + """
import os, time

class NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")

def raises_value_error():
    raise ValueError("the input was wrong")

def raises_custom():
    raise NeedsTwoArgs("x", "y")

def exits_hard():
    os._exit(3)

def sleeps():
    time.sleep(60)

with DAG("ppo_errors", schedule=None, start_date=START, catchup=False):
    ProcessPoolOperator(task_id="value_error", python_callable=raises_value_error)
    ProcessPoolOperator(task_id="custom", python_callable=raises_custom)
    ProcessPoolOperator(task_id="exit", python_callable=exits_hard)
    ProcessPoolOperator(task_id="timeout", python_callable=sleeps, timeout=1)
"""
)


def test_error_paths_fail_the_task_with_type_message_and_traceback(airflow_dags, task_logs):
    result = airflow_dags.run(ERRORS_DAG, "ppo_errors")
    result.assert_tasks({"value_error": "failed", "custom": "failed", "exit": "failed", "timeout": "failed"})
    out = task_logs()
    assert "ValueError: the input was wrong" in out
    assert "in raises_value_error" in out  # the child's traceback, not just str(e)
    # with the DAG file's path and the source line, as a PythonOperator shows them
    assert re.search(
        r'File "/[^"]+\.py", line \d+, in raises_value_error\n +raise ValueError\("the input was wrong"\)',
        out,
    )
    assert "NeedsTwoArgs" in out
    assert "exit code 3" in out
    assert "exceeded timeout=1 s" in out


WORKER_CONTEXT_DAG = (
    HEADER
    + """
from tests.harness import airflow_objects

def ask_for_variable():
    return airflow_objects.variable_class().get("safeproc_ppo_token")

def ask_in_process_pool(process_pool):
    return process_pool.submit(ask_for_variable).result()

with DAG("ppo_worker_context", schedule=None, start_date=START, catchup=False):
    ProcessPoolOperator(task_id="in_interpreter", python_callable=ask_for_variable)
    ProcessPoolOperator(task_id="in_its_pool", python_callable=ask_in_process_pool, max_workers=1)
    ProcessPoolOperator(task_id="resolved", python_callable=lambda token: token,
                        op_kwargs={"token": "{{ var.value.safeproc_ppo_token }}"})
"""
)


def test_variables_are_answered_by_the_task_in_the_interpreter_and_its_pool(airflow_dags):
    """More in tests/operators/test_task_context.py; here: the same value three ways."""
    from tests.harness import airflow_objects

    airflow_objects.store_variable("safeproc_ppo_token", "s3cret")
    result = airflow_dags.run(WORKER_CONTEXT_DAG, "ppo_worker_context")
    result.assert_tasks({"in_interpreter": "success", "in_its_pool": "success", "resolved": "success"})
    assert result.xcom("resolved") == result.xcom("in_interpreter") == result.xcom("in_its_pool") == "s3cret"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_workers": -1}, "max_workers must be an int >= 1"),
        ({"max_workers": 0}, "max_workers must be an int >= 1"),
        ({"timeout": -3}, "timeout must be a number > 0"),
        ({"python_callable": 42}, "python_callable must be callable"),
        ({"python": "/nonexistent/bin/python3"}, "does not exist or is not executable"),
        ({"requirements": 7}, "requirements must be a list"),
    ],
)
def test_nonsense_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        ProcessPoolOperator(**{"task_id": "t", "python_callable": len, **kwargs})
