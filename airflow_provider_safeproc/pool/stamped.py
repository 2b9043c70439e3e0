"""Workers whose status slot the pool reads: what they run now, and the clock of their items.

Both engines' workers stamp each item in a status slot (see ``protocol``), so the pool knows
without a message per item which item a worker runs (output written to fds 1 and 2 is tagged
with it) and since when. The :class:`TimeoutHandler` times items from those stamps: an item
past ``item_soft_timeout`` is named in the slot and its worker sent SIGUSR1, which raises
``ItemSoftTimeoutError`` in it if it still runs that item; an item past ``item_timeout`` has
its worker killed (by the engine's ``kill``), and the worker's death then settles the item
as timed out.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable

from airflow_provider_safeproc.pool.protocol import ItemTag, Phase, Stamp, StatusSlot
from airflow_provider_safeproc.pool.settle import WorkerRecord
from airflow_provider_safeproc.reaper import signal_process

_TIMED_PHASES = (Phase.ITEM, Phase.RESULT, Phase.LOADING)


class StampedWorker(WorkerRecord):
    """A worker record with the worker's status slot."""

    def __init__(self, status: StatusSlot) -> None:
        super().__init__()
        self.status = status

    def running_stamp(self, phases: tuple[Phase, ...] = _TIMED_PHASES) -> Stamp | None:
        """The stamp of the item of its dispatch it runs now, or None."""
        stamp = self.status.read()
        if stamp.running and stamp.seq == self.seq and stamp.phase in phases:
            return stamp
        return None

    def item_tag(self) -> ItemTag:
        """The item it runs now, for tagging its output; None between items."""
        stamp = self.running_stamp((Phase.ITEM, Phase.RESULT))
        dispatch = self.dispatch
        if stamp is None or dispatch is None:
            return None
        return dispatch.tag(stamp.pos)


class TimeoutHandler:
    """Soft and hard item timeouts; ``kill(worker)`` ends a worker and what it started."""

    def __init__(
        self,
        item_timeout: float | None,
        item_soft_timeout: float | None,
        *,
        kill: Callable[[StampedWorker], None],
    ) -> None:
        self.item_timeout = item_timeout
        self.item_soft_timeout = item_soft_timeout
        self.kill = kill

    def next_wake(self, workers: Iterable[StampedWorker]) -> float | None:
        """Seconds until the earliest deadline, None when nothing is timed."""
        if self.item_timeout is None and self.item_soft_timeout is None:
            return None
        timeout: float | None = None
        now = time.monotonic()
        for worker in workers:
            if worker.state != "busy" or worker.kill_reason is not None:
                continue
            stamp = worker.running_stamp()
            started = stamp.started if stamp is not None else now  # not stamped yet: it starts about now
            deadlines = []
            if self.item_timeout is not None:
                deadlines.append(started + self.item_timeout)
            asked = stamp is not None and worker.soft_asked == (stamp.seq, stamp.pos)
            if self.item_soft_timeout is not None and not asked:
                deadlines.append(started + self.item_soft_timeout)
            for deadline in deadlines:
                left = max(0.0, deadline - now)
                timeout = left if timeout is None else min(timeout, left)
        return timeout

    def check(self, workers: Iterable[StampedWorker]) -> None:
        if self.item_timeout is None and self.item_soft_timeout is None:
            return
        now = time.monotonic()
        for worker in list(workers):
            if worker.state != "busy" or worker.kill_reason is not None or worker.pid is None:
                continue
            stamp = worker.running_stamp()
            if stamp is None:
                continue
            ran = now - stamp.started
            if self.item_timeout is not None and ran >= self.item_timeout:
                worker.kill_reason = "timeout"
                worker.timed_out = (stamp.seq, stamp.pos)
                self.kill(worker)
            elif (
                self.item_soft_timeout is not None
                and ran >= self.item_soft_timeout
                and stamp.phase == Phase.ITEM
                and worker.soft_asked != (stamp.seq, stamp.pos)
            ):
                worker.soft_asked = (stamp.seq, stamp.pos)
                worker.status.ask_soft_timeout(stamp.seq, stamp.pos)
                signal_process(worker.pid, signal.SIGUSR1)
