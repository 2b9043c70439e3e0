"""The engines and start methods the pool's contract tests run on, written once.

``SAFEPROC_ENGINES=native`` (a comma-separated list) narrows them, for CI's secondary runs.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from airflow_provider_safeproc.validation import START_METHODS


class PoolKind(NamedTuple):
    engine: str
    start_method: str

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"engine": self.engine, "start_method": self.start_method}

    def __str__(self) -> str:
        return f"{self.engine}-{self.start_method}"


#: the billiard engine starts workers from a lean helper: "fork" (copies of the caller) is native only
_ALL = [PoolKind("native", m) for m in START_METHODS] + [
    PoolKind("billiard", m) for m in START_METHODS if m != "fork"
]
_ENGINES = [e.strip() for e in os.environ.get("SAFEPROC_ENGINES", "native,billiard").split(",") if e.strip()]
POOL_KINDS = [kind for kind in _ALL if kind.engine in _ENGINES]
