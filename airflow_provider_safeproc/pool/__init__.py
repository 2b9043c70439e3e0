"""The process pool: ``SafeProcessPoolExecutor``, its front, and the engines behind it.

How work travels (the caller's thread on the left, the engine's thread and processes right)::

    caller                         engine thread                     processes
    ------                         -------------                     ---------
    submit / map                                                     guardian (one per pool:
      | checks, cloudpickle                                            starts, reaps, and ends
      v  (executor.py)                                                 the workers' trees)
    Job + Dispatches ---> WorkQueue ---> next_dispatch() ---RunChunk---> worker
      (jobs.py)          (workqueue.py)   (engine)          frames      | stamps the status slot
                                                          (protocol.py) | runs the items
                                                                         v (worker_loop.py)
    Future / iterator <--- Job.record <--- settle rules <---Results----- worker
      (results in order)   (jobs.py)      (settle.py)        LogLine
                                              ^
                                              +--- worker lost: its last stamp says which item

Modules:

- ``executor``: the front: argument checks, serialization, result iteration, progress.
- ``jobs``: jobs, chunks, outcomes and the summary of a map.
- ``workqueue``: the queue of dispatches and the pool's lifecycle state, shared with the engine.
- ``settle``: the rules that turn reports and deaths into exactly one outcome per item.
- ``protocol``: the messages between the pool and its workers, the status slot, the config.
- ``worker_loop``, ``worker_output``: inside a worker, whatever started it: running chunks
  under stamps, and sending what the items print, tagged.
- ``engine``: the seam an engine implements; ``native/``: the engine of guardian, dispatcher
  thread and lean workers (Linux).

Workers import this package's ``__init__``: it imports nothing, and the public names are
resolved on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow_provider_safeproc._lazy import lazy_exports

__all__ = ["ItemOutcome", "MapSummary", "SafeProcessPoolExecutor"]

_LAZY = {
    "SafeProcessPoolExecutor": "airflow_provider_safeproc.pool.executor",
    "ItemOutcome": "airflow_provider_safeproc.pool.jobs",
    "MapSummary": "airflow_provider_safeproc.pool.jobs",
}

if TYPE_CHECKING:
    from airflow_provider_safeproc.pool.executor import SafeProcessPoolExecutor
    from airflow_provider_safeproc.pool.jobs import ItemOutcome, MapSummary

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
