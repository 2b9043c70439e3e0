"""Fail a test whose process forks while it has other threads (Python 3.12+ warns about it).

A ``filterwarnings = error`` entry cannot do this: CPython emits this warning from C after
``fork()`` and swallows the exception an "error" filter would raise. So each test's call is
wrapped in a recorder that turns the warning into a failure and re-emits every other warning.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

import pytest

FORK_WARNING = re.compile(
    r"This process \(pid=\d+\) is multi-threaded, use of fork\(\) may lead to deadlocks"
)


@contextlib.contextmanager
def fail_on_fork_with_threads() -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        yield
    forks = [
        w for w in caught if issubclass(w.category, DeprecationWarning) and FORK_WARNING.match(str(w.message))
    ]
    for w in caught:
        if w not in forks:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if forks:
        where = "; ".join(f"{w.filename}:{w.lineno}" for w in forks)
        pytest.fail(f"fork() from a multi-threaded process ({len(forks)}x at {where})", pytrace=False)
