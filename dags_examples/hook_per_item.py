"""A hook per item: each item opens its own connection, found by its Airflow connection id.

Why: the most common per-item code in data pipelines is "for each file, load it with
``PostgresHook(postgres_conn_id=...)``", "for each key, ``S3Hook(...).read_key``". Inside
``@task.parallel`` such code runs unchanged: a worker's ``BaseHook.get_connection`` (which
every hook calls) and ``Variable.get`` are answered by the task process, which looks each key up
once per run with Airflow's own API (secrets backends, masking of passwords in the task log)
and hands the value to every worker that asks. Workers never open the metadata database nor
share the task's supervisor socket.

Shape: one task fills a small warehouse (a SQLite file, so the example needs no server and no
network); then one item per region, each with a hook of its own, sums that region's orders
above a threshold read from a Variable. ``WarehouseHook`` stands for any provider's hook:
``PostgresHook``, ``S3Hook`` or ``HttpHook`` are used the same way.

Needs the connection ``safeproc_gallery_warehouse`` (type ``sqlite``, host: the path of a
SQLite file the task may create), for instance
``AIRFLOW_CONN_SAFEPROC_GALLERY_WAREHOUSE='{"conn_type": "sqlite", "host": "/tmp/warehouse.db"}'``
or ``airflow connections add``; ``make demo`` and the tests create it. The Variable
``safeproc_gallery_min_total`` is optional (default 0).
"""

from __future__ import annotations

import sqlite3

import pendulum

try:
    from airflow.sdk import BaseHook, Variable, dag, task
except ImportError:  # Airflow 2
    from airflow.decorators import dag, task
    from airflow.hooks.base import BaseHook
    from airflow.models import Variable

CONN_ID = "safeproc_gallery_warehouse"
REGIONS = ["north", "south", "east", "west", "centre", "islands"]


class WarehouseHook(BaseHook):
    """What a provider's hook does: look its connection up by id, then connect with it."""

    def __init__(self, warehouse_conn_id: str = CONN_ID) -> None:
        super().__init__()
        self.connection = self.get_connection(warehouse_conn_id)  # asked of the task process in a worker

    def get_conn(self) -> sqlite3.Connection:
        return sqlite3.connect(self.connection.host, timeout=30)


def region_total(region: str) -> dict:
    """One item: a hook of its own, a Variable, a query."""
    min_total = float(Variable.get("safeproc_gallery_min_total", "0"))  # positional default: 2.x and 3.x
    with WarehouseHook().get_conn() as db:
        count, total = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(total), 0) FROM orders WHERE region = ? AND total >= ?",
            (region, min_total),
        ).fetchone()
    return {"region": region, "orders": count, "total": round(total, 2)}


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False, tags=["safeproc"])
def safeproc_hook_per_item():
    @task
    def fill_warehouse() -> list[str]:
        """Stands in for yesterday's load: 600 orders, 100 per region."""
        with WarehouseHook().get_conn() as db:
            db.execute("DROP TABLE IF EXISTS orders")
            db.execute("CREATE TABLE orders (region TEXT, total REAL)")
            db.executemany(
                "INSERT INTO orders VALUES (?, ?)",
                [(region, float(i)) for region in REGIONS for i in range(100)],
            )
        return REGIONS

    @task.parallel(max_workers=2)
    def per_region(region: str) -> dict:
        return region_total(region)

    @task
    def report(totals: list[dict]) -> dict:
        for row in totals:
            print(f"{row['region']:>8}: {row['orders']} orders, {row['total']}")
        return {"regions": len(totals), "orders": sum(row["orders"] for row in totals)}

    report(per_region(fill_warehouse()))


safeproc_hook_per_item()
