"""The program a fresh interpreter runs for :mod:`airflow_provider_safeproc.interpreter`.

Run as a script by path (``python _interpreter_child.py LIFELINE_FD RESULT_FD``), never imported
as part of the package: a virtualenv's interpreter may not have the package, so this file needs
only the stdlib, and cloudpickle only when the payload or the result needs it.

The process splits in two right after reading its payload, while it is still single-threaded:

- the *guardian* (the process the parent started) becomes a child subreaper and watches the
  lifeline socket. End of file there means the parent died (even by SIGKILL) or asked for a
  kill; SIGTERM/SIGINT mean the same (Airflow's supervisor signals the task's process group).
  It then ends every descendant, TERM then KILL: orphans reparent to it, so none escapes.
  When the worker ends on its own, it ends whatever the worker left running, sends the worker's
  exit status over the lifeline and exits.
- the *worker* (its forked child, in a process group of its own) loads the callable, runs it
  and writes one result frame to RESULT_FD. It starts no thread before the callable runs, so
  the callable's own fork-based pools are safe.

Frames are an 8-byte big-endian length then a stdlib pickle of a tuple of plain values.
"""

from __future__ import annotations

import _signal as signal  # the C module: signal.py would import enum, ~3 ms
import os
import select
import sys
import time

try:  # the C pickler alone: pickle.py would import re & co., ~5 ms we need not spend
    from _pickle import dumps as _pickle_dumps
    from _pickle import loads as _pickle_loads
except ImportError:
    from pickle import dumps as _pickle_dumps
    from pickle import loads as _pickle_loads

_LEN = 8


class _Stop(BaseException):
    """Raised by the guardian's SIGTERM handler to leave its wait."""


def _read_exact(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("lifeline closed before the payload arrived")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _write_frame(fd, obj):
    data = _pickle_dumps(obj, protocol=5)
    view = memoryview(len(data).to_bytes(_LEN, "big") + data)
    while view:
        view = view[os.write(fd, view) :]


def _prctl(option, arg):
    """PR_SET_CHILD_SUBREAPER (36) and PR_SET_PDEATHSIG (1); best effort, Linux only."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, arg, 0, 0, 0) == 0
    except Exception:
        return False


# ---------------------------------------------------------------------------------- worker


def _dumps(obj):
    """stdlib pickle first (no cloudpickle import for plain values), cloudpickle for the rest."""
    try:
        return _pickle_dumps(obj, protocol=5)
    except Exception:
        import cloudpickle

        return cloudpickle.dumps(obj, protocol=5)


def _type_name(obj):
    cls = type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _capture(exc):
    """Same shape as ``serialization.capture_exception``, which the parent rebuilds from."""
    import traceback

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickled = _dumps(exc)
    except Exception:
        pickled = None
    return {"type": _type_name(exc), "message": str(exc), "traceback": tb, "pickled": pickled}


def _worker(guardian_pid, lifeline_fd, result_fd, header, sigterm_handler):
    os.setpgid(0, 0)  # the callable's tree is one group the guardian can signal at once
    signal.signal(signal.SIGTERM, sigterm_handler)  # as inherited: SIG_DFL, or SIG_IGN
    _prctl(1, signal.SIGKILL)  # die with the guardian
    if os.getppid() != guardian_pid:
        os._exit(70)
    os.close(lifeline_fd)
    os.set_inheritable(result_fd, False)

    if header["sys_path"] is not None:
        sys.path[:] = header["sys_path"]  # the same interpreter: exactly the parent's path
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        if sys.path and os.path.abspath(sys.path[0] or ".") == here:
            del sys.path[0]  # this file's directory would shadow user modules (errors.py...)
        sys.path.extend(p for p in header["extra_path"] if p not in sys.path)
    # A neutral __main__: spawned pool workers then don't re-run this file.
    sys.modules["__main__"] = type(sys)("__main__")
    sys.argv[:] = [""]
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)  # output reaches the log as it is printed
        except Exception:
            pass

    try:
        fn, args, kwargs = _pickle_loads(header["payload"])  # imports cloudpickle if needed
        adopt_shipped_modules([fn, *args, *kwargs.values()])
        result = fn(*args, **kwargs)
    except BaseException as exc:
        frame = ("error", _capture(exc))
    else:
        try:
            frame = ("ok", _dumps(result))
        except Exception as exc:
            frame = ("unpicklable", _type_name(result), f"{type(exc).__name__}: {exc}")
        del result
    _write_frame(result_fd, frame)
    os.close(result_fd)
    _exit_without_teardown()


class _ShippedModules:
    """Keeps cloudpickle (and joblib's vendored copy) shipping adopted modules by value.

    Once a shipped module is in ``sys.modules``, cloudpickle would pickle its functions by
    reference, which loky's spawned workers cannot import. Every copy of cloudpickle, loaded
    now or later, is told to keep pickling them by value.
    """

    names = set()
    _hooked = False

    @classmethod
    def add(cls, name):
        cls.names.add(name)
        for copy in cls._copies():
            copy._PICKLE_BY_VALUE_MODULES.add(name)
        if not cls._hooked:
            cls._hooked = True
            sys.meta_path.insert(0, cls())

    @staticmethod
    def _copies():
        for key in ("cloudpickle.cloudpickle", "joblib.externals.cloudpickle.cloudpickle"):
            module = sys.modules.get(key)
            if module is not None and hasattr(module, "_PICKLE_BY_VALUE_MODULES"):
                yield module

    def find_spec(self, fullname, path=None, target=None):
        if fullname.endswith("cloudpickle.cloudpickle"):
            # Let the normal finders load it, then register the names on it.
            sys.meta_path.remove(self)
            try:
                import importlib.util

                spec = importlib.util.find_spec(fullname)
            finally:
                sys.meta_path.insert(0, self)
            if spec is not None and spec.loader is not None:
                loader = spec.loader
                original = loader.exec_module

                def exec_module(module, _original=original):
                    _original(module)
                    module._PICKLE_BY_VALUE_MODULES.update(_ShippedModules.names)

                loader.exec_module = exec_module
            return spec
        return None


def adopt_shipped_modules(objs):
    """Give functions shipped by value a module of their name in ``sys.modules``.

    Functions from Airflow DAG files arrive by value, still naming a module
    (``unusual_prefix_<sha1>_<file>``) that no other process can import. When the callable
    hands one of them to a stdlib pool, plain pickle looks it up by module and name: without
    this it fails with "import of module 'unusual_prefix_...' failed". Fork-started pool
    workers inherit the module; spawn workers would still need an importable module.
    """
    seen = set()
    stack = list(objs)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        inner = getattr(obj, "func", None)  # functools.partial
        if inner is not None:
            stack.append(inner)
        namespace = getattr(obj, "__globals__", None)
        if not isinstance(namespace, dict):
            continue
        name = getattr(obj, "__module__", None)
        if isinstance(name, str) and name not in sys.modules:
            module = type(sys)(name)
            module.__dict__.update(namespace)
            sys.modules[name] = module
            _ShippedModules.add(name)
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                stack.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass


def _exit_without_teardown():
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


# -------------------------------------------------------------------------------- guardian


def _children():
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: scan every process's parent
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == pid:
                    found.append(int(entry))
        return found


def _end_descendants(worker_pid, grace):
    """TERM the worker's group and our children, KILL after ``grace``; until no child is left.

    As a subreaper we inherit every orphan, so "no child left" means no descendant left.
    Returns the worker's wait status if it was collected here.
    """
    worker_status = None
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    while True:
        try:
            os.killpg(worker_pid, sig)
        except OSError:
            pass
        for pid in _children():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        try:
            while True:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if not pid:
                    break
                if pid == worker_pid:
                    worker_status = status
        except ChildProcessError:
            return worker_status
        if sig == signal.SIGTERM and time.monotonic() >= deadline:
            sig = signal.SIGKILL
        time.sleep(0.01)


def _wait_worker(lifeline_fd, worker_pid):
    """Block until the worker exits (its wait status) or the parent is gone (None)."""
    try:
        pidfd = os.pidfd_open(worker_pid)
    except (AttributeError, OSError):
        pidfd = None
    while True:
        fds = [lifeline_fd] if pidfd is None else [lifeline_fd, pidfd]
        ready, _, _ = select.select(fds, [], [], 0.05 if pidfd is None else None)
        if lifeline_fd in ready:
            return None  # EOF, or anything sent after the payload: the parent wants us gone
        pid, status = os.waitpid(worker_pid, os.WNOHANG)
        if pid:
            return status


def _guardian(lifeline_fd, worker_pid, grace):
    status = None
    try:
        status = _wait_worker(lifeline_fd, worker_pid)
    except (_Stop, KeyboardInterrupt):
        pass
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    # Nothing the worker started outlives it: ask nicely, then not.
    if status is None:
        status = _end_descendants(worker_pid, min(grace, 1.0))
    else:
        _end_descendants(worker_pid, grace)
    code = None if status is None else os.waitstatus_to_exitcode(status)
    try:
        _write_frame(lifeline_fd, ("exit", worker_pid, code))
    except OSError:
        pass  # the parent is gone


def _raise_stop(signum, frame):
    raise _Stop


def main():
    lifeline_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    try:
        size = int.from_bytes(_read_exact(lifeline_fd, _LEN), "big")
        header = _pickle_loads(_read_exact(lifeline_fd, size))
    except EOFError:
        os._exit(0)  # the parent went away before sending the payload: nothing to run
    _prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    sigterm_handler = signal.signal(signal.SIGTERM, _raise_stop)
    guardian_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        _worker(guardian_pid, lifeline_fd, result_fd, header, sigterm_handler)
        return
    os.close(result_fd)
    _guardian(lifeline_fd, pid, header["grace"])
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
