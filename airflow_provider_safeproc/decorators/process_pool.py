"""``@task.process_pool`` / ``@process_pool_task``: the decorated function runs in a fresh interpreter.

``@task.process_pool(max_workers=4, requirements=["..."])`` takes ProcessPoolOperator's
keyword arguments; a ``process_pool`` parameter receives a ready ProcessPoolExecutor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from airflow_provider_safeproc import _compat
from airflow_provider_safeproc.operators.process_pool import ProcessPoolOperator

if TYPE_CHECKING:
    from airflow_provider_safeproc.decorators.typed import ProcessPoolTask

_R = TypeVar("_R")
_P = ParamSpec("_P")


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


@overload
def process_pool_task(python_callable: Callable[_P, _R], /) -> ProcessPoolTask[_P, _R]: ...


@overload
def process_pool_task(
    *,
    multiple_outputs: bool | None = None,
    max_workers: int | None = None,
    requirements: Sequence[str] | str | None = None,
    python: str | None = None,
    system_site_packages: bool = False,
    venv_cache_dir: str | None = None,
    pip_args: Sequence[str] | None = None,
    env_vars: Mapping[str, str] | None = None,
    inherit_env: bool = True,
    timeout: float | None = None,
    **kwargs: Any,
) -> Callable[[Callable[_P, _R]], ProcessPoolTask[_P, _R]]: ...


def process_pool_task(
    python_callable: Callable[..., Any] | None = None, multiple_outputs: bool | None = None, **kwargs: Any
) -> Any:
    """Run the decorated function in a fresh interpreter: ``@process_pool_task(max_workers=4)``.

    The typed spelling of ``@task.process_pool`` (the same factory, registered with Airflow
    under that name): the call takes the function's own arguments and its output is a
    :class:`~.typed.TaskOutput` of the function's return type. Keyword arguments are
    :class:`ProcessPoolOperator`'s and ``BaseOperator``'s.
    """
    return _compat.task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=multiple_outputs,
        decorated_operator_class=_ProcessPoolDecoratedOperator,
        **kwargs,
    )
