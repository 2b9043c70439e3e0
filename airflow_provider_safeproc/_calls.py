"""Picklable call shapes used by the operators.

They live in the core, not in ``operators/``, because workers import them by reference and
must not import Airflow to do so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any


def call_with_item(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], item: Any) -> Any:
    """``fn(item, *args, **kwargs)``: the per-item call of ParallelPythonOperator."""
    return fn(item, *args, **kwargs)
