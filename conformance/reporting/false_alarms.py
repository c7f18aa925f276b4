"""Count spurious failures over repeated runs of the unmodified variants (the false-alarm rate).

    python -m conformance.reporting.false_alarms reports/false-alarms/current

Reads every `*/report.json` under the folder (one per run, each with its own Hypothesis seed)
and prints, per check, how many runs failed and which tests; exits 1 if any did.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def main(folder: str) -> int:
    reports = sorted(Path(folder).glob("*/report.json"))
    if not reports:
        print(f"{folder}: no */report.json: nothing measured")
        return 2
    failures: dict[str, list[str]] = defaultdict(list)
    cases = 0
    for report in reports:
        results = json.loads(report.read_text())["results"]
        cases += sum(r["outcome"] == "passed" for r in results)
        for r in results:
            if r["outcome"] in ("failed", "error"):
                failures[r["nodeid"]].append(report.parent.name)
    print(f"{len(reports)} runs, {cases} passing test executions, "
          f"{sum(len(v) for v in failures.values())} spurious failures")
    for nodeid, runs in sorted(failures.items()):
        print(f"  {nodeid}: failed in runs {', '.join(runs)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "reports/false-alarms"))
