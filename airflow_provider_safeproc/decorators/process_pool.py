"""``@task.process_pool``: the decorated function runs in a fresh interpreter.

``@task.process_pool(max_workers=4, requirements=["..."])`` takes ProcessPoolOperator's
keyword arguments; a ``process_pool`` parameter receives a ready ProcessPoolExecutor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from airflow_provider_safeproc import _compat
from airflow_provider_safeproc.operators.process_pool import ProcessPoolOperator


class _ProcessPoolDecoratedOperator(_compat.DecoratedOperator, ProcessPoolOperator):
    custom_operator_name = "@task.process_pool"
    template_fields: Sequence[str] = ProcessPoolOperator.template_fields

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Sequence[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            kwargs_to_upstream={
                "python_callable": python_callable,
                "op_args": op_args,
                "op_kwargs": op_kwargs,
            },
            **kwargs,
        )


def process_pool_task(
    python_callable: Callable[..., Any] | None = None, multiple_outputs: bool | None = None, **kwargs: Any
) -> Any:
    """``@task.process_pool(...)``: see :class:`ProcessPoolOperator`."""
    return _compat.task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=multiple_outputs,
        decorated_operator_class=_ProcessPoolDecoratedOperator,
        **kwargs,
    )
