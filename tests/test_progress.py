"""format_progress: the one line a progress sink logs."""

from __future__ import annotations

import pytest

from airflow_provider_safeproc import format_progress


@pytest.mark.parametrize(
    ("done", "total", "elapsed", "expected"),
    [
        (37, 200, 3.06, "37/200 done, 12.1 items/s, ETA 14 s"),
        (0, 200, 5.0, "0/200 done"),
        (5, 10, 0.0, "5/10 done"),
        (10, 10, 2.0, "10/10 done, 5.0 items/s"),
        (1, 100, 10.0, "1/100 done, 0.1 items/s, ETA 16 min 30 s"),
        (1, 1000, 10.0, "1/1000 done, 0.1 items/s, ETA 2 h 46 min"),
    ],
)
def test_format_progress(done, total, elapsed, expected):
    assert format_progress(done, total, elapsed) == expected
