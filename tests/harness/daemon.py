"""Run a function inside a daemonic process, the way Celery's prefork pool runs a task.

Inside a daemonic ``multiprocessing.Process`` or ``billiard.Process(daemon=True)``, the
stdlib's ``Pool`` and ``ProcessPoolExecutor`` fail with "daemonic processes are not allowed
to have children". Every capability of the package is tested there.

The daemonic process is started with *spawn*: the test process has threads (Airflow's
in-process API server starts some), and forking a threaded process is the very hazard this
package removes. The function and its result travel with cloudpickle, so closures work.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from typing import Any

import cloudpickle
import psutil

from airflow_provider_safeproc.reaper import reap_process_tree


class DaemonError(Exception):
    """The function raised in the daemonic process; ``remote_type`` and ``remote_traceback`` tell what."""

    def __init__(self, remote_type: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{remote_type}: {message}\n{remote_traceback}")
        self.remote_type = remote_type
        self.message = message
        self.remote_traceback = remote_traceback


def _daemon_main(payload: bytes, conn: Any) -> None:
    import multiprocessing

    assert multiprocessing.current_process().daemon, "harness bug: process is not daemonic"
    fn, args, kwargs = cloudpickle.loads(payload)
    try:
        result = ("ok", fn(*args, **kwargs))
        data = cloudpickle.dumps(result)
    except BaseException as exc:
        try:
            original = cloudpickle.dumps(exc)
            cloudpickle.loads(original)
        except Exception:
            original = None
        data = cloudpickle.dumps(
            ("error", type(exc).__qualname__, str(exc), traceback.format_exc(), original)
        )
    conn.send_bytes(data)
    conn.close()


def _stop_billiard_semaphore_tracker(pids: set[int]) -> None:
    """billiard's spawn starts a process-wide semaphore tracker and never stops it; we do.

    It exits when its pipe closes; ``pids`` are the children that appeared when we started
    the daemonic process, i.e. the tracker, which we then wait for.
    """
    from billiard import semaphore_tracker

    tracker = semaphore_tracker._semaphore_tracker
    if tracker._fd is not None:
        os.close(tracker._fd)
        tracker._fd = None
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def run_in_daemon(
    fn: Any, *args: Any, kind: str = "multiprocessing", timeout: float = 180, **kwargs: Any
) -> Any:
    """Call ``fn(*args, **kwargs)`` in a fresh daemonic process and return its result.

    ``kind`` is ``"multiprocessing"`` or ``"billiard"``. An exception in ``fn`` is re-raised
    here as its original type when it can be rebuilt (else :class:`DaemonError`), with the
    remote traceback in the message of a :class:`DaemonError` cause. The process and all
    its descendants are reaped before this returns, also on timeout.
    """
    if kind == "billiard":
        import billiard

        ctx = billiard.get_context("spawn")
    elif kind == "multiprocessing":
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
    else:
        raise ValueError(f"kind must be 'multiprocessing' or 'billiard', not {kind!r}")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    payload = cloudpickle.dumps((fn, args, kwargs))
    proc = ctx.Process(target=_daemon_main, args=(payload, child_conn), daemon=True, name=f"daemon-{kind}")
    before = {p.pid for p in psutil.Process().children()}
    proc.start()
    helpers = {p.pid for p in psutil.Process().children()} - before - {proc.pid}
    child_conn.close()
    try:
        if not parent_conn.poll(timeout):
            raise TimeoutError(f"daemonic {kind} process {proc.pid} gave no result within {timeout} s")
        outcome = cloudpickle.loads(parent_conn.recv_bytes())
    except EOFError:
        proc.join(5)
        raise RuntimeError(f"daemonic {kind} process {proc.pid} died: exitcode {proc.exitcode}") from None
    finally:
        parent_conn.close()
        proc.join(10)
        reap_process_tree(proc.pid, grace=1.0)
        proc.join(1)
        if kind == "billiard":
            _stop_billiard_semaphore_tracker(helpers)
    if outcome[0] == "ok":
        return outcome[1]
    _, type_name, message, tb, original = outcome
    cause = DaemonError(type_name, message, tb)
    if original is not None:
        raise cloudpickle.loads(original) from cause
    raise cause
