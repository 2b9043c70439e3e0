"""Every gallery DAG succeeds on a real deployment; the controls prove where we run.

One test per DAG file of ``dags_examples/`` (whatever is there when pytest collects) and per
stand-in, on each executor. The control DAGs show that the Celery task process is daemonic and
that the stdlib's process pool really fails there, so a green gallery means something.
"""

from __future__ import annotations

import pytest

from tests.e2e import report
from tests.e2e.gallery import (
    DAEMON_FLAG_DAG,
    STDLIB_POOL_DAG,
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
