"""A task process for the containment tests: ``python -m tests.containment.subject KIND CASE DIR``.

Run by the tests in a session of its own (so it leads a process group, as Airflow's task
process does) and daemonic (as under Celery's prefork pool). KIND: ``native-<start method>``,
``billiard``, or ``interpreter``. Two items (for the interpreter: one callable) each start the
processes that used to leak: a plain child, one that ignores SIGTERM, one in its own session,
and a double-forked daemon; for the interpreter, a stdlib ``fork`` pool too. Each item writes
``item-<i>.json`` (its process's pid and the pids it started) into DIR; then this process prints
``READY`` and, as outcomes arrive, ``OUTCOME <i> <exception type>``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

_DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open(sys.argv[1], "w").write(str(os.getpid()))
        time.sleep(300)
    os._exit(0)
"""


def start_leaky_processes(report: Path, index: int, stdlib_pool: bool = False) -> None:
    """Start what the item leaves running, write the pids down, and wait to be ended."""
    procs = [
        subprocess.Popen(["sleep", "300"]),
        subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300 & wait"]),
        subprocess.Popen(["sleep", "301"], start_new_session=True),
    ]
    daemon_file = report / f"daemon-{index}"
    subprocess.run([sys.executable, "-c", _DAEMON, str(daemon_file)], check=True)
    while not daemon_file.exists() or not daemon_file.read_text():
        time.sleep(0.01)
    pids = [p.pid for p in procs] + [int(daemon_file.read_text())]
    if stdlib_pool:  # what run_in_interpreter's callables do: a stdlib pool of their own
        pool = multiprocessing.get_context("fork").Pool(2)
        pool.map(abs, range(4))
        pids += [p.pid for p in pool._pool]  # type: ignore[attr-defined]
    for _ in range(20):  # the sh's own sleep: the children of what we started
        try:
            with open(f"/proc/{procs[1].pid}/task/{procs[1].pid}/children") as f:
                grandchildren = [int(p) for p in f.read().split()]
        except OSError:
            grandchildren = []
        if grandchildren:
            pids += grandchildren
            break
        time.sleep(0.01)
    info = {"process": os.getpid(), "pids": pids}
    (report / f"item-{index}.tmp").write_text(json.dumps(info))
    os.rename(report / f"item-{index}.tmp", report / f"item-{index}.json")
    time.sleep(300)


def main() -> None:
    kind, case, report = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    multiprocessing.current_process()._config["daemon"] = True  # type: ignore[attr-defined]  # as under Celery
    if kind == "interpreter":
        import threading

        from airflow_provider_safeproc import run_in_interpreter

        def run() -> None:
            try:
                run_in_interpreter(start_leaky_processes, report, 0, True)
            except Exception as exc:
                print("OUTCOME", 0, type(exc).__name__, flush=True)

        threading.Thread(target=run, daemon=True).start()
        items = 1
        futures = []
    else:
        from airflow_provider_safeproc import SafeProcessPoolExecutor

        engine, _, start_method = kind.partition("-")
        pool = SafeProcessPoolExecutor(
            2,
            engine=engine,
            start_method=start_method or "forkserver",
            item_timeout=3.0 if case == "timeout" else None,
        )
        items = 2
        futures = [pool.submit(start_leaky_processes, report, i) for i in range(items)]
    while len(list(report.glob("item-*.json"))) < items:
        time.sleep(0.02)
    print("READY", flush=True)
    for i, future in enumerate(futures):
        try:
            future.result()
        except Exception as exc:
            print("OUTCOME", i, type(exc).__name__, flush=True)
    time.sleep(300)


if __name__ == "__main__":
    main()
