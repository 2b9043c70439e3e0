"""A callable in a fresh interpreter: ``run_in_interpreter``, ``start_in_interpreter``, virtualenvs.

- ``run``: ``start_in_interpreter`` / ``run_in_interpreter``, the entry points.
- ``handle``: ``InterpreterHandle``, the parent's side: start, result, kill.
- ``channels``: the three channels to the child, read by one thread, and the clock.
- ``child``: the script the fresh interpreter runs (stdlib only: an overseer and a runner).
- ``target``: which python runs the callable, and whether it can (the one interpreter probe).
- ``virtualenv``: ``ensure_virtualenv``, the cache of virtualenvs built once per set of inputs.

Nothing here is imported until asked for: workers import the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow_provider_safeproc._lazy import lazy_exports

__all__ = [
    "InterpreterHandle",
    "VirtualenvPython",
    "ensure_virtualenv",
    "run_in_interpreter",
    "start_in_interpreter",
]

_LAZY = {
    "InterpreterHandle": "airflow_provider_safeproc.interpreter.handle",
    "run_in_interpreter": "airflow_provider_safeproc.interpreter.run",
    "start_in_interpreter": "airflow_provider_safeproc.interpreter.run",
    "ensure_virtualenv": "airflow_provider_safeproc.interpreter.virtualenv",
    "VirtualenvPython": "airflow_provider_safeproc.interpreter.virtualenv",
}

if TYPE_CHECKING:
    from airflow_provider_safeproc.interpreter.handle import InterpreterHandle
    from airflow_provider_safeproc.interpreter.run import run_in_interpreter, start_in_interpreter
    from airflow_provider_safeproc.interpreter.virtualenv import VirtualenvPython, ensure_virtualenv

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
