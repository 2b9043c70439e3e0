"""Stand-in gallery DAG: a task that starts two worker processes with billiard.

It keeps the end-to-end gallery run meaningful before ``dags_examples/`` has DAGs of its own:
billiard (Celery's fork of multiprocessing) has no daemon check in ``Process.start()``, so
unlike the stdlib it can start children from a daemonic Celery task process.

Measured in a Celery task (Airflow 3.3.2, billiard 4.3.2): a billiard child's exit runs the
stdlib's ``multiprocessing.util._exit_function``, which tries to join stdlib children it
inherited from the task runner and fails ("can only join a child process"): the child exits
with code 1 and a ``billiard.Queue`` item still in its feeder thread is lost. So results come
back through a ``Pipe`` (sent synchronously) and exit codes are reported, not asserted.
"""

from __future__ import annotations

import os
from datetime import datetime

try:  # Airflow 3
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2 (the LocalExecutor run on PostgreSQL)
    from airflow import DAG
    from airflow.operators.python import PythonOperator


def _square_into(conn, value: int) -> None:
    conn.send((value * value, os.getpid()))
    conn.close()


def square_with_two_processes() -> dict:
    import billiard

    pipes, procs = [], []
    for value in (3, 4):
        receiver, sender = billiard.Pipe(duplex=False)
        procs.append(billiard.Process(target=_square_into, args=(sender, value)))
        pipes.append(receiver)
        procs[-1].start()
        sender.close()
    for receiver in pipes:
        assert receiver.poll(60), "a billiard child sent nothing within 60 s"
    results = [receiver.recv() for receiver in pipes]
    for proc in procs:
        proc.join(timeout=30)
    assert [square for square, _ in results] == [9, 16], results
    return {
        "squares": [square for square, _ in results],
        "worker_pids": [pid for _, pid in results],
        "exit_codes": [proc.exitcode for proc in procs],
    }


with DAG("e2e_standin_billiard_pool", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
    PythonOperator(task_id="square_with_two_processes", python_callable=square_with_two_processes)
