"""The logger name the operators' task-log lines carry.

Airflow names an operator's logger after its class, so ``@task.parallel`` lines would show the
private ``_ParallelDecoratedOperator``. A private class logs under the public operator it
extends; a user's subclass keeps its own name; an explicit ``logger_name`` wins.
"""

from __future__ import annotations


def default_logger_name(cls: type, public: type) -> str:
    """``module.Class`` of ``cls``, or of ``public`` when ``cls`` is private (``_X``)."""
    shown = public if cls.__name__.startswith("_") else cls
    return f"{shown.__module__}.{shown.__qualname__}"
