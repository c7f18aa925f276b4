"""report.json: one record per test, grouped later by claim; the base of every human report.

Outcomes: pytest's (passed, failed, error, skipped, xfailed, xpassed), plus two kinds of skip the
report counts apart:
- ``not_applicable``: the check cannot exist on this device (reason prefix "not applicable");
- ``inconclusive``: a statistical verdict (a speed budget) whose confidence interval still
  straddles its limit after the most rounds allowed. The check calls ``pytest.skip`` with a reason
  starting "inconclusive:" (``inconclusive(...)``), because a skip is the one pytest outcome that
  is neither a pass nor a failure and never fails the run (so ``.ci/run`` does not fail on it);
  the plugin gives it its own terminal category (``pytest_report_teststatus``: "N inconclusive"
  in the summary line, not counted as passed or skipped) and this module its own outcome.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1



@dataclass
class Record:
    nodeid: str
    check: str
    claims: list[str]
    model: str | None
    variant: str | None
    dtype: str | None
    padding: str | None
    outcome: str = "passed"
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Report:
    environment: dict[str, Any]
    records: dict[str, Record] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    gating: dict[str, Any] | None = None  # --baseline: the comparison with a previous report

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "report.json"
        body = {
            "schema_version": SCHEMA_VERSION,
            "environment": self.environment,
            "started": self.started,
            "finished": time.time(),
            "summary": self.summary(),
            "results": [r.as_json() for r in self.records.values()],
        }
        if self.gating is not None:
            body["gating"] = self.gating
        path.write_text(json.dumps(body, indent=1, default=_jsonable, allow_nan=True) + "\n")
        return path

    def summary(self) -> dict[str, Any]:
        by_claim: dict[str, dict[str, int]] = {}
        for record in self.records.values():
            for claim in record.claims or ["-"]:
                counts = by_claim.setdefault(claim, {})
                counts[record.outcome] = counts.get(record.outcome, 0) + 1
        outcomes: dict[str, int] = {}
        for record in self.records.values():
            outcomes[record.outcome] = outcomes.get(record.outcome, 0) + 1
        from conformance.timing import totals

        spent = totals([r.as_json() for r in self.records.values()])
        return {"by_claim": dict(sorted(by_claim.items())), "outcomes": dict(sorted(outcomes.items())),
                "time_split_s": spent["time_split_s"], "counts": spent["counts"],
                "most_reloaded": spent["most_reloaded"], "golden": spent["golden"]}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
