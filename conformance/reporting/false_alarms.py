"""Count spurious failures over repeated runs of the unmodified variants (the false-alarm rate).

    python -m conformance.reporting.false_alarms reports/false-alarms/current \
        [--ledger docs/false-alarms/current.tsv]

Reads every `*/report.json` under the folder (one per run, each with its own Hypothesis seed)
and prints, per check, how many runs failed and which tests; exits 1 if any did.

A series of 20 nightly runs takes hours, longer than one working session, and `reports/` is not
committed. `--ledger` keeps one committed row per run (seed, commit, versions, counts, failures):
each report found is written into it (replacing the row of the same run), and the summary counts
every row of the ledger, so a series resumed in a fresh checkout adds up to the whole series.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

COLUMNS = ("run", "seed", "commit", "transformers", "passed", "xfailed", "minutes", "failures")


def _commit(directory: Path) -> str:
    """The commit of the checkout that wrote the report (its reports/ lives in that tree)."""
    done = subprocess.run(["git", "-C", str(directory), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() or "-"


def row_of(report: Path) -> dict[str, str]:
    """One ledger row for one run's report.json."""
    body: dict[str, Any] = json.loads(report.read_text())
    env = body.get("environment", {})
    results = body["results"]
    failed = sorted(r["nodeid"] for r in results if r["outcome"] in ("failed", "error"))
    minutes = (body.get("finished", 0.0) - body.get("started", 0.0)) / 60
    return {
        "run": report.parent.name,
        "seed": str(env.get("hypothesis", {}).get("seed")),
        "commit": _commit(report.parent),
        "transformers": str(env.get("versions", {}).get("transformers")),
        "passed": str(sum(r["outcome"] == "passed" for r in results)),
        "xfailed": str(sum(r["outcome"] == "xfailed" for r in results)),
        "minutes": f"{minutes:.1f}",
        "failures": " ".join(failed) or "-",
    }


def read_ledger(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def write_ledger(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (int(r["run"]) if r["run"].isdigit() else 1 << 30, r["run"]))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def summarize(rows: list[dict[str, str]]) -> tuple[str, int]:
    """The printed summary and the exit code (1 when any run failed a check)."""
    failures: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        for nodeid in row["failures"].split():
            if nodeid != "-":
                failures[nodeid].append(row["run"])
    lines = [f"{len(rows)} runs, {sum(int(r['passed']) for r in rows)} passing test executions, "
             f"{sum(len(v) for v in failures.values())} spurious failures"]
    lines += [f"  {nodeid}: failed in runs {', '.join(runs)}" for nodeid, runs in sorted(failures.items())]
    return "\n".join(lines), (1 if failures else 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.reporting.false_alarms",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", default="reports/false-alarms")
    parser.add_argument("--ledger", type=Path, help="a TSV of one row per run, kept across checkouts")
    args = parser.parse_args(argv)
    found = [row_of(report) for report in sorted(Path(args.folder).glob("*/report.json"))]
    rows = found
    if args.ledger is not None:
        kept = {row["run"]: row for row in read_ledger(args.ledger)}
        kept.update({row["run"]: row for row in found})
        rows = list(kept.values())
        if found:
            write_ledger(args.ledger, rows)
    if not rows:
        print(f"{args.folder}: no */report.json: nothing measured")
        return 2
    text, code = summarize(rows)
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
