"""Task decorators: ``parallel_task`` and ``process_pool_task``.

Airflow knows them as ``@task.parallel`` and ``@task.process_pool`` (registered in
get_provider_info); imported from here they are typed for mypy: see :mod:`.typed`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow_provider_safeproc._lazy import lazy_exports

__all__ = [
    "ParallelOutput",
    "ParallelTask",
    "ProcessPoolTask",
    "TaskOutput",
    "parallel_task",
    "process_pool_task",
]

_LAZY = {
    "parallel_task": "airflow_provider_safeproc.decorators.parallel",
    "process_pool_task": "airflow_provider_safeproc.decorators.process_pool",
    "ParallelOutput": "airflow_provider_safeproc.decorators.typed",
    "ParallelTask": "airflow_provider_safeproc.decorators.typed",
    "ProcessPoolTask": "airflow_provider_safeproc.decorators.typed",
    "TaskOutput": "airflow_provider_safeproc.decorators.typed",
}

if TYPE_CHECKING:
    from airflow_provider_safeproc.decorators.parallel import parallel_task
    from airflow_provider_safeproc.decorators.process_pool import process_pool_task
    from airflow_provider_safeproc.decorators.typed import (
        ParallelOutput,
        ParallelTask,
        ProcessPoolTask,
        TaskOutput,
    )


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
