"""Overhead of run_in_interpreter for a trivial callable, side by side with its floor and peer.

Rows, all measured in this run (median of N calls each, wall clock, the rows taking turns):
- ``python -c pass``: the floor, an interpreter that starts and exits.
- ``run_in_interpreter``: this interpreter, then a cached virtualenv's.
- ``PythonVirtualenvOperator``: its subprocess step for the same callable with a ready venv
  (``_execute_python_callable_in_subprocess``: write the script and arguments to a temp dir,
  run it, read the result), i.e. what it costs per run once ``venv_cache_path`` hits.

Usage: .venv/bin/python benchmarks/bench_interpreter.py [N]
"""

from __future__ import annotations

import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _setup import scratch

WORK = scratch("bench-interpreter-")

from airflow_provider_safeproc import ensure_virtualenv, run_in_interpreter  # noqa: E402


def trivial() -> int:
    return 1


def interleaved_medians(rows: list[tuple[str, object]], n: int) -> dict[str, float]:
    """Median seconds per row, the rows taking turns so that load drifts hit them all alike."""
    samples: dict[str, list[float]] = {name: [] for name, _ in rows}
    for _, fn in rows:
        fn()  # warm-up: page cache, interpreter probes
    for _ in range(n):
        for name, fn in rows:
            started = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def pvo_subprocess_step(venv_python: str):
    """A PythonVirtualenvOperator in a DAG, ready to run its subprocess step with ``venv_python``."""
    from airflow.providers.standard.operators.python import PythonVirtualenvOperator
    from airflow.sdk import DAG

    with DAG("bench_interpreter", schedule=None):
        op = PythonVirtualenvOperator(
            task_id="trivial",
            python_callable=trivial,
            serializer="cloudpickle",
            system_site_packages=False,
            expect_airflow=False,
        )
    op._bundle_path = None  # set by execute() from the task context, which we do not have
    assert op._execute_python_callable_in_subprocess(Path(venv_python)) == 1
    return lambda: op._execute_python_callable_in_subprocess(Path(venv_python))


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    logging.getLogger("airflow.providers.standard.utils.python_virtualenv").setLevel(logging.WARNING)
    venv = ensure_virtualenv([], cache_dir=WORK / "venvs")  # cloudpickle only
    rows = [
        (
            "python -c pass (this interpreter)",
            lambda: subprocess.run([sys.executable, "-c", "pass"], check=True),
        ),
        ("python -c pass (cached venv)", lambda: subprocess.run([venv, "-c", "pass"], check=True)),
        ("run_in_interpreter (this interpreter)", lambda: run_in_interpreter(trivial)),
        ("run_in_interpreter (cached venv)", lambda: run_in_interpreter(trivial, python=venv)),
        ("PythonVirtualenvOperator subprocess step (cached venv)", pvo_subprocess_step(venv)),
    ]
    results = interleaved_medians(rows, n)
    floor = results["python -c pass (cached venv)"]
    peer = results["PythonVirtualenvOperator subprocess step (cached venv)"]
    print(f"\nPython {sys.version.split()[0]}, median of {n} runs, trivial callable\n")
    print(f"{'':56} {'ms':>8} {'x floor':>8} {'x PVO':>7}")
    for name, seconds in results.items():
        print(f"{name:56} {seconds * 1000:8.1f} {seconds / floor:8.2f} {seconds / peer:7.2f}")
    ours = results["run_in_interpreter (cached venv)"]
    print(f"\nrun_in_interpreter overhead over the floor: {(ours - floor) * 1000:.1f} ms (goal <= 100 ms)")
    print(f"run_in_interpreter / PythonVirtualenvOperator subprocess step: {ours / peer:.2f}")


if __name__ == "__main__":
    main()
