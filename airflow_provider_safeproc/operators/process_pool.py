"""ProcessPoolOperator: run a callable in a freshly spawned interpreter, pools included.

The task process may be daemonic (Celery prefork, Airflow 2's LocalExecutor) or have threads;
a new interpreter is neither, so code that already uses ``multiprocessing``,
``ProcessPoolExecutor`` or ``joblib`` runs there unchanged and at full parallelism. It is what
PythonVirtualenvOperator would be if it shipped closures, streamed logs, honoured
``execution_timeout`` and left nothing running.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from airflow_provider_safeproc import _compat
from airflow_provider_safeproc.errors import ConfigurationError, RemoteTraceback
from airflow_provider_safeproc.operators import _config
from airflow_provider_safeproc.operators._context import (
    SERIALIZABLE_CONTEXT_KEYS,
    context_kwargs,
    plain_value,
    push_run_summary,
    refuse_task_process_only_params,
)
from airflow_provider_safeproc.operators._logging import default_logger_name
from airflow_provider_safeproc.validation import check_callable, check_positive_int, check_positive_number

if TYPE_CHECKING:
    from airflow_provider_safeproc.interpreter.handle import InterpreterHandle

#: A callable parameter with this name receives a ready ProcessPoolExecutor. Not ``pool`` or
#: ``executor``: both are BaseOperator arguments.
POOL_PARAMETER = "process_pool"


def _takes_process_pool(fn: Callable[..., Any]) -> bool:
    import inspect

    try:
        return POOL_PARAMETER in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _with_process_pool(fn: Callable[..., Any], max_workers: int) -> Callable[..., Any]:
    """Wrap ``fn`` so that, in the child, it gets a ProcessPoolExecutor shut down after it returns.

    A closure on purpose: cloudpickle ships it by value, so the child (perhaps a virtualenv
    without this package) needs nothing but the stdlib to run it.
    """

    def run_with_process_pool(*args: Any, **kwargs: Any) -> Any:
        from concurrent.futures import ProcessPoolExecutor

        initializer: Callable[[], None] | None
        try:  # its workers ask the task for Variables and Connections, as pool workers do
            from airflow_provider_safeproc.task_context_guard import refuse_task_context as initializer
        except ImportError:  # a virtualenv without this package
            initializer = None
        with ProcessPoolExecutor(max_workers, initializer=initializer) as process_pool:
            return fn(*args, process_pool=process_pool, **kwargs)

    return run_with_process_pool


def _plain_context(context: Any) -> dict[str, Any]:
    """The context values that travel as plain values (see ``_context``), for ``get_current_context()``."""
    return {key: plain_value(context[key]) for key in SERIALIZABLE_CONTEXT_KEYS if key in context}


def _task_instance_fields(ti: Any) -> dict[str, Any]:
    return {
        name: getattr(ti, name, None) for name in ("dag_id", "task_id", "run_id", "try_number", "map_index")
    }


def _acting_for_the_task(
    fn: Callable[..., Any], context: dict[str, Any], task_instance: dict[str, Any]
) -> Callable[..., Any]:
    """Wrap ``fn`` so that, in the child, Airflow's task context is the task's.

    The child is not a task process (see :mod:`~airflow_provider_safeproc.task_context_guard`):
    its environment holds the task's context channel, over which the task process answers
    Variables and Connections (hooks), XCom pulls and pushes through ``ti``, while
    ``get_current_context()`` gives ``context`` (plain values) with such a ``ti``. Only the
    child's main process acts for the task; the pools of this package started there ask for
    Variables and Connections as pool workers do, stdlib pools forked there are refused. A
    closure, like :func:`_with_process_pool`.
    """

    def run_acting_for_the_task(*args: Any, **kwargs: Any) -> Any:
        try:
            from airflow_provider_safeproc.task_context_guard import act_for_the_task
        except ImportError:  # a virtualenv without this package (and, usually, without Airflow)
            pass
        else:
            act_for_the_task(context, task_instance)
        try:
            return fn(*args, **kwargs)
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] != "airflow":
                raise
            import sys

            raise ModuleNotFoundError(
                f"{exc} in the interpreter {sys.executable}: Variables, Connections, hooks and every "
                "other Airflow API need an interpreter that can import Airflow (the task's own: no "
                "python= nor requirements=; or a virtualenv with apache-airflow in its requirements, "
                "or system_site_packages=True over an interpreter that has it). Or resolve the values "
                "in the task and pass them in (op_kwargs, templates).",
                name=exc.name,
            ) from exc

    return run_acting_for_the_task


class ProcessPoolOperator(_compat.BaseOperator):
    """Run ``python_callable(*op_args, **op_kwargs)`` in a new interpreter; its return value goes to XCom.

    The callable travels with cloudpickle (lambdas, closures and DAG-file functions work) and
    its output reaches the task log line by line while it runs. When the task is killed, times
    out or fails, the interpreter and every process it started are ended.

    :param python_callable: The function to run. If it has a parameter named ``process_pool``,
        it receives a ``concurrent.futures.ProcessPoolExecutor(max_workers)`` created in the new
        interpreter and shut down after the callable returns. Context values that serialize
        (``ds``, ``logical_date``, ``run_id``, ``params``, ``dag_run`` with ``.conf``...) are
        passed when its signature names them. Airflow is not imported in the child unless the
        callable does; there ``Variable.get`` and connections (``BaseHook.get_connection``,
        hooks) are answered by the task process, once per key, as in pool workers, and
        ``get_current_context()`` gives the task's context, with a ``ti`` whose XCom pulls and
        pushes the task process does (where the child's interpreter can import Airflow).
    :param op_args: Positional arguments for the callable. (templated)
    :param op_kwargs: Keyword arguments for the callable. (templated)
    :param max_workers: Size of the ``process_pool`` handed to the callable. None:
        ``[safeproc] max_workers``, else the CPUs this task may really use.
    :param requirements: Extra requirements: a list of specifiers, or the path of a
        requirements file. The callable then runs in a cached virtualenv built with them (and
        cloudpickle pinned to this process's version). (templated)
    :param python: An existing interpreter to run in (same Python minor version); with
        ``requirements``, the base interpreter the virtualenv is built from.
    :param system_site_packages: Let the virtualenv see the base interpreter's packages.
    :param venv_cache_dir: Where virtualenvs are cached. None: ``[safeproc] venv_cache_dir``,
        else a per-user cache directory.
    :param pip_args: Extra arguments for the installer (e.g. ``["--index-url", ...]``).
    :param env_vars: Environment variables set for the child. (templated)
    :param inherit_env: Start from this task process's environment (True) or from an empty
        one holding only ``env_vars`` and ``PATH`` (False).
    :param timeout: Seconds the child may run before it and its descendants are ended. The
        task's ``execution_timeout`` applies as well.
    """

    template_fields: Sequence[str] = ("op_args", "op_kwargs", "requirements", "env_vars")
    template_fields_renderers: ClassVar[dict[str, str]] = {"op_args": "py", "op_kwargs": "py"}
    ui_color = "#d5f5e3"

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Sequence[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
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
    ) -> None:
        kwargs.setdefault("logger_name", default_logger_name(type(self), ProcessPoolOperator))
        super().__init__(**kwargs)
        self.python_callable = check_callable("python_callable", python_callable)
        self.op_args: Collection[Any] = list(op_args or [])
        self.op_kwargs: Mapping[str, Any] = dict(op_kwargs or {})
        self.max_workers = check_positive_int("max_workers", max_workers)
        self.timeout = check_positive_number("timeout", timeout, unit="seconds")
        if requirements is not None and not isinstance(requirements, (str, list, tuple)):
            raise ConfigurationError(
                "requirements must be a list of requirement specifiers or the path of a requirements "
                f"file, got {requirements!r} ({type(requirements).__name__})"
            )
        self.requirements = requirements
        if python is not None and not (shutil.which(python) or os.access(python, os.X_OK)):
            raise ConfigurationError(f"python={python!r} does not exist or is not executable")
        self.python = python
        self.system_site_packages = bool(system_site_packages)
        self.venv_cache_dir = venv_cache_dir
        self.pip_args = list(pip_args or [])
        self.env_vars = dict(env_vars or {})
        self.inherit_env = bool(inherit_env)
        refuse_task_process_only_params(
            self.python_callable,
            skip_positional=len(self.op_args),
            explicit=self.op_kwargs,
            reserved=(POOL_PARAMETER,),
        )
        self._handle: InterpreterHandle[Any] | None = None

    def execute(self, context: Any) -> Any:
        from airflow_provider_safeproc.context_channel import ContextServer
        from airflow_provider_safeproc.interpreter.run import start_in_interpreter
        from airflow_provider_safeproc.operators.task_context import task_context_resolver

        python = self._interpreter()
        fn = self.python_callable
        kwargs = {
            **self.op_kwargs,
            **context_kwargs(
                fn,
                context,
                skip_positional=len(self.op_args),
                explicit=self.op_kwargs,
                reserved=(POOL_PARAMETER,),
            ),
        }
        pool_size = None
        if _takes_process_pool(fn):
            pool_size = self._pool_size()
            fn = _with_process_pool(fn, pool_size)
        ti = context.get("ti")
        fn = _acting_for_the_task(fn, _plain_context(context), _task_instance_fields(ti))
        # The child (and the pools it starts) ask this process for Variables and Connections;
        # the child's main process for XComs too, done on this task's own ti.
        channel = ContextServer(task_context_resolver(self.log.info, ti=ti))
        try:
            handle = start_in_interpreter(
                fn,
                *self.op_args,
                python=python,
                env=self._environment(channel.environment),
                timeout=self.timeout,
                log=self.log.info,
                **kwargs,
            )
        except BaseException:
            channel.close()
            raise
        self._handle = handle
        started = time.monotonic()
        outcome = "failed"
        try:
            result = handle.result()
            outcome = "succeeded"
            return result
        except Exception as exc:
            cause = exc.__cause__
            if isinstance(cause, RemoteTraceback):
                self.log.error("the callable raised %s: %s\n%s", type(exc).__name__, exc, cause.tb)
            raise
        finally:
            handle.kill()  # no-op when it already ended; ends everything on any exception
            channel.close()
            self._handle = None
            self._report_summary(context, handle.pid, outcome, time.monotonic() - started, pool_size)

    def _report_summary(
        self, context: Any, pid: int, outcome: str, seconds: float, pool_size: int | None
    ) -> None:
        """One log line; with do_xcom_push also the XCom ``run_summary`` (as ParallelPythonOperator)."""
        pool = f", process_pool of {pool_size} workers" if pool_size else ""
        self.log.info("run summary: interpreter %d %s in %.2f s%s", pid, outcome, seconds, pool)
        summary = {"interpreter_pid": pid, "outcome": outcome, "wall_time": round(seconds, 3)}
        push_run_summary(self, context, {**summary, "workers": pool_size})

    def on_kill(self) -> None:
        """Task failed, cleared or timed out: end the interpreter and all it started (no locks)."""
        handle = self._handle
        if handle is not None:
            handle.kill()

    def _pool_size(self) -> int:
        from airflow_provider_safeproc.cpu import effective_cpu_count

        return self.max_workers or _config.default_max_workers() or effective_cpu_count()

    def _interpreter(self) -> str | None:
        if not self.requirements:
            return self.python
        from airflow_provider_safeproc.interpreter.virtualenv import ensure_virtualenv

        requirements: Sequence[str] | str | Path = self.requirements
        if isinstance(requirements, str):
            path = Path(requirements)
            if not path.is_file():
                raise ConfigurationError(
                    f"requirements={requirements!r} is a string but not a requirements file"
                )
            requirements = path
        # Logs "virtualenv cache hit: ..." or "built virtualenv ... in N s" through log.
        python = ensure_virtualenv(
            requirements,
            python=self.python,
            system_site_packages=self.system_site_packages,
            cache_dir=self.venv_cache_dir or _config.default_venv_cache_dir(),
            pip_args=self.pip_args,
            log=self.log.info,
        )
        return str(python)

    def _environment(self, context_channel: Mapping[str, str] | None = None) -> dict[str, str]:
        from airflow_provider_safeproc.task_context_guard import WORKER_ENVIRONMENT

        base = dict(os.environ) if self.inherit_env else {"PATH": os.environ.get("PATH", os.defpath)}
        # Before the callable is unpickled there: its globals may import Airflow.
        return {
            **base,
            **WORKER_ENVIRONMENT,
            **{str(k): str(v) for k, v in self.env_vars.items()},
            **(context_channel or {}),
        }
