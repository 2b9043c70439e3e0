"""One-line progress text for a pool's ``progress`` sink: ``37/200 done, 12.1 items/s, ETA 13 s``
(``37 done, 12.1 items/s`` for an input without a length)."""

from __future__ import annotations

import math


def _duration(seconds: float) -> str:
    seconds = max(0, math.ceil(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_progress(done: int, total: int | None, elapsed: float) -> str:
    """``done`` of ``total`` items after ``elapsed`` seconds, with the rate and time left.

    The ETA assumes the rate so far holds; it is left out until one item is done, when
    everything is done, and when the total is unknown (None: an input without a length).
    """
    text = f"{done}/{total} done" if total is not None else f"{done} done"
    if elapsed <= 0 or done <= 0:
        return text
    rate = done / elapsed
    text += f", {rate:.1f} items/s"
    if total is not None and done < total:
        text += f", ETA {_duration((total - done) / rate)}"
    return text
