"""Provider metadata for Airflow's ``apache_airflow_provider`` entry point.

Airflow calls this for every ``airflow providers`` command and when it discovers task
decorators, so it must import nothing heavy. A broken dict here breaks ``airflow providers
list`` for every provider: ``tests/test_provider_info.py`` validates it against Airflow's schema.
"""

from __future__ import annotations

from typing import Any


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
        "task-decorators": [],
    }
