"""Control DAG: Airflow's task context inside pool workers, on a real task runner.

The Variables ``safeproc_e2e_token`` and ``safeproc_e2e_api_password`` and the connection
``safeproc_e2e_conn`` exist in the metadata DB (the test creates them through the REST API, or
Airflow's own API on Airflow 2, before triggering). Resolved in the task with a template, the
token reaches every worker (``resolve_in_task``). Asked for inside workers, 20 items on 2
workers, the Variable and the connection are answered by the task process
(``ask_in_worker``), and so in ProcessPoolOperator's interpreter and its pool
(``ask_in_interpreter``). A worker that prints the sensitive Variable shows ``***`` in the task
log (``print_secret``); a missing Variable fails with Airflow's own error naming it
(``missing_variable``). ``worker_sockets`` shows that a worker still holds none of the task
process's sockets (the supervisor's among them).
"""

from __future__ import annotations

from datetime import datetime

try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG

from airflow_provider_safeproc.operators import ParallelPythonOperator, ProcessPoolOperator

TOKEN_VARIABLE = "safeproc_e2e_token"
SECRET_VARIABLE = "safeproc_e2e_api_password"
CONNECTION = "safeproc_e2e_conn"


def _variable() -> type:
    try:
        from airflow.sdk import Variable
    except ImportError:  # Airflow 2
        from airflow.models import Variable
    return Variable


def _base_hook() -> type:
    try:
        from airflow.sdk import BaseHook
    except ImportError:  # Airflow 2
        from airflow.hooks.base import BaseHook
    return BaseHook


def with_token(item: int, token: str) -> str:
    return f"{item}:{token}"


def ask_for_token(item: int) -> str:
    conn = _base_hook().get_connection(CONNECTION)
    return f"{item}:{_variable().get(TOKEN_VARIABLE)}:{conn.host}:{conn.port}"


def print_secret(item: int) -> int:
    secret = _variable().get(SECRET_VARIABLE)
    print(f"item {item} authenticates with {secret}")
    return len(secret)


def missing_variable(item: int) -> str:
    return _variable().get("safeproc_e2e_no_such_variable")


def in_interpreter(process_pool) -> list[str]:
    return [ask_for_token(0), *process_pool.map(ask_for_token, range(1, 21))]


def shared_sockets(item: int) -> dict:
    """The sockets this worker shares with the task process."""
    import os

    import psutil

    def sockets(pid: int) -> set[str]:
        found = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:"):
                found.add(target)
        return found

    # The task process: the first ancestor outside the pool's own session (the pool's keeper,
    # its helper and the workers have one of their own).
    task_pid = next(p.pid for p in psutil.Process().parents() if os.getsid(p.pid) != os.getsid(0))
    theirs = sockets(task_pid)
    return {"task_sockets": len(theirs), "shared": sorted(sockets(os.getpid()) & theirs)}


with DAG("e2e_control_worker_context", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
    ParallelPythonOperator(
        task_id="resolve_in_task",
        python_callable=with_token,
        iterable=[1, 2, 3],
        op_kwargs={"token": "{{ var.value.safeproc_e2e_token }}"},
        max_workers=2,
    )
    ParallelPythonOperator(
        task_id="ask_in_worker", python_callable=ask_for_token, iterable=list(range(20)), max_workers=2
    )
    ParallelPythonOperator(
        task_id="print_secret", python_callable=print_secret, iterable=[1, 2], max_workers=2
    )
    ParallelPythonOperator(
        task_id="missing_variable", python_callable=missing_variable, iterable=[1], max_workers=1, retries=0
    )
    ProcessPoolOperator(task_id="ask_in_interpreter", python_callable=in_interpreter, max_workers=2)
    ParallelPythonOperator(
        task_id="worker_sockets", python_callable=shared_sockets, iterable=[1, 2], max_workers=2
    )
