"""The one place that knows Airflow 2 from Airflow 3.

Every shim says why it exists and when it can go. Imported only by the operators, decorators
and tests, never by the core (workers must not import Airflow). The tests' own version shims
(DagBag, task states, XCom reads) live in ``tests/harness/airflow_compat.py``.
"""

from __future__ import annotations

from airflow import __version__ as AIRFLOW_VERSION

AIRFLOW_V_3 = int(AIRFLOW_VERSION.split(".", 1)[0]) >= 3

# Airflow 3 moved authoring names to the Task SDK (airflow.sdk); 2.x has them in airflow.models
# and airflow.decorators. Drop the 2.x branches when 2.x support ends.
if AIRFLOW_V_3:
    from airflow.sdk import BaseOperator, get_current_context
    from airflow.sdk.bases.decorator import DecoratedOperator, task_decorator_factory
    from airflow.sdk.definitions.context import Context
else:  # pragma: no cover - exercised by `make test-airflow2`
    from airflow.decorators.base import DecoratedOperator, task_decorator_factory
    from airflow.models.baseoperator import BaseOperator
    from airflow.operators.python import get_current_context
    from airflow.utils.context import Context

__all__ = [
    "AIRFLOW_VERSION",
    "AIRFLOW_V_3",
    "BaseOperator",
    "Context",
    "DecoratedOperator",
    "get_current_context",
    "task_decorator_factory",
]
