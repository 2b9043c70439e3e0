"""Process pools that work inside Airflow tasks.

This module stays light on purpose: worker processes import the package, so nothing here may
import ``airflow`` (a test enforces it). Public names are resolved lazily on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow_provider_safeproc._lazy import lazy_exports

__version__ = "0.1.0.dev0"

# public name -> module that defines it; imported on first attribute access (PEP 562)
_LAZY = {
    "SafeProcessPoolExecutor": "airflow_provider_safeproc.executor",
    "MapSummary": "airflow_provider_safeproc.executor",
    "format_progress": "airflow_provider_safeproc.progress",
    "run_in_interpreter": "airflow_provider_safeproc.interpreter",
    "start_in_interpreter": "airflow_provider_safeproc.interpreter",
    "InterpreterHandle": "airflow_provider_safeproc.interpreter",
    "ensure_virtualenv": "airflow_provider_safeproc.virtualenv_cache",
    "reap_process_tree": "airflow_provider_safeproc.reaper",
    "effective_cpu_count": "airflow_provider_safeproc.cpu",
    "refuse_task_context": "airflow_provider_safeproc.task_context_guard",
}

__all__ = [
    "InterpreterHandle",
    "MapSummary",
    "SafeProcessPoolExecutor",
    "__version__",
    "effective_cpu_count",
    "ensure_virtualenv",
    "format_progress",
    "reap_process_tree",
    "refuse_task_context",
    "run_in_interpreter",
    "start_in_interpreter",
]

if TYPE_CHECKING:
    from airflow_provider_safeproc.cpu import effective_cpu_count
    from airflow_provider_safeproc.executor import MapSummary, SafeProcessPoolExecutor
    from airflow_provider_safeproc.interpreter import (
        InterpreterHandle,
        run_in_interpreter,
        start_in_interpreter,
    )
    from airflow_provider_safeproc.progress import format_progress
    from airflow_provider_safeproc.reaper import reap_process_tree
    from airflow_provider_safeproc.task_context_guard import refuse_task_context
    from airflow_provider_safeproc.virtualenv_cache import ensure_virtualenv


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
