"""Process pools that work inside Airflow tasks.

The package: the Airflow-free core (``pool/``: the process pool; ``interpreter/``: a callable
in a fresh interpreter; and the modules they share: ``errors``, ``validation``,
``serialization``, ``reaper``, ``streams``, ``cpu``, ``progress``, ``task_context_guard``),
and the Airflow adapters (``operators/``, ``decorators/``, ``_compat``).

This module stays light on purpose: worker processes import the package, so nothing here may
import ``airflow`` (a test enforces it). Public names are resolved lazily on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow_provider_safeproc._lazy import lazy_exports

__version__ = "0.1.0.dev0"

# public name -> module that defines it; imported on first attribute access (PEP 562)
_LAZY = {
    "SafeProcessPoolExecutor": "airflow_provider_safeproc.pool.executor",
    "ItemOutcome": "airflow_provider_safeproc.pool.jobs",
    "MapSummary": "airflow_provider_safeproc.pool.jobs",
    "format_progress": "airflow_provider_safeproc.progress",
    "run_in_interpreter": "airflow_provider_safeproc.interpreter.run",
    "start_in_interpreter": "airflow_provider_safeproc.interpreter.run",
    "InterpreterHandle": "airflow_provider_safeproc.interpreter.handle",
    "ensure_virtualenv": "airflow_provider_safeproc.interpreter.virtualenv",
    "reap_process_tree": "airflow_provider_safeproc.reaper",
    "effective_cpu_count": "airflow_provider_safeproc.cpu",
    "refuse_task_context": "airflow_provider_safeproc.task_context_guard",
}

__all__ = [
    "InterpreterHandle",
    "ItemOutcome",
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
    from airflow_provider_safeproc.interpreter.handle import InterpreterHandle
    from airflow_provider_safeproc.interpreter.run import run_in_interpreter, start_in_interpreter
    from airflow_provider_safeproc.interpreter.virtualenv import ensure_virtualenv
    from airflow_provider_safeproc.pool.executor import SafeProcessPoolExecutor
    from airflow_provider_safeproc.pool.jobs import ItemOutcome, MapSummary
    from airflow_provider_safeproc.progress import format_progress
    from airflow_provider_safeproc.reaper import reap_process_tree
    from airflow_provider_safeproc.task_context_guard import refuse_task_context


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
