"""The messages and the status slot the pool and its workers share."""

from __future__ import annotations

import os
import pickle

import pytest

from airflow_provider_safeproc.pool.protocol import (
    MAX_CHUNK,
    LogLine,
    Phase,
    Results,
    RunChunk,
    StatusSlot,
    WorkerConfig,
    new_status_fd,
)
from airflow_provider_safeproc.streams import FrameBuffer, encode_frame


@pytest.fixture
def slots():
    fd = new_status_fd()
    worker, pool = StatusSlot(fd), StatusSlot(fd)
    os.close(fd)
    yield worker, pool
    worker.close()
    pool.close()


@pytest.mark.parametrize("phase", list(Phase))
def test_a_stamp_reads_back_as_written(slots, phase):
    worker, pool = slots
    worker.running(seq=123456789, pos=MAX_CHUNK - 1, started=42.5, phase=phase)
    stamp = pool.read()
    assert (stamp.seq, stamp.pos, stamp.running, stamp.phase, stamp.started) == (
        123456789,
        MAX_CHUNK - 1,
        True,
        phase,
        42.5,
    )
    worker.finished(123456789, 3)
    stamp = pool.read()
    assert (stamp.seq, stamp.pos, stamp.running) == (123456789, 3, False)


def test_the_pool_cancels_one_dispatch(slots):
    worker, pool = slots
    pool.cancel(8)
    assert worker.cancelled(8)
    assert not worker.cancelled(9)


def test_messages_travel_as_frames_with_their_blob():
    messages = [
        (RunChunk(1, 2, False, 0, (0, 1), False), b"chunk"),
        (Results(1, 0, 2, True, "unrun", False), b"x" * 100_000),
        (LogLine((3, 9), "stdout", "hello"), b""),
    ]
    data = b"".join(encode_frame(m, b) + (b if len(b) >= 65536 else b"") for m, b in messages)
    frames = FrameBuffer()
    got = frames.feed(data[:10]) + frames.feed(data[10:])
    assert got == messages
    assert isinstance(got[1][0], Results)
    assert got[1][0].rest == "unrun"


def test_the_worker_config_pickles():
    config = WorkerConfig(["/x"], 20, None, 3, None, True, 1.5, {"A": "1"}, b"key", (7,))
    assert pickle.loads(pickle.dumps(config)) == config
