"""Containment: nothing a pool started outlives it, however the pool's processes end.

The process layout, for either engine (Linux)::

    task process T       Airflow's process group; the pool's front and dispatcher thread
    └─ keeper K          own session; child subreaper; watches T (pidfd) and H   (keeper.py)
       └─ helper H       the native guardian or the billiard helper; child subreaper
          └─ workers     each tagged (tags.py) and, where allowed, in a cgroup (cgroups.py)
             └─ whatever the items start (subprocesses, stdlib pools, setsid daemons)

Four ways a pool's processes used to leak, and what ends them now:

1. and 2. **A SIGKILL to the task's process group** (Airflow 2's ``reap_process_group``,
   Airflow 3's ``killpg`` escalation) killed the helper with the task, so whatever had left
   the group (``setsid``: browsers, daemons, database clients) had nobody left to end it.
   K is in a session of its own: no group signal reaches it. It sees T's end (a pidfd), gives
   H its grace to end the tree politely, then SIGKILLs what is left.
3. **The helper SIGKILLed**: K is the subreaper above it, so every orphan comes to K, which
   SIGKILLs them at once and exits as H did (the pool reports the helper's death as before).
4. **A worker SIGKILLed alone** (the OOM killer): what its item started reparents to H, among
   what live items started. H ends exactly the dead worker's processes at once: by its cgroup
   (``cgroup.kill``) where the task may create cgroups, else by its tag, an environment entry
   every worker writes over a placeholder and every process it starts inherits.

And if K itself is SIGKILLed, H hears of it (a parent-death signal) and ends its own tree;
the task process, seeing the pool's helper gone uncleanly, ends whatever still carries the
pool's token (:func:`end_tagged_processes`, also the interpreter's last resort).

K's targets are its descendants (the kernel keeps that list), members of the cgroups it made,
and processes carrying its own random token: never a process the pool did not start. K holds
no descriptor of T's (no control socket, no Airflow log socket), so the pool and Airflow see
end of file exactly when H and T go.

What is not guaranteed, and where:

- a process that left its cgroup (root only) or, without cgroups, dropped its environment
  (``env={}``) or was started by a ``fork`` pool's worker (whose environment block is the
  task's: no placeholder to stamp) is not tied to its worker: it ends when the pool closes or
  when K sweeps, never earlier and never wrongly;
- K, H and T all SIGKILLed at once: orphans go to init (with cgroups, they stay in the pool's
  cgroup, which is left behind, populated);
- other systems than Linux (the billiard engine on macOS): K still keeps out of the task's
  group and ends H's tree when T dies, but has no subreaper, pidfd, tags or cgroups: what
  left the tree and outlived its parent is beyond reach.

Stdlib only, like :mod:`~airflow_provider_safeproc.reaper`, which does the walking and killing.
"""

from __future__ import annotations

from airflow_provider_safeproc.containment.cgroups import PoolCgroup, join_cgroup
from airflow_provider_safeproc.containment.keeper import Kept, keep, reap_keeper
from airflow_provider_safeproc.containment.tags import (
    TAG_KEY,
    end_tagged_processes,
    end_what_a_worker_left,
    pool_token,
    stamp_worker_tag,
    tag_environment,
)
from airflow_provider_safeproc.containment.workers import WorkerContainment

__all__ = [
    "TAG_KEY",
    "Kept",
    "PoolCgroup",
    "WorkerContainment",
    "end_tagged_processes",
    "end_what_a_worker_left",
    "join_cgroup",
    "keep",
    "pool_token",
    "reap_keeper",
    "stamp_worker_tag",
    "tag_environment",
]
