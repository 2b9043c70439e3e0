"""Control DAG: Airflow's task context inside pool workers, on a real task runner.

The Variable ``safeproc_e2e_token`` exists in the metadata DB (the test creates it through the
REST API before triggering). Resolved in the task with a template, it reaches every worker
(``resolve_in_task`` succeeds). Asked for inside a worker, it must fail the item with
``TaskContextUnavailableError`` naming the call (``ask_in_worker`` fails), not with Airflow's
"Variable ... not found": the worker has no supervisor connection. ``worker_sockets`` shows
why: a worker holds none of the task process's sockets (the supervisor's among them).
"""

from __future__ import annotations

from datetime import datetime

try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG

from airflow_provider_safeproc.operators import ParallelPythonOperator

TOKEN_VARIABLE = "safeproc_e2e_token"


def with_token(item: int, token: str) -> str:
    return f"{item}:{token}"


def ask_for_token(item: int) -> str:
    try:
        from airflow.sdk import Variable
    except ImportError:  # Airflow 2
        from airflow.models import Variable

    return f"{item}:{Variable.get(TOKEN_VARIABLE)}"


def shared_sockets(item: int) -> dict:
    """The sockets this worker shares with the task process (its guardian's parent)."""
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

    task_pid = psutil.Process(os.getppid()).ppid()
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
        task_id="ask_in_worker", python_callable=ask_for_token, iterable=[1, 2, 3], max_workers=2, retries=0
    )
    ParallelPythonOperator(
        task_id="worker_sockets", python_callable=shared_sockets, iterable=[1, 2], max_workers=2
    )
