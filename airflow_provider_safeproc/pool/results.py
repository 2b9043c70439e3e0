"""Handing a map's outcomes back to the caller: in input order, or in completion order.

Each iterator refills the input window (:class:`~airflow_provider_safeproc.pool.feeding.InputReader`)
as it goes and lets a chunk go once its outcomes are handed out, so the job holds only its
window. Leaving early (``break``, an exception, the iterator dropped) stops the reading and
cancels what was read and not started: that costs one slice assignment per chunk, so it is
instant however long the input.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterator
from typing import Any, cast

from airflow_provider_safeproc.pool.feeding import InputReader
from airflow_provider_safeproc.pool.jobs import (
    CANCELLED_STATE,
    FAILED_STATE,
    OK_STATE,
    PENDING_STATE,
    ItemOutcome,
)


class MapResults(itertools.chain[Any]):
    """What ``map`` returns: its results chained at C speed, and ``close()`` as a generator
    has (the stdlib's ``Executor.map`` returns one): leaving early, explicitly."""

    runs: Iterator[Iterator[Any]]

    @classmethod
    def over(cls, runs: Iterator[Iterator[Any]]) -> MapResults:
        results = cast(MapResults, cls.from_iterable(runs))  # the subclass, at run time
        results.runs = runs
        return results

    def close(self) -> None:
        close = getattr(self.runs, "close", None)
        if close is not None:
            close()


def result_runs(
    reader: InputReader, deadline: float | None, leave: Callable[[], None]
) -> Iterator[Iterator[Any]]:
    """``map``: runs of consecutive results already there, up to the first pending or failed one.

    ``map`` chains these runs, so 100,000 tiny results are handed out at C speed, with no
    per-item bookkeeping; a failed item raises when the iteration reaches it. Each run pops
    its results as they are handed out, and the chunk forgets them: a result the caller
    dropped is freed.
    """
    job = reader.job
    try:
        while True:
            reader.fill()
            if not job.chunks:
                break
            chunk = job.chunks[0]
            state, values, size = chunk.state, chunk.values, chunk.size
            pos = 0
            while pos < size:
                if job.wait(chunk, pos, deadline) != OK_STATE:
                    raise job.error_of(chunk, pos)
                end = state.find(PENDING_STATE, pos)
                end = size if end < 0 else end
                failed = (state.find(FAILED_STATE, pos, end), state.find(CANCELLED_STATE, pos, end))
                stop = min([f for f in failed if f >= 0], default=end)
                run = collections.deque(values[pos:stop])
                values[pos:stop] = itertools.repeat(None, stop - pos)
                yield itertools.starmap(run.popleft, itertools.repeat((), stop - pos))
                pos = stop
            job.chunks.popleft()
        reader.raise_error()
    finally:
        leave()


def ordered_outcomes(reader: InputReader, leave: Callable[[], None]) -> Iterator[ItemOutcome]:
    """``map_outcomes``: one outcome per item read, in input order."""
    job = reader.job
    try:
        while True:
            reader.fill()
            if not job.chunks:
                break
            chunk = job.chunks[0]
            for pos in range(chunk.size):
                job.wait(chunk, pos, None)
                yield job.take_outcome(chunk, pos)
            job.chunks.popleft()
        reader.raise_error()
    finally:
        leave()


def unordered_outcomes(reader: InputReader, leave: Callable[[], None]) -> Iterator[ItemOutcome]:
    """``map_unordered``: one outcome per item read, as each finishes."""
    job = reader.job
    try:
        while True:
            reader.fill()
            taken = job.wait_completed()
            if taken is None:
                if job.exhausted:
                    break
                continue  # every item read has been handed out: read more
            chunk, pos = taken
            yield job.take_outcome(chunk, pos)
            chunk.taken += 1
            if chunk.taken == chunk.size:
                job.chunks.remove(chunk)
        reader.raise_error()
    finally:
        leave()
