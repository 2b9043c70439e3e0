"""The native engine's clock: items past their timeouts, and workers that closed but live on.

An item's start time is in its worker's status slot, so timing costs no message. An item past
``item_soft_timeout`` is named in the slot and its worker sent SIGUSR1, which raises
``ItemSoftTimeoutError`` in it if it still runs that item. A worker whose item ran past
``item_timeout`` is killed with everything it started; its exit report then settles the item
as timed out. A worker that closed its socket but whose exit the guardian has not reported
within a few seconds is killed too, so that its exit comes.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable

from airflow_provider_safeproc.pool.native.workers import NativeWorker
from airflow_provider_safeproc.pool.protocol import Phase, Stamp
from airflow_provider_safeproc.reaper import kill_process_tree_now, signal_process

_EOF_WITHOUT_EXIT = 5.0  # s to wait for the guardian's exit report after a worker's EOF
_TIMED_PHASES = (Phase.ITEM, Phase.RESULT, Phase.LOADING)


class TimeoutHandler:
    def __init__(self, item_timeout: float | None, item_soft_timeout: float | None = None) -> None:
        self.item_timeout = item_timeout
        self.item_soft_timeout = item_soft_timeout

    @staticmethod
    def _timed(stamp: Stamp, worker: NativeWorker) -> bool:
        """Whether the stamp is of an item of the worker's dispatch, running now."""
        return stamp.running and stamp.seq == worker.seq and stamp.phase in _TIMED_PHASES

    def next_wake(self, workers: Iterable[NativeWorker]) -> float | None:
        """Seconds until the earliest deadline, None when nothing is timed."""
        timeout: float | None = None
        now = time.monotonic()
        for worker in workers:
            deadlines = []
            if worker.state == "busy" and worker.kill_reason is None:
                stamp = worker.status.read()
                timed = self._timed(stamp, worker)
                started = stamp.started if timed else now  # not stamped yet: it starts about now
                if self.item_timeout is not None:
                    deadlines.append(started + self.item_timeout)
                asked = timed and worker.soft_asked == (stamp.seq, stamp.pos)
                if self.item_soft_timeout is not None and not asked:
                    deadlines.append(started + self.item_soft_timeout)
            if worker.eof_at is not None:
                deadlines.append(worker.eof_at + _EOF_WITHOUT_EXIT)
            for deadline in deadlines:
                left = max(0.0, deadline - now)
                timeout = left if timeout is None else min(timeout, left)
        return timeout

    def check(self, workers: Iterable[NativeWorker]) -> None:
        now = time.monotonic()
        for worker in list(workers):
            if worker.state == "busy" and worker.kill_reason is None and worker.pid is not None:
                stamp = worker.status.read()
                ran = now - stamp.started if self._timed(stamp, worker) else None
                if ran is not None and self.item_timeout is not None and ran >= self.item_timeout:
                    worker.kill_reason = "timeout"
                    worker.timed_out = (stamp.seq, stamp.pos)
                    kill_process_tree_now([worker.pid])
                elif (
                    ran is not None
                    and self.item_soft_timeout is not None
                    and ran >= self.item_soft_timeout
                    and stamp.phase == Phase.ITEM
                    and worker.soft_asked != (stamp.seq, stamp.pos)
                ):
                    worker.soft_asked = (stamp.seq, stamp.pos)
                    worker.status.ask_soft_timeout(stamp.seq, stamp.pos)
                    signal_process(worker.pid, signal.SIGUSR1)
            if worker.eof_at is not None and now - worker.eof_at > _EOF_WITHOUT_EXIT and worker.pid:
                kill_process_tree_now([worker.pid])  # closed its socket yet lives: end it
                worker.eof_at = None
