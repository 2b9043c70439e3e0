"""Frames and lines: the one way bytes between our processes are cut into messages."""

from __future__ import annotations

import os
import socket
import threading

from airflow_provider_safeproc.streams import FrameBuffer, LineSplitter, recv_frame, send_frame, write_frame


def test_frames_cross_a_socket_whole_small_and_large():
    a, b = socket.socketpair()
    big = os.urandom(3 << 20)
    sender = threading.Thread(target=lambda: (send_frame(a, ("small",), b"1"), send_frame(a, {"k": 1}, big)))
    sender.start()
    assert recv_frame(b) == (("small",), b"1")
    assert recv_frame(b) == ({"k": 1}, big)
    sender.join()
    a.close()
    assert recv_frame(b) is None
    b.close()


def test_frames_written_to_a_pipe_reassemble_from_any_split():
    r, w = os.pipe()
    write_frame(w, ("exit", 1, 0))
    os.close(w)
    data = os.read(r, 1 << 16)
    os.close(r)
    frames = FrameBuffer()
    got = [f for i in range(len(data)) for f in frames.feed(data[i : i + 1])]
    assert got == [(("exit", 1, 0), b"")]
    assert frames.pending == 0


def test_lines_are_cut_at_newlines_and_the_last_one_is_flushed():
    lines = LineSplitter(max_line=10)
    assert lines.feed(b"one\ntw") == [b"one"]
    assert lines.feed(b"o\nthree") == [b"two"]
    assert lines.flush() == [b"three"]
    assert lines.flush() == []


def test_a_line_that_never_ends_is_passed_on_not_hoarded():
    lines = LineSplitter(max_line=10)
    assert lines.feed(b"x" * 25) == [b"x" * 25]
