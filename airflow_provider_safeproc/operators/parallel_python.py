"""ParallelPythonOperator: map a callable over many items in a process pool inside one task.

Where ``.expand`` creates one task instance per item (seconds of scheduling each), this runs
the whole map in one task at process-pool speed, and works where the stdlib's pools do not: a
daemonic Celery task process, or a task runner with threads. Results go to XCom in input order.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, ClassVar

from airflow_provider_safeproc import _compat
from airflow_provider_safeproc._calls import call_with_item
from airflow_provider_safeproc.errors import ConfigurationError, ItemFailedError, PartialFailureError
from airflow_provider_safeproc.operators import _config
from airflow_provider_safeproc.operators._context import (
    context_kwargs,
    push_run_summary,
    refuse_task_process_only_params,
)
from airflow_provider_safeproc.operators._logging import default_logger_name
from airflow_provider_safeproc.validation import (
    ON_ITEM_ERROR,
    EngineName,
    OnItemError,
    StartMethod,
    check_callable,
    check_choice,
    check_engine,
    check_item_timeouts,
    check_module_names,
    check_non_negative_int,
    check_positive_int,
    check_positive_number,
    check_start_method,
)

if TYPE_CHECKING:
    from airflow_provider_safeproc.pool.executor import SafeProcessPoolExecutor

PROGRESS_EVERY_S = 10.0
#: The XCom key of the results, None where an item failed (``on_item_error="continue"``).
PARTIAL_RESULTS_KEY = "partial_results"


def _partial_results_hint(task_id: str) -> str:
    """Where the successful results are, and the TaskFlow way to reach them (a plain pull of
    the task's output finds no ``return_value``: the task failed)."""
    return (
        f"The results of the other items are in the XCom {PARTIAL_RESULTS_KEY!r} of task {task_id!r} "
        f'(None where an item failed). Downstream, with trigger_rule="all_done": pass '
        f'output["{PARTIAL_RESULTS_KEY}"], where output is what the decorated call returned or the '
        f'operator\'s .output, or pull it with ti.xcom_pull(task_ids={task_id!r}, key="{PARTIAL_RESULTS_KEY}").'
    )


class ParallelPythonOperator(_compat.BaseOperator):
    """Call ``python_callable(item, *op_args, **op_kwargs)`` for every item, in worker processes.

    The return value (pushed to XCom) is the list of results in input order. Workers are fresh
    interpreters that never import Airflow: the callable, its arguments and results travel with
    cloudpickle, so lambdas, closures and functions defined in DAG files work. Workers are not
    task processes: ``Variable.get``, connections, XComs and ``get_current_context()`` raise
    ``TaskContextUnavailableError`` inside the callable. Resolve them in the task (templates,
    upstream tasks) and pass the values; name context values as parameters.

    :param python_callable: Called once per item as ``python_callable(item, *op_args, **op_kwargs)``.
        Context values that serialize (``ds``, ``logical_date``, ``run_id``, ``params``,
        ``dag_run``...) are passed when its signature names them, as with PythonOperator.
    :param iterable: The items: a list, a template that renders to a list (set
        ``render_template_as_native_obj=True`` on the DAG), an upstream task's output
        (``XComArg``), or one shard per mapped task instance through
        ``.partial(...).expand(iterable=shards)``. (templated)
    :param op_args: Extra positional arguments for every call. (templated)
    :param op_kwargs: Extra keyword arguments for every call. (templated)
    :param max_workers: Worker processes. None: ``[safeproc] max_workers``, else the CPUs this
        task may really use (affinity and cgroup quota). An int >= 1.
    :param chunksize: Items sent to a worker at a time. None: chosen from the number of items
        and workers. An int >= 1.
    :param item_timeout: Seconds one item may run; past it the worker is killed and replaced and
        the item fails with ``ItemTimeoutError``. None: no limit.
    :param item_soft_timeout: Seconds after which ``ItemSoftTimeoutError`` is raised inside the
        running item, so it can clean up (close a browser, a connection). An item that catches
        it and returns succeeds; one that lets it propagate fails (and counts toward
        ``item_retries``). Below ``item_timeout`` when both are set. None: no soft limit.
    :param item_retries: Times an item that raised, timed out or lost its worker is run again
        before it counts as failed. An int >= 0.
    :param on_item_error: ``"fail"``: stop at the first failed item, cancel the rest and fail the
        task. ``"continue"``: run every item and push the results to XCom under the key
        ``partial_results`` too (None where an item failed); if any item failed, fail the task
        with one summary of every failed item. A downstream task with
        ``trigger_rule="all_done"`` takes ``output["partial_results"]`` (the decorated call's
        return value, or the operator's ``.output``): it is there whether items failed or not.
        With ``do_xcom_push=False`` nothing is pushed (results can be large); the task log
        still gets the run summary.
    :param start_method: ``"forkserver"``, ``"spawn"`` or ``"fork"`` (native engine only). None:
        ``[safeproc] start_method``, else a safe default (never fork from a threaded process).
    :param engine: ``"native"`` (Linux) or ``"billiard"`` (a billiard pool: portable, e.g.
        macOS). None: ``[safeproc] engine``, else native where the machine running the task
        has what it needs, billiard elsewhere; the task log says which and why. An engine that
        cannot run on that machine fails the task there, before any item runs.
    :param max_tasks_per_child: Replace a worker after this many items (leaky libraries).
    :param max_memory_per_child: Replace a worker whose resident memory grew past this many MiB.
    :param preload: Modules to import once where the workers start from, instead of in each
        worker (``["pandas"]``). What ``python_callable`` refers to is preloaded without being
        named; name what it imports inside its body.
    """

    template_fields: Sequence[str] = ("iterable", "op_args", "op_kwargs")
    template_fields_renderers: ClassVar[dict[str, str]] = {"op_args": "py", "op_kwargs": "py"}
    ui_color = "#d6eaf8"

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        iterable: Any,
        op_args: Sequence[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
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
    ) -> None:
        kwargs.setdefault("logger_name", default_logger_name(type(self), ParallelPythonOperator))
        super().__init__(**kwargs)
        self.python_callable = check_callable("python_callable", python_callable)
        self.iterable = iterable
        self.op_args: Collection[Any] = list(op_args or [])
        self.op_kwargs: Mapping[str, Any] = dict(op_kwargs or {})
        self.max_workers = check_positive_int("max_workers", max_workers)
        self.chunksize = check_positive_int("chunksize", chunksize)
        self.item_timeout, self.item_soft_timeout = check_item_timeouts(item_timeout, item_soft_timeout)
        self.item_retries = check_non_negative_int("item_retries", item_retries)
        self.on_item_error = check_choice("on_item_error", on_item_error, ON_ITEM_ERROR)
        self.start_method = check_start_method(start_method)
        self.engine = check_engine(engine)
        self.max_tasks_per_child = check_positive_int("max_tasks_per_child", max_tasks_per_child)
        self.max_memory_per_child = check_positive_number(
            "max_memory_per_child", max_memory_per_child, unit="MiB"
        )
        self.preload = list(check_module_names("preload", preload))
        refuse_task_process_only_params(
            self.python_callable, skip_positional=1 + len(self.op_args), explicit=self.op_kwargs
        )
        self._pool: SafeProcessPoolExecutor | None = None

    def execute(self, context: Any) -> list[Any]:
        from airflow_provider_safeproc.operators.task_context import task_context_resolver
        from airflow_provider_safeproc.pool.executor import SafeProcessPoolExecutor
        from airflow_provider_safeproc.task_context_guard import refuse_task_context

        items = self._items()
        kwargs = {
            **self.op_kwargs,
            **context_kwargs(
                self.python_callable, context, skip_positional=1 + len(self.op_args), explicit=self.op_kwargs
            ),
        }
        per_item = functools.partial(call_with_item, self.python_callable, tuple(self.op_args), kwargs)
        pool = SafeProcessPoolExecutor(
            self.max_workers or _config.default_max_workers(),
            start_method=self.start_method or _config.default_start_method(),
            engine=self.engine or _config.default_engine(),
            item_timeout=self.item_timeout,
            item_soft_timeout=self.item_soft_timeout,
            max_tasks_per_child=self.max_tasks_per_child,
            max_memory_per_child=self.max_memory_per_child,
            preload=self.preload,
            initializer=refuse_task_context,
            context_resolver=task_context_resolver(self.log.info),
            log=self.log.info,
            progress=self._progress_logger(),
        )
        self._pool = pool
        self.log.info("engine %s (%s)", pool.engine, pool.engine_reason)
        try:
            with pool:
                results, failures = self._run(pool, per_item, items)
        finally:
            self._pool = None
            self._report_summary(pool, context)
        if failures and self.on_item_error == "fail":
            index, error = failures[0]
            raise ItemFailedError(index, error) from error
        # "continue": partial_results always, so that a downstream task can always take
        # output["partial_results"] (a missing key fails its XComArg). Nothing when
        # do_xcom_push=False.
        keep_partial = self.on_item_error == "continue" and self.do_xcom_push
        if keep_partial:
            context["ti"].xcom_push(key=PARTIAL_RESULTS_KEY, value=results)
        if failures:
            hint = _partial_results_hint(self.task_id) if keep_partial else ""
            raise PartialFailureError(failures, total=len(items), hint=hint)
        return results

    def _report_summary(self, pool: SafeProcessPoolExecutor, context: Any) -> None:
        """Log the run summary; with do_xcom_push also push it as XCom ``run_summary``."""
        summary = pool.summary
        if summary is None:
            return
        self.log.info("run summary: %s", summary)
        push_run_summary(
            self,
            context,
            {
                "items": summary.items,
                "failures": summary.failures,
                "retries": summary.retries,
                "workers": len(summary.worker_pids),
                "wall_time": round(summary.wall_time, 3),
                "items_per_second": round(summary.items_per_second, 1),
            },
        )

    def _run(
        self, pool: SafeProcessPoolExecutor, per_item: Callable[[Any], Any], items: list[Any]
    ) -> tuple[list[Any], list[tuple[int, BaseException]]]:
        results: list[Any] = [None] * len(items)
        failures: list[tuple[int, BaseException]] = []
        cancelled: list[tuple[int, BaseException]] = []
        stop_on_error = self.on_item_error == "fail"
        outcomes = pool.map_outcomes(
            per_item, items, chunksize=self.chunksize, retries=self.item_retries, stop_on_error=stop_on_error
        )
        for outcome in outcomes:
            if outcome.ok:
                results[outcome.index] = outcome.value
                continue
            error = outcome.error
            assert error is not None
            if stop_on_error and isinstance(error, CancelledError):
                # Not run because a later item failed first (outcomes come in input order): that
                # failure is the one to report, further on.
                cancelled.append((outcome.index, error))
                continue
            failures.append((outcome.index, error))
            cause = getattr(error, "__cause__", None)
            self.log.error(
                "item %d failed after %d attempt(s): %s: %s%s",
                outcome.index,
                outcome.attempts,
                type(error).__name__,
                error,
                f"\nworker traceback:\n{cause}" if cause is not None else "",
            )
            if stop_on_error:
                break
        if not failures and cancelled:  # only cancellations (the pool was stopped): those then
            failures.append(cancelled[0])
        return results, failures

    def _items(self) -> list[Any]:
        value = self.iterable
        if isinstance(value, (str, bytes)):
            shown: str | bytes = value
            if isinstance(value, str) and len(value) > 80:
                shown = value[:77] + "..."
            elif isinstance(value, bytes) and len(value) > 80:
                shown = value[:77] + b"..."
            raise ConfigurationError(
                f"iterable rendered to a string ({shown!r}), not a list of items. A Jinja template "
                "renders to text unless the DAG sets render_template_as_native_obj=True; or pass a "
                "list or an upstream task's output (XComArg) instead of a template."
            )
        if not isinstance(value, Iterable):
            raise ConfigurationError(
                f"iterable must be an iterable of items (a list, tuple, XComArg...), got {value!r} "
                f"({type(value).__name__})"
            )
        return list(value)

    def _progress_logger(self) -> Callable[[int, int | None], None]:
        """A progress sink that logs at most every 10 s, and always the last item."""
        from airflow_provider_safeproc.progress import format_progress

        started = time.monotonic()
        last = [started]

        def report(done: int, total: int | None) -> None:
            now = time.monotonic()
            if done != total and now - last[0] < PROGRESS_EVERY_S:
                return
            last[0] = now
            self.log.info("%s", format_progress(done, total, now - started))

        return report

    def on_kill(self) -> None:
        """Task failed, cleared or timed out: end every worker and descendant now (no locks)."""
        pool = self._pool
        if pool is not None:
            pool.kill()
