"""The command line of a fresh interpreter that calls one of our entry points.

Built from the function object itself, never from a module name typed as text, so a rename
cannot leave a command pointing nowhere. The package's own directory goes first on
``sys.path``: a worker must import this very copy of the package.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

_PACKAGE_PARENT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
)


def entry_point_argv(fn: Callable[..., Any], *args: Any) -> list[str]:
    """``[python, "-c", code]`` that imports ``fn`` and calls it with ``args`` (plain literals)."""
    code = (
        f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); "
        f"from {fn.__module__} import {fn.__name__}; {fn.__name__}{tuple(args)!r}"
    )
    return [sys.executable, "-c", code]
