"""The task-context channel: workers ask the task process for Variables and Connections.

::

    worker: Variable.get("k")  --(task_context_guard)-->  ask_task_process("variable", "k")
        --frame over a Unix socket-->  ContextServer thread, in the task process
        --cache miss-->  resolver("variable", "k")   (the operator's: the real Variable.get)
        <--("ok", value) / ("missing",) / ("error", ...)--

Why a channel of our own: a worker must never open the metadata database itself (Airflow 2)
and must never share the task's supervisor socket (Airflow 3: one request/response stream,
which many workers would garble). The task process answers instead, once per distinct key
per run (misses cached too), so 1,000 items asking for one Variable cost one lookup. It is
the engines' business neither: any process that has the address in its environment may
connect (workers of both engines, a fresh interpreter and the pools it starts), each
process with a connection of its own.

Security: the socket lives in a private directory (``mkdtemp``: mode 0700) and every request
carries a random token; only this user's processes that were given the environment can ask.

Stdlib only and nothing from Airflow: the resolver is a plain callable the operators build
(see ``operators/_context.py``); :class:`~airflow_provider_safeproc.pool.executor.SafeProcessPoolExecutor`
takes one as ``context_resolver``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import pickle
import secrets
import selectors
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from airflow_provider_safeproc import streams

__all__ = [
    "ADDRESS_VARIABLE",
    "TOKEN_VARIABLE",
    "ContextKind",
    "ContextResolver",
    "ContextServer",
    "PoolContext",
    "ask_task_process",
    "channel_in_environment",
    "pool_context",
]

#: What workers may ask for. A Variable answers its raw string value; a connection a dict of
#: its fields (``conn_id``, ``conn_type``, ``host``, ``schema``, ``login``, ``password``,
#: ``port``, ``extra``, ``description``), rebuilt in the worker as that Airflow's Connection.
#: ``xcom_pull`` (key: the keyword arguments of ``ti.xcom_pull``) and ``xcom_push`` (key:
#: ``{"key": ..., "value": ...}``) come from ProcessPoolOperator's interpreter only, and are
#: never cached.
ContextKind = Literal["variable", "connection", "xcom_pull", "xcom_push"]
#: ``resolver(kind, key)``: the value, or None when it does not exist (the worker then raises
#: Airflow's own not-found error). Any exception it raises is raised in the worker.
ContextResolver = Callable[[ContextKind, Any], Any]

#: Environment variables that give a process the channel (set in workers by the pool).
ADDRESS_VARIABLE = "SAFEPROC_TASK_CONTEXT_SOCKET"
TOKEN_VARIABLE = "SAFEPROC_TASK_CONTEXT_TOKEN"
_KINDS = ("variable", "connection")  # cached: one lookup per key per run
_UNCACHED_KINDS = ("xcom_pull", "xcom_push")  # each one done: a pull may follow a push


class ContextServer:
    """Answers workers' Variable and Connection requests with ``resolver``, from one daemon thread.

    Created in the task process by the pool (``context_resolver=``) or by ProcessPoolOperator;
    :meth:`close` stops it and removes its directory. :attr:`environment` is what a process
    needs to ask. Requests are answered one at a time, so the resolver is never called from
    two threads at once and never twice for one key.
    """

    def __init__(self, resolver: ContextResolver, *, start: bool = True) -> None:
        if not callable(resolver):
            raise TypeError(f"context_resolver must be callable, got {resolver!r}")
        self._resolver = resolver
        self._dir = tempfile.mkdtemp(prefix="safeproc-context-")
        self.path = os.path.join(self._dir, "s")
        self._token = secrets.token_hex(16)
        self._cache: dict[tuple[str, str], tuple[Any, ...]] = {}
        self.requests = 0
        self.lookups = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.path)
            self._listener.listen(64)
        except BaseException:
            self._listener.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._closed = False
        self._owner = os.getpid()
        # The resolver runs with the creator's context variables (a new thread starts with
        # none): Airflow keeps some task state in them.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._serve,), name="safeproc-task-context", daemon=True
        )
        if start:
            self._thread.start()

    def start(self) -> None:
        """Start answering (requests made before wait for it). A pool starts it after its
        workers, which a ``fork`` pool forks: never fork with a thread of ours running."""
        if not self._thread.is_alive() and not self._closed:
            self._thread.start()

    @property
    def environment(self) -> dict[str, str]:
        """The variables that let a process (and the processes it starts) ask this server."""
        return {ADDRESS_VARIABLE: self.path, TOKEN_VARIABLE: self._token}

    def __enter__(self) -> ContextServer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop answering and remove the socket. Idempotent; a forked copy does nothing."""
        if self._closed or os.getpid() != self._owner:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)
        elif not self._thread.is_alive():
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()
            self._selector.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    # --- the serving thread ----------------------------------------------------------------
    def _serve(self) -> None:
        try:
            while not self._closed:
                for key, _ in self._selector.select():
                    sock = key.fileobj
                    if sock is self._wake_r:
                        return
                    if sock is self._listener:
                        with contextlib.suppress(OSError):
                            conn, _ = self._listener.accept()
                            conn.setblocking(True)
                            self._selector.register(conn, selectors.EVENT_READ)
                        continue
                    assert isinstance(sock, socket.socket)
                    if not self._answer(sock):
                        self._selector.unregister(sock)
                        sock.close()
        finally:
            for key in list(self._selector.get_map().values()):
                with contextlib.suppress(OSError):
                    key.fileobj.close()  # type: ignore[union-attr]
            self._selector.close()
            self._wake_w.close()

    def _answer(self, sock: socket.socket) -> bool:
        """Read one request and answer it; False when the peer is gone or misbehaves."""
        try:
            frame = streams.recv_frame(sock)
        except (OSError, EOFError, ValueError):
            return False
        if frame is None:
            return False
        request = frame[0]
        if not (isinstance(request, tuple) and len(request) == 3 and request[0] == self._token):
            return False  # not one of ours: no answer at all
        _, kind, key = request
        try:
            streams.send_frame(sock, self._resolve(kind, key))
        except OSError:
            return False
        return True

    def _resolve(self, kind: Any, key: Any) -> tuple[Any, ...]:
        self.requests += 1
        cacheable = kind in _KINDS and isinstance(key, str)
        if not cacheable and not (kind in _UNCACHED_KINDS and isinstance(key, dict)):
            return ("error", "ValueError", f"unknown task-context request {kind!r} {key!r}", None)
        cached = self._cache.get((kind, key)) if cacheable else None
        if cached is not None:
            return cached
        self.lookups += 1
        try:
            value = self._resolver(kind, key)
        except Exception as exc:  # raised in the worker; not cached: it may be passing
            return ("error", type(exc).__name__, str(exc), _pickled(exc))
        answer: tuple[Any, ...] = ("missing",) if value is None else ("ok", value)
        if cacheable:
            self._cache[(kind, key)] = answer
        return answer


def _pickled(exc: BaseException) -> bytes | None:
    try:
        data: bytes = pickle.dumps(exc, protocol=5)
    except Exception:
        return None
    return data


# ------------------------------------------------------------------------------ the asking side


def channel_in_environment() -> bool:
    """Whether this process was given a task-context channel (see :class:`ContextServer`)."""
    return bool(os.environ.get(ADDRESS_VARIABLE)) and bool(os.environ.get(TOKEN_VARIABLE))


class _Client:
    """One connection per process (a forked child opens its own), one request at a time."""

    lock = threading.Lock()
    sock: socket.socket | None = None
    pid = 0


class TaskContextLookupError(RuntimeError):
    """The task process could not answer (its error could not be rebuilt here, or it is gone)."""


def ask_task_process(kind: ContextKind, key: Any) -> Any:
    """Ask the task process for a Variable's raw value or a connection's fields; None if missing.

    Blocks until answered. Raises what the task's lookup raised (a secrets backend refusing,
    say), or :class:`TaskContextLookupError` when the channel is gone.
    """
    with _Client.lock:
        answer = _exchange((os.environ[TOKEN_VARIABLE], kind, key))
    status = answer[0]
    if status == "ok":
        return answer[1]
    if status == "missing":
        return None
    _, type_name, message, pickled = answer
    if pickled is not None:
        try:
            exc = pickle.loads(pickled)
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            raise exc
    raise TaskContextLookupError(f"the task process failed to look up {kind} {key!r}: {type_name}: {message}")


def _exchange(request: tuple[str, str, Any]) -> tuple[Any, ...]:
    for attempt in (1, 2):
        if _Client.sock is None or _Client.pid != os.getpid():
            _Client.sock = None  # a forked copy of the parent's connection: never use it
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(os.environ[ADDRESS_VARIABLE])
            except OSError as exc:
                sock.close()
                raise TaskContextLookupError(
                    f"cannot reach the task process to look up {request[1]} {request[2]!r} "
                    f"({exc}): the task has ended or its pool was shut down"
                ) from None
            _Client.sock, _Client.pid = sock, os.getpid()
        try:
            streams.send_frame(_Client.sock, request)
            frame = streams.recv_frame(_Client.sock)
        except OSError:
            frame = None
        if frame is not None:
            answer: tuple[Any, ...] = frame[0]
            return answer
        with contextlib.suppress(OSError):
            _Client.sock.close()
        _Client.sock = None
        if attempt == 2:
            break
    raise TaskContextLookupError(
        f"the task process closed the channel while looking up {request[1]} {request[2]!r}: "
        "the task has ended or its pool was shut down"
    )


# ------------------------------------------------------------------------------- for the pool


class PoolContext(NamedTuple):
    """What a pool gives its workers for task context (see :func:`pool_context`)."""

    server: ContextServer | None  # the pool's own, started after its workers, closed with it
    initializer: Callable[..., Any] | None
    initargs: tuple[Any, ...]
    environment: dict[str, str]  # set in workers (and their helper) before anything is imported


def pool_context(
    resolver: ContextResolver | None, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]
) -> PoolContext:
    """The channel a pool's workers get, and the initializer that installs the guard there.

    With ``resolver``, a server of the pool's own answers. Without one, a pool started in a
    process that has a channel (a fresh interpreter of ProcessPoolOperator) passes that one
    on, so its workers ask the task process directly. Otherwise nothing changes: the
    initializer's own ``worker_environment`` (``refuse_task_context``) is all there is.
    """
    environment = dict(getattr(initializer, "worker_environment", None) or {})
    if resolver is not None:
        server: ContextServer | None = ContextServer(resolver, start=False)
        channel = server.environment  # type: ignore[union-attr]
    elif channel_in_environment():
        server, channel = None, {name: os.environ[name] for name in (ADDRESS_VARIABLE, TOKEN_VARIABLE)}
    else:
        return PoolContext(None, initializer, initargs, environment)
    from airflow_provider_safeproc.task_context_guard import (
        WORKER_ENVIRONMENT,
        guard_then,
        refuse_task_context,
    )

    if initializer is None or initializer is refuse_task_context:
        initializer, initargs = refuse_task_context, ()
    else:
        initializer, initargs = functools.partial(guard_then, initializer), initargs
    return PoolContext(server, initializer, initargs, {**environment, **WORKER_ENVIRONMENT, **channel})
