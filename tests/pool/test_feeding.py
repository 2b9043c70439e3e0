"""Reading a map's input, alone: chunk sizes, the window, and what a bad item or input does.

No process is started: the reader's ``send`` collects dispatches where the pool would queue them.
"""

from __future__ import annotations

import time

import pytest

from airflow_provider_safeproc.errors import SerializationError
from airflow_provider_safeproc.pool.feeding import (
    MAX_AUTO_CHUNK,
    TARGET_CHUNK_BYTES,
    ChunkSizing,
    InputReader,
    dump_chunk,
    length_of,
)
from airflow_provider_safeproc.pool.jobs import Dispatch, Job
from airflow_provider_safeproc.serialization import loads


def _job() -> Job:
    return Job(fn_id=1, fn_blob=b"fn", star=False)


def _reader(items, *, chunksize=None, total=None, window=2, workers=2, fail_send=None):
    job = _job()
    sent: list[Dispatch] = []

    def send(dispatches):
        if fail_send is not None:
            raise fail_send
        sent.extend(dispatches)

    reader = InputReader(
        job,
        iter(items),
        sizing=ChunkSizing(chunksize, total, workers),
        window=window,
        send=send,
        wake=lambda: None,
    )
    return reader, sent


def test_length_of_zip_is_the_shortest_or_none():
    assert length_of([1, 2, 3], range(2)) == 2
    assert length_of([1], iter([1])) is None


def test_a_given_chunksize_is_kept_and_a_length_gives_an_equal_share_per_worker():
    job = _job()
    assert ChunkSizing(7, None, 2).next_size(job) == 7
    assert ChunkSizing(None, 1600, 2).next_size(job) == 100  # 8 chunks per worker
    assert ChunkSizing(None, 3, 2).next_size(job) == 1
    assert ChunkSizing(None, 10**9, 2).next_size(job) == MAX_AUTO_CHUNK


def test_without_a_length_chunks_start_at_one_item_and_grow_with_the_measured_rate():
    job = _job()
    sizing = ChunkSizing(None, None, 2)
    assert sizing.next_size(job) == 1  # nothing measured yet: slow items must not be packed
    job.started = time.monotonic() - 1.0
    job.done = 1_000_000  # tiny items
    sizes = [sizing.next_size(job) for _ in range(6)]
    assert sizes == [4, 16, 64, 256, 1024, 4096]  # at most fourfold per chunk
    slow = ChunkSizing(None, None, 2)
    job.done = 2  # about a second per item
    assert [slow.next_size(job) for _ in range(3)] == [1, 1, 1]


def test_chunks_of_big_items_stay_near_the_byte_target():
    job = _job()
    job.started = time.monotonic() - 1.0
    job.done = 1_000_000
    sizing = ChunkSizing(None, None, 2)
    sizing.note(1, TARGET_CHUNK_BYTES // 2)
    assert [sizing.next_size(job) for _ in range(3)] == [2, 2, 2]


def test_the_reader_keeps_the_window_and_knows_the_end_with_the_last_chunk():
    reader, sent = _reader(range(10), chunksize=3, window=2)
    reader.fill()
    assert [d.chunk.size for d in sent] == [3, 3]
    assert not reader.job.exhausted
    reader.job.chunks.popleft()  # the caller took the first chunk's outcomes
    reader.fill()
    reader.job.chunks.popleft()
    reader.fill()
    assert [d.chunk.size for d in sent] == [3, 3, 3, 1]
    assert reader.job.exhausted  # known as the last chunk was queued, not later
    assert reader.job.n == 10
    assert loads(sent[-1].chunk.blob) == [9]


def test_read_all_ignores_the_window():
    reader, sent = _reader(range(10), chunksize=3, window=1)
    reader.read_all()
    assert sum(d.chunk.size for d in sent) == 10
    assert reader.job.exhausted


def test_an_item_that_cannot_be_serialized_travels_as_a_failure_of_its_own():
    class Bad:
        def __reduce__(self):
            raise TypeError("no")

    reader, sent = _reader([1, Bad(), 3], chunksize=3)
    reader.fill()
    (dispatch,) = sent
    assert list(dispatch.positions) == [0, 2]
    assert isinstance(dispatch.failed[1], SerializationError)
    assert dispatch.failed[1].item == 1
    assert loads(dispatch.chunk.blob) == [1, None, 3]


def test_an_input_error_ends_the_reading_after_the_items_before_it():
    def broken():
        yield 1
        yield 2
        raise OSError("disk gone")

    reader, sent = _reader(broken(), chunksize=5)
    reader.fill()
    assert [d.chunk.size for d in sent] == [2]
    assert reader.job.exhausted
    with pytest.raises(OSError, match="disk gone"):
        reader.raise_error()


def test_a_chunk_the_pool_refused_is_as_if_never_read():
    refused = RuntimeError("cannot schedule new work after shutdown")
    reader, _ = _reader(range(10), chunksize=2, fail_send=refused)
    reader.fill()
    assert reader.job.n == 0
    assert not reader.job.chunks
    assert reader.job.exhausted
    assert reader.error is refused


def test_a_stopped_or_cancelled_job_reads_nothing_more():
    reader, sent = _reader(range(10), chunksize=2, window=5)
    reader.job.cancelled = True
    reader.fill()
    assert sent == []
    assert reader.job.exhausted


def test_dump_chunk_names_each_bad_item():
    class Bad:
        def __reduce__(self):
            raise TypeError("no")

    blob, shared, failed = dump_chunk([Bad(), 2, Bad()], base=10)
    assert shared is None  # nothing large
    assert sorted(failed) == [0, 2]
    assert [e.item for e in failed.values()] == [10, 12]
    assert loads(blob) == [None, 2, None]
