"""An importable module whose closures travel by value and whose functions travel by
reference: workers must see the real module for both (see ``test_serialization``)."""

from __future__ import annotations

from collections.abc import Callable


def triple(x: int) -> int:
    return 3 * x


def make_adder(n: int) -> Callable[[int], int]:
    return lambda x: x + n
