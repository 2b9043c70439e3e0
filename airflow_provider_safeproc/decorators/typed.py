"""The types DAG authors see: what ``parallel_task`` and ``process_pool_task`` give back.

Airflow types ``@task.<name>`` through one generic ``TaskDecorator``: a decorated function's
call takes the function's own parameters and returns an untyped ``XComArg``. For a per-item
function ``def crunch(x: int)`` that is wrong twice: the call takes the items
(``crunch([1, 2, 3])``), and mypy flags it. These protocols describe the same run-time objects
(Airflow's ``_TaskDecorator`` and ``XComArg``) as they behave for this provider's decorators:

- :class:`ParallelTask`: ``(x: T, *args: P) -> R`` becomes a call taking the items (an
  ``Iterable[T]`` or an upstream task's output) and ``*args: P``, giving a
  :class:`ParallelOutput` of ``list[R]``;
- :class:`ProcessPoolTask`: ``(*args: P) -> R`` becomes a call taking ``*args: P``, giving a
  :class:`TaskOutput` of ``R``.

Nothing here runs: the factories in ``parallel.py`` and ``process_pool.py`` return Airflow's
own objects, typed as these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, Generic, Literal, ParamSpec, Protocol, TypeVar, overload

from airflow_provider_safeproc import _compat

_T_contra = TypeVar("_T_contra", contravariant=True)
_R_co = TypeVar("_R_co", covariant=True)
_V_co = TypeVar("_V_co", covariant=True)
_P = ParamSpec("_P")


class TaskOutput(_compat.XComArg, Generic[_V_co]):
    """An upstream task's output (an ``XComArg``) whose value, when it is resolved, is ``V``.

    For annotations only: at run time task outputs are Airflow's own ``XComArg`` objects, so
    everything an ``XComArg`` does (``>>``, ``.map()``, ``.expand(...)`` arguments) works.
    ``output["key"]`` is the output's XCom under another key, as with Airflow's ``XComArg``.
    """

    if TYPE_CHECKING:

        def __getitem__(self, key: str) -> TaskOutput[Any]: ...


class ParallelOutput(TaskOutput[list[_V_co]]):
    """A ``parallel_task``'s output: the list of per-item results, in input order.

    After ``on_item_error="continue"`` the task fails and pushes no list; the successful
    results are under the key ``partial_results`` (None where an item failed):
    ``output["partial_results"]``, passed to a task with ``trigger_rule="all_done"``.
    """

    if TYPE_CHECKING:

        @overload
        def __getitem__(self, key: Literal["partial_results"]) -> TaskOutput[list[_V_co | None]]: ...
        @overload
        def __getitem__(self, key: Literal["run_summary"]) -> TaskOutput[dict[str, Any]]: ...
        @overload
        def __getitem__(self, key: str) -> TaskOutput[Any]: ...
        def __getitem__(self, key: str) -> TaskOutput[Any]: ...


class ParallelTask(Protocol[_T_contra, _P, _R_co]):
    """A ``parallel_task``: call it with the items first, then the arguments for every call.

    ``score(rows, model_path="/m.pkl")`` runs ``score(row, model_path="/m.pkl")`` for each row
    in worker processes; ``score.partial(model_path=...).expand(row=shards)`` makes one mapped
    task instance per shard (keyword: the per-item function's first parameter).
    """

    def __call__(
        self, items: Iterable[_T_contra] | _compat.XComArg, /, *args: _P.args, **kwargs: _P.kwargs
    ) -> ParallelOutput[_R_co]: ...

    @property
    def function(self) -> Callable[Concatenate[_T_contra, _P], _R_co]:
        """The per-item function, undecorated."""
        ...

    def partial(self, **kwargs: Any) -> ParallelTask[_T_contra, _P, _R_co]: ...

    def expand(self, **kwargs: Any) -> TaskOutput[Sequence[Sequence[_R_co]]]: ...

    def override(self, **kwargs: Any) -> ParallelTask[_T_contra, _P, _R_co]: ...


class ProcessPoolTask(Protocol[_P, _R_co]):
    """A ``process_pool_task``: called with the function's arguments, it runs in a fresh interpreter."""

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> TaskOutput[_R_co]: ...

    @property
    def function(self) -> Callable[_P, _R_co]:
        """The function, undecorated."""
        ...

    def partial(self, **kwargs: Any) -> ProcessPoolTask[_P, _R_co]: ...

    def expand(self, **kwargs: Any) -> TaskOutput[Sequence[_R_co]]: ...

    def override(self, **kwargs: Any) -> ProcessPoolTask[_P, _R_co]: ...
