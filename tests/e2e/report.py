"""Figures the end-to-end tests measure, printed in pytest's terminal summary.

The executor compatibility table in the README is taken from these lines, so each says what
was measured, on which executor.
"""

from __future__ import annotations

FACTS: list[str] = []


def record(executor: str, fact: str) -> None:
    FACTS.append(f"[{executor}] {fact}")
