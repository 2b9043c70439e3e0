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
    E2E_CONNECTION,
    STDLIB_POOL_DAG,
    WORKER_CONTEXT_DAG,
    WORKER_CONTEXT_STATES,
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


def test_workers_read_variables_and_connections_through_the_task(deployment, batch_runs):
    """A Variable and a Connection created through the REST API: read in 20 items on 2 workers
    and in ProcessPoolOperator's interpreter and pool, answered by the task process; a secret
    printed by a worker is masked in the task log; a missing one fails with Airflow's error."""
    run = batch_runs.results[WORKER_CONTEXT_DAG]
    states = run.task_states()
    assert states == WORKER_CONTEXT_STATES, failure_details(deployment, run)
    token = BATCH_VARIABLES["safeproc_e2e_token"]
    resolved = deployment.api.xcom(WORKER_CONTEXT_DAG, run.run_id, "resolve_in_task")
    assert resolved == [f"{i}:{token}" for i in (1, 2, 3)]
    host, port = E2E_CONNECTION["host"], E2E_CONNECTION["port"]
    asked = deployment.api.xcom(WORKER_CONTEXT_DAG, run.run_id, "ask_in_worker")
    assert asked == [f"{i}:{token}:{host}:{port}" for i in range(20)]
    in_interpreter = deployment.api.xcom(WORKER_CONTEXT_DAG, run.run_id, "ask_in_interpreter")
    assert in_interpreter == [f"{i}:{token}:{host}:{port}" for i in range(21)]
    log = deployment.task_log(WORKER_CONTEXT_DAG, run.run_id, "ask_in_worker")
    lookups = [line for line in log.splitlines() if "looking up" in line]
    assert len(lookups) == 2, lookups  # one per key for 20 items
    report.record(
        deployment.executor, f"Variable and Connection in 20 items on 2 workers: {len(lookups)} lookups"
    )

    secret = BATCH_VARIABLES["safeproc_e2e_api_password"]
    log = deployment.task_log(WORKER_CONTEXT_DAG, run.run_id, "print_secret")
    assert "authenticates with ***" in log, log
    assert secret not in log, log
    log = deployment.task_log(WORKER_CONTEXT_DAG, run.run_id, "missing_variable")
    assert "safeproc_e2e_no_such_variable" in log, log
    assert "VARIABLE_NOT_FOUND" in log or "KeyError" in log, log
    # The supervisor socket is never shared: a worker holds none of the task process's sockets.
    sockets = deployment.api.xcom(WORKER_CONTEXT_DAG, run.run_id, "worker_sockets")
    assert all(s["task_sockets"] > 0 and s["shared"] == [] for s in sockets), sockets
    report.record(deployment.executor, f"sockets a worker shares with its task process: {sockets}")
