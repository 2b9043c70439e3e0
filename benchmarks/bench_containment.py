"""What containment costs: the keeper, per-worker cgroups and tags, at a pool's start and end.

Run: ``python benchmarks/bench_containment.py [--quick]``. One pool of 2 workers, started,
one item, shut down, over and over: medians of the time to the first result and of the
shutdown, for each engine with cgroups (where this machine allows them) and without
(``SAFEPROC_CGROUPS=0``: the keeper and tags alone), beside the stdlib's
``ProcessPoolExecutor`` (forkserver, no containment at all) measured in the same run.
Ratios against the stdlib are printed; the absolute times depend on the machine.

The kill cases themselves (time from a SIGKILL to zero processes) are measured by
``make soak`` (tests/containment), not here.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _setup import QUICK

from airflow_provider_safeproc import SafeProcessPoolExecutor
from airflow_provider_safeproc.containment import PoolCgroup

ROUNDS = 9 if QUICK else 25


def _ours(engine: str) -> tuple[float, float]:
    started = time.perf_counter()
    pool = SafeProcessPoolExecutor(2, engine=engine)
    pool.submit(abs, -1).result()
    first = time.perf_counter()
    pool.shutdown()
    return first - started, time.perf_counter() - first


def _stdlib() -> tuple[float, float]:
    started = time.perf_counter()
    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver"))
    pool.submit(abs, -1).result()
    first = time.perf_counter()
    pool.shutdown()
    return first - started, time.perf_counter() - first


def main() -> None:
    probe = PoolCgroup.create(f"{os.getpid()}-bench")
    if probe is not None:
        probe.remove()
    contenders = {"stdlib ProcessPoolExecutor (forkserver)": (_stdlib, None)}
    for engine in ("native", "billiard"):
        if probe is not None:
            contenders[f"ours {engine}, cgroups + keeper"] = (lambda e=engine: _ours(e), "1")
        contenders[f"ours {engine}, keeper + tags (SAFEPROC_CGROUPS=0)"] = (lambda e=engine: _ours(e), "0")
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(ROUNDS):  # interleaved: a drift of the machine's speed hits every contender
        for name, (fn, cgroups) in contenders.items():
            if cgroups is not None:
                os.environ["SAFEPROC_CGROUPS"] = cgroups
            samples[name].append(fn())
    os.environ.pop("SAFEPROC_CGROUPS", None)
    base_first = statistics.median(s[0] for s in samples["stdlib ProcessPoolExecutor (forkserver)"])
    base_end = statistics.median(s[1] for s in samples["stdlib ProcessPoolExecutor (forkserver)"])
    print(f"{ROUNDS} rounds, medians; cgroups here: {'yes' if probe is not None else 'no'}")
    print(f"{'pool':<48} {'first result':>13} {'vs stdlib':>9} {'shutdown':>10} {'vs stdlib':>9}")
    for name, runs in samples.items():
        first = statistics.median(s[0] for s in runs)
        end = statistics.median(s[1] for s in runs)
        print(
            f"{name:<48} {first * 1000:>10.1f} ms {first / base_first:>8.2f}x"
            f" {end * 1000:>7.1f} ms {end / base_end:>8.2f}x"
        )


if __name__ == "__main__":
    main()
