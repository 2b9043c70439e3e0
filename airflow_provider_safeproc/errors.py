"""Errors raised by the pool and the fresh-interpreter runner.

Each carries the facts a user needs to act on it (item index, pid, exit code or signal name,
timeout value) as attributes, and says them in its message. All survive pickling, so they can
cross a process boundary or be stored by Airflow.
"""

from __future__ import annotations

import pickle
import signal
from concurrent.futures.process import BrokenProcessPool
from typing import Any


def describe_exit(exitcode: int | None) -> str:
    """``-9`` -> ``"killed by SIGKILL"``, ``3`` -> ``"exit code 3"`` (Popen/psutil convention)."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}"
    return f"exit code {exitcode}"


class SafeprocError(Exception):
    """Base class of every error this package raises on its own account."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from attributes, not from ``args``: subclasses take keyword-only facts.
        return (_rebuild, (type(self), self.__dict__, str(self)))


def _rebuild(cls: type[SafeprocError], state: dict[str, Any], message: str) -> SafeprocError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class ConfigurationError(SafeprocError, ValueError):
    """An argument that can never work (``max_workers=-1``); raised before any process starts."""


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in another process, attached as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(SafeprocError):
    """A user exception whose type could not be rebuilt in this process.

    Raised instead of the original when its class is not importable here or its ``__init__``
    does not accept its own ``args`` back. ``exc_type`` is the qualified name of the original
    type, ``traceback`` the worker's formatted traceback.
    """

    def __init__(self, exc_type: str, message: str, traceback: str, *, item: int | None = None) -> None:
        where = f" (item {item})" if item is not None else ""
        super().__init__(f"{exc_type}: {message}{where}\n\nRemote traceback:\n{traceback}")
        self.exc_type = exc_type
        self.message = message
        self.traceback = traceback
        self.item = item


class SerializationError(SafeprocError, pickle.PicklingError, TypeError):
    """A callable, argument or result that cloudpickle cannot serialize.

    A ``pickle.PicklingError`` (and a ``TypeError``, as pickle raises for most unpicklable
    objects), so handlers written for the stdlib's pools catch it.
    """

    def __init__(self, what: str, type_name: str, reason: str, *, item: int | None = None) -> None:
        where = f" of item {item}" if item is not None else ""
        super().__init__(f"cannot serialize the {what}{where}: {type_name} ({reason})")
        self.what = what
        self.type_name = type_name
        self.reason = reason
        self.item = item


class DeserializationError(SafeprocError, pickle.UnpicklingError):
    """A callable, argument or result that was serialized but cannot be rebuilt on arrival.

    Its ``__reduce__`` output raised (or called ``sys.exit``) while it was unpickled: in the
    worker for a callable or its arguments, in the pool's process for a result. Only that item
    fails; the pool goes on. The exception raised while unpickling is the ``__cause__``.
    """

    def __init__(self, what: str, reason: str, *, item: int | None = None, where: str) -> None:
        of_item = f" of item {item}" if item is not None else ""
        super().__init__(f"cannot deserialize the {what}{of_item} in {where}: {reason}")
        self.what = what
        self.reason = reason
        self.item = item


#: WorkerLostError.during: what the worker was doing with the item when it died
LOST_RUNNING, LOST_LOADING, LOST_SENDING, LOST_UNSTARTED = "running", "loading", "sending", "unstarted"
_LOST_WORDING = {
    LOST_RUNNING: "while running item {}",
    LOST_LOADING: "while loading the arguments of item {}",
    LOST_SENDING: "while serializing the result of item {}",
    LOST_UNSTARTED: "repeatedly before item {} could start",
}


class WorkerLostError(SafeprocError, BrokenProcessPool):
    """The worker process running an item died (SIGKILL, OOM killer, ``os._exit``).

    Only that item fails (the pool replaces the worker and goes on), unlike the stdlib's
    ``BrokenProcessPool``, which it subclasses so that stdlib-style handlers still catch it.
    ``during`` says what the worker was doing with the item: ``"running"`` it,
    ``"loading"`` its arguments, ``"sending"`` (serializing) its result, or ``"unstarted"``
    (workers kept dying before it ran).
    """

    def __init__(
        self, *, pid: int, exitcode: int | None, item: int | None = None, during: str = LOST_RUNNING
    ) -> None:
        where = " " + _LOST_WORDING[during].format(item) if item is not None else ""
        super().__init__(f"worker process {pid} died{where}: {describe_exit(exitcode)}")
        self.pid = pid
        self.exitcode = exitcode
        self.item = item
        self.during = during

    @property
    def signal_name(self) -> str | None:
        """``"SIGKILL"`` when the worker was killed by a signal, else None."""
        if self.exitcode is None or self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return None


class ItemTimeoutError(SafeprocError, TimeoutError):
    """An item ran longer than ``item_timeout``; its worker was killed and replaced."""

    def __init__(self, *, item: int | None, timeout: float, pid: int | None = None) -> None:
        who = f" in worker {pid}" if pid is not None else ""
        super().__init__(f"item {item} exceeded item_timeout={timeout:g} s{who}; the worker was killed")
        self.item = item
        self.timeout = timeout
        self.pid = pid


class ItemSoftTimeoutError(SafeprocError, TimeoutError):
    """Raised *inside* an item that ran longer than ``item_soft_timeout``, so it can clean up.

    Billiard's ``SoftTimeLimitExceeded`` idea: the item may catch it, close what it opened and
    return (then it succeeds with what it returned), or let it propagate (then it fails with
    this error and counts toward ``item_retries``). With ``item_timeout`` too, an item still
    running at the hard limit is killed.
    """

    def __init__(self, *, item: int | None, timeout: float) -> None:
        super().__init__(f"item {item} exceeded item_soft_timeout={timeout:g} s")
        self.item = item
        self.timeout = timeout


class InterpreterDiedError(SafeprocError):
    """The fresh interpreter ended without returning a result (signal or ``os._exit``)."""

    def __init__(self, *, pid: int, exitcode: int | None, detail: str = "") -> None:
        extra = f": {detail}" if detail else ""
        super().__init__(
            f"interpreter process {pid} ended without a result, {describe_exit(exitcode)}{extra}"
        )
        self.pid = pid
        self.exitcode = exitcode


class InterpreterTimeoutError(SafeprocError, TimeoutError):
    """The fresh interpreter ran past ``timeout``; it and every process it started were ended."""

    def __init__(self, *, pid: int, timeout: float) -> None:
        super().__init__(f"interpreter process {pid} exceeded timeout={timeout:g} s and was killed")
        self.pid = pid
        self.timeout = timeout


class VirtualenvError(SafeprocError):
    """A virtualenv could not be built or its requirements not installed."""

    def __init__(self, message: str, *, output_tail: str = "") -> None:
        full = f"{message}\n--- installer output (tail) ---\n{output_tail}" if output_tail else message
        super().__init__(full)
        self.output_tail = output_tail


class BrokenPoolError(SafeprocError, BrokenProcessPool):
    """The pool can run no more items: it was killed or terminated, its initializer failed, or
    its helper process died. Items that had not finished fail with it; ``submit`` raises it.
    ``item`` is set when the error stands for one item's outcome. A ``BrokenProcessPool``, as
    the stdlib's pool raises in the same situation.
    """

    def __init__(self, message: str, *, item: int | None = None) -> None:
        where = f" (item {item})" if item is not None else ""
        super().__init__(f"{message}{where}")
        self.item = item


class ItemFailedError(SafeprocError):
    """An item of a parallel map failed; the map stopped (``on_item_error="fail"``)."""

    def __init__(self, item: int, error: BaseException) -> None:
        super().__init__(f"item {item} failed: {type(error).__name__}: {error}")
        self.item = item
        self.error_type = type(error).__name__
        self.error_message = str(error)


class PartialFailureError(SafeprocError):
    """Some items of a parallel map failed (``on_item_error="continue"``); one line per item.

    ``hint``, when given, ends the message: where the results of the other items went.
    """

    def __init__(self, failures: list[tuple[int, BaseException]], *, total: int, hint: str = "") -> None:
        lines = [f"  item {index}: {type(error).__name__}: {error}" for index, error in failures]
        message = f"{len(failures)} of {total} items failed:\n" + "\n".join(lines)
        super().__init__(f"{message}\n{hint}" if hint else message)
        self.items = [index for index, _ in failures]
        self.total = total


class TaskContextUnavailableError(SafeprocError, RuntimeError):
    """A worker process asked for Airflow's task context (a Variable, a Connection, an XCom).

    Workers are not task processes: they hold no connection to the task's supervisor (Airflow
    3) and must not reach the metadata database (Airflow 2), so such a call would fail with a
    misleading "not found", or quietly bypass the task's secrets handling. The task process
    resolves the value and passes it in.
    """

    def __init__(self, call: str, *, advice: str | None = None) -> None:
        super().__init__(
            f"{call} is not available in a safeproc worker process: workers are not Airflow task "
            "processes and have no access to Variables, Connections, XComs or the task context. "
            + (
                advice
                or "Resolve the value in the task and pass it to the callable, e.g. "
                "op_kwargs={'token': '{{ var.value.token }}'}, '{{ conn.my_conn.password }}', "
                "or an upstream task's output."
            )
        )
        self.call = call
