"""``@task.parallel`` / ``@parallel_task``: the decorated function is the per-item function of a parallel map.

In the DAG it is called with the items as its first argument; other arguments go to every
call: ``score(rows, model_path="/m.pkl")``. Sharding: ``score.partial(model_path=...)
.expand(row=shards)`` (the first parameter's name), one mapped task instance per shard.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, overload

from airflow_provider_safeproc import _compat
from airflow_provider_safeproc.operators.parallel_python import ParallelPythonOperator

if TYPE_CHECKING:
    from airflow_provider_safeproc.decorators.typed import ParallelTask
    from airflow_provider_safeproc.validation import EngineName, OnItemError, StartMethod

_T = TypeVar("_T")
_R = TypeVar("_R")
_P = ParamSpec("_P")


def _first_parameter(fn: Callable[..., Any]) -> str:
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            return param.name
    raise TypeError(f"@task.parallel function {fn.__name__}() needs a first positional parameter: the item")


class _ParallelDecoratedOperator(_compat.DecoratedOperator, ParallelPythonOperator):
    custom_operator_name = "@task.parallel"
    template_fields: Sequence[str] = ParallelPythonOperator.template_fields

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Sequence[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        op_args = list(op_args or [])
        op_kwargs = dict(op_kwargs or {})
        first = _first_parameter(python_callable)
        # The DAG-time call score(rows, ...) binds the items to the first parameter.
        if op_args:
            iterable, rest_args, rest_kwargs = op_args[0], op_args[1:], op_kwargs
        else:
            rest_kwargs = {k: v for k, v in op_kwargs.items() if k != first}
            iterable, rest_args = op_kwargs.get(first), []
        kwargs.pop("multiple_outputs", None)
        super().__init__(
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            # A list of results, whatever the per-item function's return annotation says.
            multiple_outputs=False,
            kwargs_to_upstream={
                "python_callable": python_callable,
                "iterable": iterable,
                "op_args": rest_args,
                "op_kwargs": rest_kwargs,
            },
            **kwargs,
        )


@overload
def parallel_task(python_callable: Callable[Concatenate[_T, _P], _R], /) -> ParallelTask[_T, _P, _R]: ...


@overload
def parallel_task(
    *,
    max_workers: int | None = None,
    chunksize: int | None = None,
    item_timeout: float | None = None,
    item_soft_timeout: float | None = None,
    item_retries: int = 0,
    on_item_error: OnItemError = "fail",
    start_method: StartMethod | None = None,
    engine: EngineName | None = None,
    max_tasks_per_child: int | None = None,
    max_memory_per_child: float | None = None,
    preload: Sequence[str] = (),
    **kwargs: Any,
) -> Callable[[Callable[Concatenate[_T, _P], _R]], ParallelTask[_T, _P, _R]]: ...


def parallel_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
    """Make a function the per-item function of a parallel map: ``@parallel_task(max_workers=4)``.

    The typed spelling of ``@task.parallel`` (the same factory, registered with Airflow under
    that name): ``def score(row: Row, model_path: str) -> float`` decorated with it is called in
    the DAG as ``score(rows, model_path="/m.pkl")`` with ``rows`` an ``Iterable[Row]`` or an
    upstream task's output, and its output is a :class:`~.typed.ParallelOutput` of
    ``list[float]``. Keyword arguments are :class:`ParallelPythonOperator`'s and
    ``BaseOperator``'s (``task_id``, ``retries``, ``trigger_rule``...).
    """
    kwargs.pop("multiple_outputs", None)
    return _compat.task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=False,
        decorated_operator_class=_ParallelDecoratedOperator,
        **kwargs,
    )
