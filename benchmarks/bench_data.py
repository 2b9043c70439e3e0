"""Data at scale through the pool, against the stdlib, loky, joblib and the memory-copy limit.

    python benchmarks/bench_data.py [--quick] [arrays|streaming|leaving|imports ...]

Every contender gets fresh arrays on every call (joblib reuses its memory-mapped file when
handed the same arrays again, which would measure a cache). Goals (issue 13):

- send 32 numpy arrays of 8 MiB to a function that returns a float: at or below joblib's
  time, within 2x of one plain copy of the data (the workers' reading is in that time);
- round trip (the function returns an array as large): within 2.5x of two plain copies;
- parent memory during the send bounded by the input plus the in-flight window;
- a 10,000,000-item generator: flat parent memory, first result before the input ends;
- leaving a 3,000,000-item map early: under 0.1 s;
- imports paid once: a pool of 4 workers whose function refers to ``airflow.sdk`` costs at
  most 1.3x one import of it more than the same pool with a plain function.

The machine is shared and noisy: each figure is a median of repeats, and ratios compare
figures of the same run.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from _setup import QUICK, REPEATS, median_time  # noqa: E402

from airflow_provider_safeproc import SafeProcessPoolExecutor  # noqa: E402

ARRAYS, ARRAY_BYTES = 32, 8 << 20
MiB = 1 << 20


def total(a: Any) -> float:
    return float(a.sum())


def plus_one(a: Any) -> Any:
    return a + 1


def tiny(x: int) -> int:
    return x + 1


def fresh_arrays() -> list[Any]:
    rng = np.random.default_rng()
    return [rng.random(ARRAY_BYTES // 8) for _ in range(ARRAYS)]


class PeakMemory:
    """Peak of this process's resident memory plus the shared memory it holds open (memfds
    whose pages are not in its RSS until mapped), sampled every millisecond."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        shared = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                if "memfd:safeproc" in os.readlink(f"/proc/self/fd/{fd}"):
                    shared += os.fstat(int(fd)).st_size
            except OSError:
                pass
        return rss + shared

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def __enter__(self) -> PeakMemory:
        self.before = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def grew(self) -> float:
        return (self.peak - self.before) / MiB


def median_fresh(run: Callable[[list[Any]], Any]) -> float:
    """Median time of ``run(arrays)``, fresh arrays each time (made outside the timing)."""
    times = []
    for _ in range(REPEATS):
        arrays = fresh_arrays()
        gc.collect()
        started = time.perf_counter()
        result = run(arrays)
        times.append(time.perf_counter() - started)
        del result, arrays
    return statistics.median(times)


def contenders() -> dict[str, tuple[Callable[[Callable[..., Any], list[Any]], Any], Callable[[], None]]]:
    """name -> (map(fn, arrays) -> list, close)."""
    from joblib import Parallel, delayed
    from joblib.externals.loky import get_reusable_executor

    found: dict[str, Any] = {}
    for engine in ("native", "billiard"):
        pool = SafeProcessPoolExecutor(2, engine=engine)
        found[f"ours ({engine})"] = (lambda fn, arrays, pool=pool: list(pool.map(fn, arrays)), pool.shutdown)
    stdlib = multiprocessing.get_context("forkserver").Pool(2)
    found["stdlib Pool.map"] = (lambda fn, arrays: stdlib.map(fn, arrays), stdlib.terminate)
    loky = get_reusable_executor(2)
    found["loky"] = (lambda fn, arrays: list(loky.map(fn, arrays)), lambda: loky.shutdown(wait=True))
    parallel = Parallel(n_jobs=2)
    found["joblib Parallel"] = (lambda fn, arrays: parallel(delayed(fn)(a) for a in arrays), lambda: None)
    return found


def bench_arrays() -> None:
    print(f"== {ARRAYS} arrays of {ARRAY_BYTES // MiB} MiB, fresh each call ({REPEATS} repeats, medians)")
    one_copy = median_fresh(lambda arrays: [a.copy() for a in arrays])
    two_copies = median_fresh(lambda arrays: [a.copy().copy() for a in arrays])
    print(f"{'limit: one plain copy':28} {one_copy * 1000:8.0f} ms")
    print(f"{'limit: two plain copies':28} {two_copies * 1000:8.0f} ms")
    rows = []
    for name, (run, close) in contenders().items():
        run(total, fresh_arrays()[:4])  # warm: workers up, numpy imported
        send = median_fresh(lambda arrays, run=run: run(total, arrays))
        trip = median_fresh(lambda arrays, run=run: run(plus_one, arrays))
        arrays = fresh_arrays()
        gc.collect()
        with PeakMemory() as memory:
            run(total, arrays)
        del arrays
        close()
        rows.append((name, send, trip, memory.grew))
    joblib_send = next(send for name, send, *_ in rows if name == "joblib Parallel")
    print(
        f"{'':28} {'send':>8} {'x copy':>7} {'x joblib':>9} {'round trip':>11} {'x 2 copies':>11} {'parent +MiB':>12}"
    )
    for name, send, trip, grew in rows:
        print(
            f"{name:28} {send * 1000:6.0f}ms {send / one_copy:7.2f} {send / joblib_send:9.2f}"
            f" {trip * 1000:9.0f}ms {trip / two_copies:11.2f} {grew:12.0f}"
        )


def numbers(n: int):
    yield from range(n)


def bench_streaming() -> None:
    n = 2_000_000 if QUICK else 10_000_000
    print(f"\n== a generator of {n:,} tiny items (ours, native)")
    with SafeProcessPoolExecutor(2) as pool:
        list(pool.map(tiny, range(1000)))
        gc.collect()
        with PeakMemory() as memory:
            started = time.perf_counter()
            results = pool.map(tiny, numbers(n))
            next(results)
            first = time.perf_counter() - started
            count = 1 + sum(1 for _ in results)
            took = time.perf_counter() - started
        assert count == n
    as_list = (sys.getsizeof(list(range(1000))) / 1000 + 28) * n / MiB  # what materializing would hold
    print(f"first result after {first * 1000:.0f} ms; all in {took:.2f} s ({n / took / 1e6:.2f} M items/s)")
    print(f"parent memory grew {memory.grew:.0f} MiB (the input as a list alone: ~{as_list:.0f} MiB)")


def bench_leaving() -> None:
    n = 3_000_000
    print(f"\n== leaving a {n:,}-item map after its first result (ours, median of {REPEATS})")
    with SafeProcessPoolExecutor(2) as pool:
        for label, make in (("list input", lambda: list(range(n))), ("generator input", lambda: numbers(n))):
            times = []
            for _ in range(REPEATS):
                items = make()
                results = pool.map(tiny, items)
                next(results)
                started = time.perf_counter()
                results.close()
                times.append(time.perf_counter() - started)
                del items
            print(f"{label:18} {statistics.median(times) * 1000:8.2f} ms (goal < 100 ms)")


Variable: Any = None  # airflow.sdk.Variable, imported by bench_imports


def reads_variables(x: int) -> int:
    """A per-item function that merely refers to an Airflow name: its workers need airflow.sdk."""
    if x < 0:
        return int(Variable.get("never_read"))
    return x + 1


def bench_imports() -> None:
    import subprocess

    global Variable
    print(f"\n== imports paid once: pool of 4 workers, 8 items, whole lifecycle (median of {REPEATS})")
    from airflow.sdk import Variable

    def interpreter(code: str) -> float:
        return median_time(lambda: subprocess.run([sys.executable, "-c", code], check=True))

    one_import = interpreter("import airflow.sdk") - interpreter("pass")

    def pool_run(fn: Callable[[int], int], *, preload: bool) -> float:
        def run() -> None:
            with SafeProcessPoolExecutor(4, log=lambda line: None) as pool:
                if not preload:
                    pool._engine.preload = lambda modules: None  # type: ignore[method-assign]  # as before
                list(pool.map(fn, range(8), chunksize=1))

        return median_time(run)

    plain = pool_run(tiny, preload=True)
    preloaded = pool_run(reads_variables, preload=True)
    each = pool_run(reads_variables, preload=False)
    print(f"one `import airflow.sdk` (fresh interpreter, minus `python -c pass`): {one_import:.2f} s")
    print(f"pool, plain function:                      {plain:.2f} s")
    print(
        f"pool, function referring to Variable:      {preloaded:.2f} s  (+{preloaded - plain:.2f} s ="
        f" {(preloaded - plain) / one_import:.2f}x one import; goal <= 1.3x)"
    )
    print(
        f"  the same, each worker importing it:      {each:.2f} s  (+{each - plain:.2f} s ="
        f" {(each - plain) / one_import:.2f}x one import)"
    )


BENCHES = {
    "arrays": bench_arrays,
    "streaming": bench_streaming,
    "leaving": bench_leaving,
    "imports": bench_imports,
}

if __name__ == "__main__":
    chosen = [arg for arg in sys.argv[1:] if not arg.startswith("--")] or list(BENCHES)
    for name in chosen:
        BENCHES[name]()
