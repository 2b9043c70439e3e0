"""ensure_virtualenv: cold build side by side with PythonVirtualenvOperator's, and the cache hit.

Measured in this run, for the same small requirement from the package index:
- cold build: ``ensure_virtualenv`` into an empty cache directory, against the
  ``prepare_virtualenv`` that PythonVirtualenvOperator runs on a cache miss (with uv when uv is
  on PATH, as here: ``uv venv --seed`` then ``uv pip install``). Rounds alternate between the
  two, after one warm-up round each, so both see the same warm uv package cache.
- cache hit: ``ensure_virtualenv`` for an entry that exists (median of many calls).

Usage: .venv/bin/python benchmarks/bench_virtualenv.py [ROUNDS]
"""

from __future__ import annotations

import logging
import shutil
import statistics
import sys
import time

from _setup import scratch

WORK = scratch("bench-virtualenv-")

from airflow_provider_safeproc import ensure_virtualenv  # noqa: E402

REQUIREMENTS = ["six==1.16.0"]


def ours(round_no: int) -> float:
    started = time.perf_counter()
    python = ensure_virtualenv(REQUIREMENTS, cache_dir=WORK / f"ours-{round_no}")
    assert not python.cache_hit
    return time.perf_counter() - started


def pvo(round_no: int) -> float:
    """What PythonVirtualenvOperator._prepare_venv does (it adds an unpinned cloudpickle)."""
    from airflow.providers.standard.utils.python_virtualenv import prepare_virtualenv

    venv_dir = WORK / f"pvo-{round_no}"
    venv_dir.mkdir()
    requirements_file = venv_dir / "requirements.txt"
    requirements_file.write_text("\n".join(sorted([*REQUIREMENTS, "cloudpickle"])))
    started = time.perf_counter()
    prepare_virtualenv(
        venv_directory=str(venv_dir),
        python_bin=sys.executable,
        system_site_packages=False,
        requirements_file_path=str(requirements_file),
    )
    return time.perf_counter() - started


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    logging.getLogger("airflow.providers.standard.utils.python_virtualenv").setLevel(logging.WARNING)
    uv = shutil.which("uv")
    ours(-1), pvo(-1)  # warm-up: uv's package cache, interpreter discovery, imports
    cold: dict[str, list[float]] = {
        "ensure_virtualenv": [],
        "PythonVirtualenvOperator prepare_virtualenv": [],
    }
    for round_no in range(rounds):
        cold["ensure_virtualenv"].append(ours(round_no))
        cold["PythonVirtualenvOperator prepare_virtualenv"].append(pvo(round_no))

    cache = WORK / "ours-0"
    hits = []
    for _ in range(200):
        started = time.perf_counter()
        assert ensure_virtualenv(REQUIREMENTS, cache_dir=cache).cache_hit
        hits.append(time.perf_counter() - started)

    peer = statistics.median(cold["PythonVirtualenvOperator prepare_virtualenv"])
    print(f"\nPython {sys.version.split()[0]}, uv {'at ' + uv if uv else 'not found (pip)'}, {REQUIREMENTS}")
    print(f"cold build, median of {rounds} alternating rounds after a warm-up:\n")
    print(f"{'':48} {'s':>7} {'x PVO':>7}")
    for name, values in cold.items():
        print(f"{name:48} {statistics.median(values):7.2f} {statistics.median(values) / peer:7.2f}")
    print(
        f"\ncache hit, median of {len(hits)}: {statistics.median(hits) * 1000:.2f} ms (goal: well under 100 ms)"
    )
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
