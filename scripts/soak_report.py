"""Summarise a containment soak run: ``python scripts/soak_report.py .soak/report.jsonl``.

One row per case (subject, kill, containment level): runs, runs with survivors, and the time
from the kill (or the item timeout) to zero processes: median, 95th percentile, max.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def main(path: str) -> None:
    rows: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    try:
        with open(path) as f:
            for line in f:
                run = json.loads(line)
                rows[(run["kind"], run["case"], run["level"])].append(run)
    except FileNotFoundError:
        print(f"no runs recorded in {path}")
        return
    print(
        f"{'subject':<18} {'kill':<8} {'level':<8} {'runs':>5} {'leaky':>6} {'median':>8} {'p95':>8} {'max':>8}"
    )
    for (kind, case, level), runs in sorted(rows.items()):
        times = sorted(r["seconds"] for r in runs)
        p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
        leaky = sum(1 for r in runs if r["survivors"])
        print(
            f"{kind:<18} {case:<8} {level:<8} {len(runs):>5} {leaky:>6} "
            f"{statistics.median(times) * 1000:>6.0f}ms {p95 * 1000:>6.0f}ms {times[-1] * 1000:>6.0f}ms"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".soak/report.jsonl")
