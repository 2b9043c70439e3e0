"""SafeProcessPoolExecutor against the stdlib (and billiard), measured in the same run.

    python benchmarks/bench_pool.py [--quick]

Prints one table, both engines (native, billiard) beside the stdlib, loky and billiard's own
Pool; every ratio compares figures taken minutes apart on the same machine. The machine is
shared and noisy: each figure is the median of several repeats. Goals (issue 3):

- CPU-bound map (~10 ms items) inside a daemonic process: >= 0.97 of a stdlib ``Pool`` outside
  one, >= 1.9x over serial (2 CPUs);
- 100,000 tiny items, automatic chunking: at or under the time of the stdlib ``Pool.map`` at its
  best chunksize;
- construction to first result in a process whose ``__main__`` is the Airflow CLI: <= 0.4 s;
- shutdown of an idle pool: <= 0.1 s;
- worker RSS near a bare interpreter's.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _setup import QUICK, REPEATS, median_time  # noqa: E402

from airflow_provider_safeproc import SafeProcessPoolExecutor  # noqa: E402

CPU_ITEMS = 100 if QUICK else 200
TINY_ITEMS = 100_000


def burn(ms: float = 10.0) -> int:
    """About ``ms`` of pure-Python CPU work (calibrated below)."""
    n = int(_LOOPS_PER_MS * ms)
    total = 0
    for i in range(n):
        total += i * i
    return total


def _calibrate() -> float:
    n = 200_000
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        total = 0
        for i in range(n):
            total += i * i
        best = min(best, time.perf_counter() - started)
    return n / (best * 1000)


_LOOPS_PER_MS = float(os.environ.get("SAFEPROC_BENCH_LOOPS_PER_MS") or _calibrate())
os.environ["SAFEPROC_BENCH_LOOPS_PER_MS"] = str(_LOOPS_PER_MS)  # same work in every process


def tiny(x: int) -> int:
    return x + 1


# --- 1. CPU-bound map ------------------------------------------------------------------------


def _ours_cpu_map(engine: str = "native") -> float:
    def run():
        with SafeProcessPoolExecutor(2, engine=engine) as pool:
            list(pool.map(burn, [10.0] * CPU_ITEMS))

    return median_time(run)


def _ours_cpu_map_billiard() -> float:
    return _ours_cpu_map("billiard")


def _in_daemon(fn, conn) -> None:
    assert multiprocessing.current_process().daemon
    conn.send(fn())
    conn.close()


def run_in_daemonic_process(fn):
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_in_daemon, args=(fn, child), daemon=True)
    proc.start()
    child.close()
    result = parent.recv()
    proc.join()
    return result


def bench_cpu() -> list[tuple[str, str, str]]:
    serial = median_time(lambda: [burn(10.0) for _ in range(CPU_ITEMS)], repeats=max(2, REPEATS - 2))

    def stdlib():
        with multiprocessing.get_context("forkserver").Pool(2) as pool:
            pool.map(burn, [10.0] * CPU_ITEMS)

    def loky():
        from joblib.externals.loky import ProcessPoolExecutor as LokyExecutor

        with LokyExecutor(2) as pool:
            list(pool.map(burn, [10.0] * CPU_ITEMS))

    stdlib_time = median_time(stdlib)
    loky_time = median_time(loky)
    rows = [
        ("CPU map, serial", f"{serial:.3f} s", f"{CPU_ITEMS} items of ~10 ms"),
        ("CPU map, stdlib Pool(2), normal process", f"{stdlib_time:.3f} s", ""),
        ("CPU map, loky(2), normal process", f"{loky_time:.3f} s", ""),
    ]
    for engine, fn in (("native", _ours_cpu_map), ("billiard", _ours_cpu_map_billiard)):
        ours = run_in_daemonic_process(fn)
        rows += [
            (f"CPU map, ours(2) {engine} engine, in a daemonic process", f"{ours:.3f} s", ""),
            ("  throughput vs stdlib (goal >= 0.97)", f"{stdlib_time / ours:.3f}", ""),
            ("  speed-up over serial (goal >= 1.9)", f"{serial / ours:.2f}x", ""),
        ]
    return rows


# --- 2. many tiny items ----------------------------------------------------------------------


def bench_tiny() -> list[tuple[str, str, str]]:
    items = list(range(TINY_ITEMS))
    rows = []
    best = None
    with multiprocessing.get_context("forkserver").Pool(2) as pool:
        pool.map(tiny, range(100))
        for chunksize in (None, 500, 2_000, 12_500):
            t = median_time(lambda cs=chunksize: pool.map(tiny, items, chunksize=cs))
            rows.append((f"100k tiny, stdlib Pool.map chunksize={chunksize}", f"{t:.3f} s", ""))
            best = t if best is None else min(best, t)
    from joblib.externals.loky import ProcessPoolExecutor as LokyExecutor

    with LokyExecutor(2) as pool:
        list(pool.map(tiny, range(100)))
        loky = median_time(lambda: list(pool.map(tiny, items, chunksize=TINY_ITEMS // 16)))
    rows.append(("100k tiny, loky, chunksize 6,250", f"{loky:.3f} s", ""))
    for engine in ("native", "billiard"):
        with SafeProcessPoolExecutor(2, engine=engine) as pool:
            list(pool.map(tiny, range(100)))
            ours = median_time(lambda: list(pool.map(tiny, items)))
        rows.append((f"100k tiny, ours {engine} engine, automatic chunks", f"{ours:.3f} s", ""))
        rows.append(("  time vs stdlib's best (goal <= 1.0)", f"{ours / best:.3f}", ""))
    return rows


# --- 3. first result, where __main__ is the Airflow CLI ----------------------------------------

FIRST_RESULT = """
import json, sys, time
# What a task process looks like: __main__ is the `airflow` CLI script, Airflow is imported.
from airflow.__main__ import main  # noqa: F401
sys.path.insert(0, {repo!r})

def ours(method, engine="native"):
    from airflow_provider_safeproc import SafeProcessPoolExecutor
    started = time.perf_counter()
    with SafeProcessPoolExecutor(2, start_method=method, engine=engine) as pool:
        pool.submit(abs, -1).result()
        return time.perf_counter() - started

def stdlib(method):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    started = time.perf_counter()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method)) as pool:
        pool.submit(abs, -1).result()
        return time.perf_counter() - started

if __name__ == "__main__":
    print(json.dumps({{"ours native forkserver": ours("forkserver"), "ours native spawn": ours("spawn"),
                      "ours billiard forkserver": ours("forkserver", "billiard"),
                      "ours billiard spawn": ours("spawn", "billiard"),
                      "stdlib spawn": stdlib("spawn")}}))
"""


def bench_first_result() -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "airflow"
        script.write_text(textwrap.dedent(FIRST_RESULT.format(repo=str(REPO))))
        env = {**os.environ, "AIRFLOW_HOME": tmp, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
        runs = []
        for _ in range(max(2, REPEATS - 2)):
            out = subprocess.run(
                [sys.executable, str(script)], capture_output=True, text=True, env=env, check=True
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for key in runs[0]:
        value = statistics.median(r[key] for r in runs)
        goal = " (goal <= 0.4 s)" if key == "ours native forkserver" else ""
        rows.append((f"first result, __main__ = airflow CLI, {key}{goal}", f"{value:.3f} s", ""))
    started = time.perf_counter()
    with SafeProcessPoolExecutor(2) as pool:
        pool.submit(abs, -1).result()
        first = time.perf_counter() - started
    rows.append(("first result, plain process, ours forkserver", f"{first:.3f} s", "one run"))
    return rows


# --- 4. shutdown of an idle pool ---------------------------------------------------------------


def bench_shutdown() -> list[tuple[str, str, str]]:
    from concurrent.futures import ProcessPoolExecutor

    import billiard

    def ours(engine: str = "native"):
        pool = SafeProcessPoolExecutor(2, engine=engine)
        list(pool.map(abs, range(4), chunksize=1))
        started = time.perf_counter()
        pool.shutdown()
        return time.perf_counter() - started

    def stdlib():
        pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver"))
        list(pool.map(abs, range(4)))
        started = time.perf_counter()
        pool.shutdown()
        return time.perf_counter() - started

    def bill():
        pool = billiard.Pool(2)
        pool.map(abs, range(4))
        started = time.perf_counter()
        pool.close()
        pool.join()
        return time.perf_counter() - started

    rows = []
    for name, fn in (
        ("ours native engine (goal <= 0.1 s)", ours),
        ("ours billiard engine", lambda: ours("billiard")),
        ("stdlib ProcessPoolExecutor", stdlib),
        ("billiard Pool", bill),
    ):
        value = statistics.median(fn() for _ in range(REPEATS))
        rows.append((f"shutdown of an idle pool, {name}", f"{value:.3f} s", ""))
    return rows


# --- 5. worker RSS ------------------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_rss() -> list[tuple[str, str, str]]:
    bare = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [("RSS, bare interpreter", f"{int(bare.stdout) / 2**20:.1f} MiB", "")]
    for engine in ("native", "billiard"):
        for method in ("forkserver", "spawn"):
            with SafeProcessPoolExecutor(1, start_method=method, engine=engine) as pool:
                rss = pool.submit(_rss_mib).result()
            rows.append((f"RSS, our {engine} worker ({method})", f"{rss:.1f} MiB", "no __main__, no airflow"))
    return rows


# --- 6. a lost worker -----------------------------------------------------------------------------


def _sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _ours_lost(engine: str) -> float:
    with SafeProcessPoolExecutor(1, engine=engine) as pool:
        future = pool.submit(_sleep, 60)
        while not pool.worker_pids:
            time.sleep(0.01)
        time.sleep(0.3)
        killed = time.perf_counter()
        os.kill(pool.worker_pids[0], 9)
        try:
            future.result(timeout=60)
        except Exception:
            pass
        return time.perf_counter() - killed


def _billiard_lost() -> float:
    import billiard

    pool = billiard.Pool(1)
    done = []
    pool.apply_async(_sleep, (60,), error_callback=lambda exc: done.append(time.perf_counter()))
    time.sleep(1.0)
    killed = time.perf_counter()
    os.kill(pool._pool[0].pid, 9)
    while not done and time.perf_counter() - killed < 60:
        time.sleep(0.01)
    pool.terminate()
    return (done[0] if done else time.perf_counter()) - killed


def bench_lost_worker() -> list[tuple[str, str, str]]:
    rows = []
    for engine in ("native", "billiard"):
        value = statistics.median(_ours_lost(engine) for _ in range(3))
        rows.append(
            (f"lost worker noticed, ours {engine} engine", f"{value:.3f} s", "SIGKILL -> WorkerLostError")
        )
    rows.append(
        (
            "lost worker noticed, billiard Pool",
            f"{_billiard_lost():.3f} s",
            "one run; lost_worker_timeout=10 s",
        )
    )
    return rows


def main() -> None:
    rows: list[tuple[str, str, str]] = []
    for section in (bench_cpu, bench_tiny, bench_first_result, bench_shutdown, bench_lost_worker, bench_rss):
        print(f"running {section.__name__} ...", file=sys.stderr, flush=True)
        rows.extend(section())
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>10}  note")
    print("-" * (width + 20))
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")


if __name__ == "__main__":
    main()
