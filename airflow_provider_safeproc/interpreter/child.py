"""The program a fresh interpreter runs for :mod:`airflow_provider_safeproc.interpreter`.

Run as a script by path (``python child.py LIFELINE_FD RESULT_FD``), never imported as part
of the package: a virtualenv's interpreter may not have the package, so this file needs only
the stdlib (cloudpickle only when the payload or the result needs it). It loads the few
stdlib-only modules of the package it shares (``streams``, ``reaper``, ``shipped_modules``)
by path, under private names.

The process splits in two right after reading its payload, while it is still single-threaded:

- the *overseer* (the process the parent started, in a session of its own so that a SIGKILL
  to the task's process group cannot take it along) becomes a child subreaper and watches the
  lifeline socket. End of file there means the parent died (even by SIGKILL) or asked for a
  kill; SIGTERM/SIGINT sent to it mean the same.
  It then ends every descendant, TERM then KILL: orphans reparent to it, so none escapes.
  When the runner ends on its own, it ends whatever the runner left running, sends the
  runner's exit status over the lifeline and exits.
- the *runner* (its forked child, in a process group of its own) loads the callable, runs it
  and writes one result frame to RESULT_FD. It starts no thread before the callable runs, so
  the callable's own fork-based pools are safe.

Frames are those of ``streams``; the parent's payload frame carries a dict of plain values as
its meta and the cloudpickle of ``(fn, args, kwargs)`` as its blob.
"""

from __future__ import annotations

import _signal as signal  # type: ignore[import-not-found]  # the C module: signal.py imports enum, ~3 ms
import os
import select
import sys
import types
from importlib.machinery import SourceFileLoader
from typing import Any

try:  # the C pickler alone: pickle.py would import re & co., ~5 ms we need not spend
    from _pickle import dumps as _pickle_dumps
    from _pickle import loads as _pickle_loads
except ImportError:  # pragma: no cover - CPython always has it
    from pickle import dumps as _pickle_dumps
    from pickle import loads as _pickle_loads

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_shared(name: str) -> Any:
    """A stdlib-only module of the package, loaded by path under a private name."""
    private = f"_safeproc_{name}"
    module = types.ModuleType(private)
    module.__file__ = os.path.join(_PACKAGE_DIR, f"{name}.py")
    SourceFileLoader(private, module.__file__).exec_module(module)
    sys.modules[private] = module
    return module


streams = _load_shared("streams")
reaper = _load_shared("reaper")
shipped_modules = _load_shared("shipped_modules")


class _Stop(BaseException):
    """Raised by the overseer's SIGTERM handler to leave its wait."""


# ------------------------------------------------------------------------------------ runner


def _dumps(obj: Any) -> bytes:
    """stdlib pickle first (no cloudpickle import for plain values), cloudpickle for the rest."""
    try:
        data: bytes = _pickle_dumps(obj, protocol=5)
    except Exception:
        import cloudpickle

        data = cloudpickle.dumps(obj, protocol=5)
    return data


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _capture(exc: BaseException) -> dict[str, Any]:
    """Same shape as ``serialization.capture_exception``, which the parent rebuilds from."""
    import traceback

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickled: bytes | None = _dumps(exc)
    except (Exception, SystemExit):
        pickled = None
    return {"type": _type_name(exc), "message": str(exc), "traceback": tb, "pickled": pickled}


def _runner(
    overseer_pid: int, lifeline_fd: int, result_fd: int, header: dict[str, Any], payload: bytes, sigterm: Any
) -> None:
    os.setpgid(0, 0)  # the callable's tree is one group the overseer can signal at once
    signal.signal(signal.SIGTERM, sigterm)  # as inherited: SIG_DFL, or SIG_IGN
    reaper.set_parent_death_signal(signal.SIGKILL)  # die with the overseer
    if os.getppid() != overseer_pid:
        os._exit(70)
    os.close(lifeline_fd)
    os.set_inheritable(result_fd, False)

    if header["sys_path"] is not None:
        sys.path[:] = header["sys_path"]  # the same interpreter: exactly the parent's path
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        if sys.path and os.path.abspath(sys.path[0] or ".") == here:
            del sys.path[0]  # this file's directory would shadow user modules (target.py...)
        sys.path.extend(p for p in header["extra_path"] if p not in sys.path)
    # A neutral __main__: spawned pool workers then don't re-run this file. When the caller is a
    # plain script, the neutral __main__ stands for it, as multiprocessing's spawn arranges:
    # the script's functions the payload brings are adopted into it (below), so a stdlib pool
    # started here pickles them by reference; its spawned workers run the script as __mp_main__.
    main = types.ModuleType("__main__")
    main.__dict__[shipped_modules.STAND_IN] = True
    if header.get("main_path"):
        main.__file__ = header["main_path"]
    sys.modules["__main__"] = main
    sys.argv[:] = [header.get("main_path") or ""]
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # output reaches the log as printed
        except Exception:
            pass

    frame: tuple[Any, ...]
    blob = b""
    try:
        fn, args, kwargs = _pickle_loads(payload)  # imports cloudpickle if needed
        del payload
        shipped_modules.adopt_shipped_modules([fn, *args, *kwargs.values()])
        result = fn(*args, **kwargs)
    except BaseException as exc:
        frame = ("error", _capture(exc))
    else:
        try:
            frame, blob = ("ok",), _dumps(result)
        except (Exception, SystemExit) as exc:
            frame = ("unpicklable", _type_name(result), f"{type(exc).__name__}: {exc}")
        del result
    streams.write_frame(result_fd, frame, blob)
    os.close(result_fd)
    _exit_without_teardown()


def _exit_without_teardown() -> None:
    """What interpreter exit does that matters (join threads, atexit, flush), minus module teardown.

    Pool shutdowns run (concurrent.futures via threading's exit hooks, multiprocessing and
    logging via atexit); the ~5 ms of module and object teardown that follow are skipped.
    """
    threading = sys.modules.get("threading")
    if threading is not None and hasattr(threading, "_shutdown"):
        threading._shutdown()
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(0)


# ---------------------------------------------------------------------------------- overseer


def _wait_for_runner(lifeline_fd: int, runner_pid: int) -> int | None:
    """Block until the runner exits (its wait status) or the parent is gone (None)."""
    try:
        pidfd: int | None = os.pidfd_open(runner_pid)
    except (AttributeError, OSError):
        pidfd = None
    while True:
        fds = [lifeline_fd] if pidfd is None else [lifeline_fd, pidfd]
        ready, _, _ = select.select(fds, [], [], 0.05 if pidfd is None else None)
        if lifeline_fd in ready:
            return None  # EOF, or anything sent after the payload: the parent wants us gone
        pid, status = os.waitpid(runner_pid, os.WNOHANG)
        if pid:
            return status


def _oversee(lifeline_fd: int, runner_pid: int, grace: float) -> None:
    status = None
    try:
        status = _wait_for_runner(lifeline_fd, runner_pid)
    except (_Stop, KeyboardInterrupt):
        pass
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    reaped: dict[int, int] = {}
    # Nothing the runner started outlives it: ask nicely, then not. (A subreaper inherits
    # every orphan, so our descendants are all of them.)
    reaper.end_process_tree(
        [os.getpid()],
        include_roots=False,
        grace=min(grace, 1.0) if status is None else grace,
        reap=True,
        on_reaped=lambda pid, st: reaped.__setitem__(pid, st),
    )
    if status is None:
        status = reaped.get(runner_pid)
    code = None if status is None else os.waitstatus_to_exitcode(status)
    try:
        streams.write_frame(lifeline_fd, ("exit", runner_pid, code))
    except OSError:
        pass  # the parent is gone


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop


def _read_payload(lifeline_fd: int) -> tuple[dict[str, Any], bytes]:
    frames = streams.FrameBuffer()
    while True:
        data = os.read(lifeline_fd, 1 << 20)
        if not data:
            raise EOFError("lifeline closed before the payload arrived")
        got = frames.feed(data)
        if got:
            header, payload = got[0]
            return header, payload


def main() -> None:
    lifeline_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    try:
        header, payload = _read_payload(lifeline_fd)
    except EOFError:
        os._exit(0)  # the parent went away before sending the payload: nothing to run
    reaper.set_child_subreaper()
    sigterm = signal.signal(signal.SIGTERM, _raise_stop)
    overseer_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        _runner(overseer_pid, lifeline_fd, result_fd, header, payload, sigterm)
        return
    del payload
    os.close(result_fd)
    _oversee(lifeline_fd, pid, header["grace"])
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
