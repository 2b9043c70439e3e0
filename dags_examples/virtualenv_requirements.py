"""A callable that needs a package the Airflow workers do not have.

Why: installing a library into every worker's environment for one task risks conflicts with
Airflow's own pins. ProcessPoolOperator (and ``@task.process_pool``) with ``requirements``
builds a virtualenv once, caches it under a hash of its inputs (``[safeproc] venv_cache_dir``),
and runs the callable there. Unlike PythonVirtualenvOperator, the callable travels with
cloudpickle (closures and DAG-file helpers work), its output streams into the task log, and
``execution_timeout`` ends it with everything it started.

The first run builds the virtualenv (the log says how long it took); later runs say
"virtualenv cache hit".
"""

from __future__ import annotations

import pendulum

try:
    from airflow.sdk import dag, task
except ImportError:  # Airflow 2
    from airflow.decorators import dag, task


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False, tags=["safeproc"])
def safeproc_virtualenv_requirements():
    @task
    def measurements() -> list[dict]:
        return [
            {"city": "Lisbon", "min": 11.2, "max": 24.9},
            {"city": "Oslo", "min": -4.3, "max": 17.1},
            {"city": "Nairobi", "min": 12.8, "max": 25.4},
        ]

    @task.process_pool(requirements=["tabulate==0.9.0"])
    def render_report(rows: list[dict]) -> str:
        # Imported here, inside the virtualenv: the DAG file itself must parse without it.
        from tabulate import tabulate

        table = tabulate(rows, headers="keys", tablefmt="github", floatfmt=".1f")
        print(table)  # streams into the task log, line by line
        return table

    render_report(measurements())


safeproc_virtualenv_requirements()
