"""Every gallery DAG succeeds on a real deployment; the controls prove where we run.

One test per DAG file of ``dags_examples/`` (whatever is there when pytest collects) and per
stand-in, on each executor. The control DAGs show that the Celery task process is daemonic and
that the stdlib's process pool really fails there, so a green gallery means something.
"""

from __future__ import annotations

import pytest

from tests.e2e import report
from tests.e2e.gallery import (
    BATCH_VARIABLES,
    DAEMON_FLAG_DAG,
    STDLIB_POOL_DAG,
    WORKER_CONTEXT_DAG,
    failure_details,
    gallery_files,
    looks_like_dag_file,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

DAEMONIC_ERROR = "daemonic processes are not allowed to have children"


@pytest.mark.parametrize("dag_file", gallery_files(), ids=lambda p: p.name)
def test_every_dag_of_the_file_succeeds(deployment, batch_runs, dag_file):
    name = dag_file.name
    if name in batch_runs.import_errors:
        pytest.fail(f"{name} failed to import:\n{batch_runs.import_errors[name]}", pytrace=False)
    dag_ids = batch_runs.dags_by_file.get(name, [])
    if not dag_ids:
        if looks_like_dag_file(dag_file):
            pytest.fail(f"{name} mentions airflow and dag but defines no DAG the deployment found")
        pytest.skip(f"{name} is not a DAG file (a helper module)")
    failures = [
        failure_details(deployment, run)
        for run in (batch_runs.results[dag_id] for dag_id in dag_ids)
        if run.state != "success" or run.not_succeeded()
    ]
    assert not failures, "\n\n".join(failures)


def test_task_process_daemon_flag(deployment, batch_runs):
    """Celery's prefork task processes are daemonic; Airflow 3's LocalExecutor ones are not."""
    run = batch_runs.results[DAEMON_FLAG_DAG]
    assert run.state == "success", failure_details(deployment, run)
    facts = deployment.api.xcom(DAEMON_FLAG_DAG, run.run_id, "report_process_facts")
    report.record(deployment.executor, f"task process facts: {facts}")
    assert facts["daemon"] is (deployment.executor == "celery"), facts


def test_stdlib_process_pool_fails_only_on_celery(deployment, batch_runs):
    """The control: a plain PythonOperator with ProcessPoolExecutor breaks on Celery, runs on Local."""
    run = batch_runs.results[STDLIB_POOL_DAG]
    states = run.task_states()
    if deployment.executor == "celery":
        assert states == {"stdlib_process_pool": "failed"}, failure_details(deployment, run)
        log = deployment.task_log(STDLIB_POOL_DAG, run.run_id, "stdlib_process_pool")
        assert DAEMONIC_ERROR in log, log
        line = next(line.strip() for line in log.splitlines() if DAEMONIC_ERROR in line)
        report.record("celery", f"stdlib ProcessPoolExecutor in a PythonOperator: {line}")
    else:
        assert states == {"stdlib_process_pool": "success"}, failure_details(deployment, run)
        report.record(deployment.executor, "stdlib ProcessPoolExecutor in a PythonOperator: runs")


def test_variables_resolve_in_the_task_and_fail_clearly_in_workers(deployment, batch_runs):
    """A DB Variable reaches workers through a template; Variable.get in a worker names the mistake."""
    run = batch_runs.results[WORKER_CONTEXT_DAG]
    states = run.task_states()
    expected = {"resolve_in_task": "success", "ask_in_worker": "failed", "worker_sockets": "success"}
    assert states == expected, failure_details(deployment, run)
    token = BATCH_VARIABLES["safeproc_e2e_token"]
    resolved = deployment.api.xcom(WORKER_CONTEXT_DAG, run.run_id, "resolve_in_task")
    assert resolved == [f"{i}:{token}" for i in (1, 2, 3)]
    log = deployment.task_log(WORKER_CONTEXT_DAG, run.run_id, "ask_in_worker")
    assert "TaskContextUnavailableError" in log, log
    assert "Variable.get('safeproc_e2e_token') is not available in a safeproc worker process" in log, log
    assert "VARIABLE_NOT_FOUND" not in log, log
    line = next(line.strip() for line in log.splitlines() if "is not available in a safeproc worker" in line)
    report.record(deployment.executor, f"Variable.get in a pool worker: {line[:160]}")
    # The supervisor socket is never shared: a worker holds none of the task process's sockets.
    sockets = deployment.api.xcom(WORKER_CONTEXT_DAG, run.run_id, "worker_sockets")
    assert all(s["task_sockets"] > 0 and s["shared"] == [] for s in sockets), sockets
    report.record(deployment.executor, f"sockets a worker shares with its task process: {sockets}")
