"""What a bare fork of this process must let go of: the one at-fork registry of the package.

A pool or an interpreter handle holds sockets whose end of file tells a helper process that
its owner died. A forked copy of the owner (a fork-based pool of the user's, ``os.fork``)
inherits them; if it kept them open, the owner's death would go unnoticed for as long as the
copy lives. ``close_fds`` covers fork+exec; this covers fork alone. The copy must also never
act on the original's processes, so it forgets them without touching them.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

__all__ = ["ForgetsAfterFork", "forget_in_forked_child"]


class ForgetsAfterFork(Protocol):
    def forget_after_fork(self) -> None:
        """In a forked copy: close inherited descriptors, never signal or wait for anything."""


_owners: weakref.WeakSet[ForgetsAfterFork] = weakref.WeakSet()


def forget_in_forked_child(owner: ForgetsAfterFork) -> None:
    """Have ``owner.forget_after_fork()`` called in every child forked from now on."""
    _owners.add(owner)


def _in_forked_child() -> None:
    owners = list(_owners)
    _owners.clear()
    for owner in owners:
        try:
            owner.forget_after_fork()
        except Exception:
            pass  # a failure here must not break the user's fork


os.register_at_fork(after_in_child=_in_forked_child)
