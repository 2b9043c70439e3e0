"""A script's own functions, handed to a stdlib pool inside the fresh interpreter.

Run directly, ``python job.py`` can give its ``__main__`` functions to any stdlib pool: forked
workers inherit them and spawned ones run the script again as ``__mp_main__``. The same code
run through ``run_in_interpreter`` must work the same, and run the script's main block once.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from airflow_provider_safeproc import run_in_interpreter

    def square(x):
        return x * x

    def with_pools(method):
        context = multiprocessing.get_context(method)
        with context.Pool(2) as pool:
            by_pool = pool.map(square, range(4))
        with ProcessPoolExecutor(2, mp_context=context) as executor:
            by_executor = list(executor.map(square, range(4)))
        return by_pool, by_executor

    if __name__ == "__main__":
        print("main block ran", flush=True)
        for method in ("fork", "spawn", "forkserver"):
            print(method, run_in_interpreter(with_pools, method, timeout=120), flush=True)
    """
)


def test_main_functions_reach_stdlib_pools_of_every_start_method(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    squares = ([0, 1, 4, 9], [0, 1, 4, 9])
    assert done.stdout.splitlines() == [
        "main block ran",  # once: spawned workers run the script as __mp_main__, not __main__
        f"fork {squares}",
        f"spawn {squares}",
        f"forkserver {squares}",
    ]
