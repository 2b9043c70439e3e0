"""Control DAG: the stdlib's ProcessPoolExecutor in a plain PythonOperator.

On CeleryExecutor this must fail with "daemonic processes are not allowed to have children":
the proof that the end-to-end tests run where the stdlib breaks. On Airflow 3's LocalExecutor
the task process is not daemonic and it runs.
"""

from __future__ import annotations

from datetime import datetime

try:  # Airflow 3
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2 (the LocalExecutor run on PostgreSQL)
    from airflow import DAG
    from airflow.operators.python import PythonOperator


def stdlib_process_pool() -> list[int]:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=2) as pool:
        return list(pool.map(abs, [-1, -2, -3, -4]))


with DAG("e2e_control_stdlib_pool", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
    PythonOperator(task_id="stdlib_process_pool", python_callable=stdlib_process_pool, retries=0)
