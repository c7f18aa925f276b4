"""Release gating: compare this run's report.json with a previous one (``--baseline``).

A regression fails the run (exit code 1) and is named in a printed table and in report.json
under ``"gating"``:
- a check that passed now fails (or errors, or is newly listed as an expected failure);
- an error figure (``err_over_bound``, ``max_abs_err``, ``rel_l2_err``) grew beyond its noise band;
- a speed ratio fell, or a memory ratio or footprint rose, beyond the harness's measured noise.

The bands are in ``conformance/tolerances.py`` (GATING), each with how it was measured.
Figures from Hypothesis-driven checks are compared only when both runs drew the same examples
(derandomized, same number of examples: the ``ci`` profile); otherwise the comparison says so.
A check that passed and is now skipped, or that did not run at all, is listed as a warning: the
candidate lost coverage, which a release manager must see but which is not a wrong answer.

Inconclusive is its own verdict, as in the budget checks (conformance/measure/bench.py): a speed ratio
below its gating limit is a regression only when the median's confidence interval lies wholly
below the limit; when the interval straddles it the row is "inconclusive", and so is a check
that passed and is now inconclusive. Neither counts as a regression nor fails the run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from conformance import tolerances
from conformance.outcomes import judge

ERROR_FIGURES = ("err_over_bound", "max_abs_err", "rel_l2_err")
BAD = ("failed", "error", "xfailed")
JUDGED = ("passed", "inconclusive")  # outcomes whose figures were measured in full


class BaselineError(Exception):
    """An unreadable baseline: the message is one line."""


@dataclass
class Row:
    check: str  # node id
    what: str  # "outcome", a figure name, "speed_ratio @ seq 1024"
    baseline: Any
    current: Any
    band: str
    verdict: str  # "regression" | "inconclusive" | "warning" | "improved" | "ok"
    note: str = ""


def load_baseline(path: str) -> dict[str, Any]:
    file = Path(path)
    if file.is_dir():
        file = file / "report.json"
    if not file.is_file():
        raise BaselineError(f"--baseline {path}: no report.json there")
    try:
        body = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BaselineError(f"--baseline {path}: not a report.json ({exc})") from None
    if not isinstance(body, dict) or not isinstance(body.get("results"), list):
        raise BaselineError(f"--baseline {path}: not a report.json (no 'results' list)")
    body["_path"] = str(file)
    return body


def same_draws(baseline: dict[str, Any], current: dict[str, Any]) -> tuple[bool, str]:
    """Whether Hypothesis drew the same examples in both runs (derandomized, same count)."""
    old = (baseline.get("environment") or {}).get("hypothesis") or {}
    new = (current.get("environment") or {}).get("hypothesis") or {}
    if not (old.get("derandomize") and new.get("derandomize")):
        return False, ("error figures not compared: a run was not derandomized (run both with "
                       "--hypothesis-profile ci)")
    if old.get("max_examples") != new.get("max_examples"):
        return False, (f"error figures not compared: {old.get('max_examples')} vs "
                       f"{new.get('max_examples')} examples")
    return True, ""


def same_stack(baseline: dict[str, Any], current: dict[str, Any]) -> bool:
    old, new = baseline.get("environment") or {}, current.get("environment") or {}
    return old.get("versions") == new.get("versions") and old.get("device_name") == new.get(
        "device_name")


def compare(baseline: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The gating section of report.json: every compared figure, and the regressions."""
    old = {r["nodeid"]: r for r in baseline.get("results", [])}
    new = {r["nodeid"]: r for r in current.get("results", [])}
    draws, why_not = same_draws(baseline, current)
    stack = same_stack(baseline, current)
    figure_band = tolerances.GATING["error_same_stack" if stack else "error_other_stack"]
    rows: list[Row] = []
    for nodeid, now in new.items():
        was = old.get(nodeid)
        if was is None:
            continue
        rows.extend(_outcome_rows(nodeid, was, now))
        if was["outcome"] == "passed" and now["outcome"] == "passed" and draws:
            rows.extend(_figure_rows(nodeid, was["metrics"], now["metrics"], figure_band))
        if was["outcome"] in JUDGED and now["outcome"] in JUDGED:
            rows.extend(_budget_rows(nodeid, was["metrics"], now["metrics"]))
    for nodeid, was in old.items():
        if nodeid not in new and was["outcome"] == "passed":
            rows.append(Row(nodeid, "outcome", "passed", "not run", "-", "warning",
                            "the check did not run in this run"))
    notes = [why_not] if why_not else []
    if not stack:
        notes.append("stacks differ (versions or device): error figures get the cross-stack band")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.verdict] = counts.get(row.verdict, 0) + 1
    return {
        "baseline": baseline.get("_path"),
        "same_stack": stack,
        "figures_compared": draws,
        "error_band": figure_band,
        "compared_checks": len(set(old) & set(new)),
        "counts": counts,
        "regressions": counts.get("regression", 0),
        "inconclusive": counts.get("inconclusive", 0),
        "notes": notes,
        "rows": [asdict(r) for r in rows if r.verdict != "ok"],
        "ok_rows": sum(1 for r in rows if r.verdict == "ok"),
    }


def _outcome_rows(nodeid: str, was: dict[str, Any], now: dict[str, Any]) -> list[Row]:
    before, after = was["outcome"], now["outcome"]
    if before == after:
        return [Row(nodeid, "outcome", before, after, "-", "ok")]
    if before in JUDGED and after in BAD:
        return [Row(nodeid, "outcome", before, after, "-", "regression", now.get("reason", "")[:300])]
    if after == "inconclusive":
        return [Row(nodeid, "outcome", before, after, "-", "inconclusive" if before == "passed"
                    else "ok", now.get("reason", "")[:300])]
    if before == "passed":
        return [Row(nodeid, "outcome", before, after, "-", "warning", now.get("reason", "")[:300])]
    if after == "passed":
        return [Row(nodeid, "outcome", before, after, "-", "improved")]
    return [Row(nodeid, "outcome", before, after, "-", "ok")]


def _figure_rows(nodeid: str, was: dict[str, Any], now: dict[str, Any],
                 band: dict[str, float]) -> list[Row]:
    rows = []
    for name in ERROR_FIGURES:
        a, b = was.get(name), now.get(name)
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            continue
        extra = band["abs"] if name == "err_over_bound" else 0.0  # in units of the bound
        limit = a * (1 + band["rel"]) + extra
        text = f"<= {limit:.4g}" + (f" (+{band['rel']:.0%}{f', +{extra:g}' if extra else ''})"
                                    if limit != a else " (exact)")
        verdict = "regression" if b > limit else ("improved" if b < a else "ok")
        rows.append(Row(nodeid, name, a, b, text, verdict))
    return rows


def _budget_rows(nodeid: str, was: dict[str, Any], now: dict[str, Any]) -> list[Row]:
    rows = []
    gate = tolerances.GATING
    old_points = {p["seq"]: p for p in was.get("sweep", [])}
    judged_from = now.get("from_seq", 0)
    for point in now.get("sweep", []):
        prior = old_points.get(point["seq"])
        if prior is None or point["seq"] < judged_from:  # shorter lengths are plotted, not judged
            continue
        noise = max(prior.get("speed_noise", 0.0), point.get("speed_noise", 0.0))
        speed = gate["speed"]
        band = min(speed["cap"], max(speed["floor"], speed["k"] * noise))
        limit = prior["speed_ratio"] * (1 - band)
        ratio = point["speed_ratio"]
        interval = (point.get("speed_ratio_lo", ratio), point.get("speed_ratio_hi", ratio))
        verdict = {"fail": "regression", "inconclusive": "inconclusive"}.get(
            judge(interval, limit), "improved" if ratio > prior["speed_ratio"] * (1 + band) else "ok")
        note = f"interval [{interval[0]:.3g}, {interval[1]:.3g}]" if interval != (ratio, ratio) else ""
        rows.append(Row(nodeid, f"speed_ratio @ seq {point['seq']}", prior["speed_ratio"], ratio,
                        f">= {limit:.3g} (-{band:.0%}: noise {noise:.1%})", verdict, note))
        rows.append(_rising(nodeid, f"memory_ratio @ seq {point['seq']}", prior["memory_ratio"],
                            point["memory_ratio"], gate["memory"]["rel"]))
    for name in ("memory_exponent", "footprint_ratio", "footprint_over_bound"):
        if isinstance(was.get(name), (int, float)) and isinstance(now.get(name), (int, float)):
            rows.append(_rising(nodeid, name, was[name], now[name], gate["memory"]["rel"]))
    return rows


def _rising(nodeid: str, name: str, before: float, after: float, rel: float) -> Row:
    limit = before * (1 + rel)
    verdict = "regression" if after > limit else ("improved" if after < before * (1 - rel) else "ok")
    return Row(nodeid, name, before, after, f"<= {limit:.4g} (+{rel:.0%})", verdict)


def table_lines(gating: dict[str, Any], width: int = 200) -> list[str]:
    """The comparison as a table (rich when installed, plain text otherwise)."""
    rows = gating["rows"]
    title = (f"release gating against {gating['baseline']}: {gating['regressions']} regression(s), "
             f"{gating.get('inconclusive', 0)} inconclusive, "
             f"{gating['compared_checks']} checks compared, {gating['ok_rows']} figures unchanged")
    cells = [(r["check"], r["what"], _fmt(r["baseline"]), _fmt(r["current"]), r["band"],
              r["verdict"].upper() if r["verdict"] == "regression" else r["verdict"],
              r["note"][:120]) for r in rows]
    head = ("check", "what", "baseline", "current", "band", "verdict", "note")
    if not rows:
        return [title, *(f"gating note: {n}" for n in gating["notes"])]
    try:
        import io

        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        lines = [title, " | ".join(head)]
        lines += [" | ".join(c) for c in cells]
    else:
        table = Table(title=escape(title), show_lines=False)
        for column in head:
            table.add_column(column, overflow="fold")
        for c in cells:  # node ids hold [brackets]: escape them, or rich reads them as markup
            table.add_row(*map(escape, c), style="red" if c[5] == "REGRESSION" else None)
        buffer = io.StringIO()
        Console(file=buffer, width=width, force_terminal=False).print(table)
        lines = buffer.getvalue().rstrip("\n").splitlines()
    return lines + [f"gating note: {n}" for n in gating["notes"]]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
