"""The engines and start methods the pool's contract tests run on, written once."""

from __future__ import annotations

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
POOL_KINDS = [PoolKind("native", m) for m in START_METHODS] + [
    PoolKind("billiard", m) for m in START_METHODS if m != "fork"
]
