"""Control DAG: reports whether the task process is daemonic on this executor.

Celery's prefork pool runs tasks in daemonic billiard processes and the task runner inherits
that flag (True); Airflow 3's LocalExecutor workers are not daemonic (False). The end-to-end
tests read the XCom and record it in the executor compatibility table.
"""

from __future__ import annotations

import multiprocessing
import os
from datetime import datetime

try:  # Airflow 3
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2 (the LocalExecutor run on PostgreSQL)
    from airflow import DAG
    from airflow.operators.python import PythonOperator


def report_process_facts() -> dict:
    current = multiprocessing.current_process()
    return {
        "daemon": bool(current.daemon),
        "process_name": current.name,
        "process_type": type(current).__module__ + "." + type(current).__qualname__,
        "pid": os.getpid(),
        "start_method": multiprocessing.get_start_method(allow_none=True),
        # stdlib children the task runner inherited: a forked child's exit tries to join them.
        "inherited_stdlib_children": [repr(p) for p in multiprocessing.process._children],
    }


with DAG("e2e_control_daemon_flag", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
    PythonOperator(task_id="report_process_facts", python_callable=report_process_facts)
