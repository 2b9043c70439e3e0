"""Airflow operators over the core. Imported lazily so that importing one does not import all."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow_provider_safeproc._lazy import lazy_exports

__all__ = ["ParallelPythonOperator", "ProcessPoolOperator", "task_context_resolver"]

_LAZY = {
    "ParallelPythonOperator": "airflow_provider_safeproc.operators.parallel_python",
    "ProcessPoolOperator": "airflow_provider_safeproc.operators.process_pool",
    "task_context_resolver": "airflow_provider_safeproc.operators.task_context",
}

if TYPE_CHECKING:
    from airflow_provider_safeproc.operators.parallel_python import ParallelPythonOperator
    from airflow_provider_safeproc.operators.process_pool import ProcessPoolOperator
    from airflow_provider_safeproc.operators.task_context import task_context_resolver


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
