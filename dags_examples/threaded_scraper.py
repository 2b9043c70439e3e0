"""A task with threads running (a scraper, a headless browser) that then fans out to processes.

Why: libraries such as Playwright, Selenium drivers, HTTP clients with connection pools or
gRPC start threads. ``fork()`` copies only the calling thread; a lock held by another thread
at that moment stays locked forever in the child, which then hangs (Python 3.12+ warns:
"This process is multi-threaded, use of fork() may lead to deadlocks in the child"). The
stdlib's pools fork by default on Linux before Python 3.14. SafeProcessPoolExecutor never forks
the caller: its default start method, forkserver, forks workers from a lean helper process
that has one thread and has not imported Airflow.

Shape: download pages on threads (I/O-bound: threads are right), then, with those threads
still alive, parse the pages on processes (CPU-bound: threads would share one GIL). Each
worker reports what proves it is no copy of the task process: its parent is not the task and
it has not imported Airflow (a fork of the task process would have).
"""

from __future__ import annotations

import pendulum

try:
    from airflow.sdk import dag, task
except ImportError:  # Airflow 2
    from airflow.decorators import dag, task


def download(page: int) -> str:
    """Stands in for an HTTP or browser fetch (no network needed to run the example)."""
    import time

    time.sleep(0.05)  # waiting on the network: the GIL is free, threads overlap
    return " ".join(f"word{(page * 7 + i) % 101}" for i in range(20_000))


def parse(html: str) -> dict:
    """CPU-bound parsing, in a worker process."""
    import os
    import sys
    import threading
    from collections import Counter

    words = Counter(html.split())
    return {
        "distinct_words": len(words),
        "worker_pid": os.getpid(),
        "worker_parent_pid": os.getppid(),
        "worker_threads": threading.active_count(),
        "airflow_imported_in_worker": "airflow" in sys.modules,
    }


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False, tags=["safeproc"])
def safeproc_threaded_scraper():
    @task
    def scrape_and_parse() -> dict:
        import os
        import threading
        from concurrent.futures import ThreadPoolExecutor

        from airflow_provider_safeproc import SafeProcessPoolExecutor

        # A "browser session": a keep-alive thread and a pool of download threads.
        closed = threading.Event()
        keepalive = threading.Thread(target=closed.wait, name="browser-keepalive", daemon=True)
        keepalive.start()
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="download") as downloads:
            pages = list(downloads.map(download, range(12)))
            threads_at_fan_out = threading.active_count()  # keep-alive + 4 downloaders + main (at least)

            # Fan out while those threads still run. Default start method: never a fork of us.
            with SafeProcessPoolExecutor() as pool:
                parsed = list(pool.map(parse, pages))
                summary = pool.summary
        closed.set()

        print(f"threads in the task process at fan-out: {threads_at_fan_out}")
        print(f"run summary: {summary}")  # the pool's own account: items, workers, time
        assert threads_at_fan_out > 1
        assert not any(p["worker_parent_pid"] == os.getpid() for p in parsed), (
            "a worker was forked from the task"
        )
        assert not any(p["airflow_imported_in_worker"] for p in parsed)
        return {
            "pages": len(parsed),
            "threads_at_fan_out": threads_at_fan_out,
            "worker_pids": sorted({p["worker_pid"] for p in parsed}),
        }

    scrape_and_parse()


safeproc_threaded_scraper()
