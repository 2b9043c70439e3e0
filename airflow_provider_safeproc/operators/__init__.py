"""Airflow operators over the core. Imported lazily so that importing one does not import all."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ParallelPythonOperator", "ProcessPoolOperator"]

_LAZY = {
    "ParallelPythonOperator": "airflow_provider_safeproc.operators.parallel_python",
    "ProcessPoolOperator": "airflow_provider_safeproc.operators.process_pool",
}

if TYPE_CHECKING:
    from airflow_provider_safeproc.operators.parallel_python import ParallelPythonOperator
    from airflow_provider_safeproc.operators.process_pool import ProcessPoolOperator


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
