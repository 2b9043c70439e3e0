"""Provider metadata for Airflow's ``apache_airflow_provider`` entry point.

Airflow calls this for every ``airflow providers`` command and when it discovers task
decorators, so it must import nothing heavy. A broken dict here breaks ``airflow providers
list`` for every provider: ``tests/test_provider_info.py`` validates it against Airflow's schema.
"""

from __future__ import annotations

from typing import Any

DOCUMENTATION = "https://airflow-provider-safeproc.github.io/airflow-provider-safeproc/"
# One how-to per use case, each backed by the gallery DAG of the same name (dags_examples/).
HOW_TO_GUIDES = (
    "cpu_bound_map",
    "existing_pool_code",
    "virtualenv_requirements",
    "threaded_scraper",
    "timeouts_and_retries",
    "sharded_map",
    "hook_per_item",
)


def get_provider_info() -> dict[str, Any]:
    from airflow_provider_safeproc import __version__

    return {
        "package-name": "airflow-provider-safeproc",
        "name": "Safe process pools",
        "description": (
            "Process pools that work inside Airflow tasks: in daemonic Celery task processes, "
            "from threaded parents, with no orphans and no hangs."
        ),
        "versions": [__version__],
        # As the Apache providers list theirs: the how-to pages, by their path in the repository.
        "integrations": [
            {
                "integration-name": "Safe process pools",
                "external-doc-url": DOCUMENTATION,
                "how-to-guide": [f"/docs/howto/{name}.rst" for name in HOW_TO_GUIDES],
                "tags": ["software"],
            }
        ],
        "task-decorators": [
            {"name": "parallel", "class-name": "airflow_provider_safeproc.decorators.parallel.parallel_task"},
            {
                "name": "process_pool",
                "class-name": "airflow_provider_safeproc.decorators.process_pool.process_pool_task",
            },
        ],
        # Read by operators/_config.py; documented in `airflow config list`.
        "config": {
            "safeproc": {
                "description": "Defaults for the process pools of airflow-provider-safeproc's operators.",
                "options": {
                    "max_workers": {
                        "description": (
                            "Worker processes per task when an operator does not set max_workers. "
                            "Empty: the CPUs the task process may use (affinity and cgroup quota)."
                        ),
                        "version_added": "0.1.0",
                        "type": "integer",
                        "example": "4",
                        "default": None,
                    },
                    "start_method": {
                        "description": (
                            "How pool workers start when an operator does not say: forkserver or spawn "
                            "(safe in threaded task processes), or fork. Empty: a safe default."
                        ),
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "spawn",
                        "default": None,
                    },
                    "engine": {
                        "description": (
                            "The pool engine of ParallelPythonOperator when it does not say: native "
                            "(Linux) or billiard (a billiard pool: portable, e.g. macOS). Empty: native "
                            "where the machine running the task has what it needs, billiard elsewhere."
                        ),
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "billiard",
                        "default": None,
                    },
                    "venv_cache_dir": {
                        "description": "Where ProcessPoolOperator keeps cached virtualenvs. Empty: a per-user cache.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/opt/airflow/safeproc-venvs",
                        "default": None,
                    },
                },
            }
        },
    }
