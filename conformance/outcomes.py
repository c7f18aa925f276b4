"""The words of a verdict that is not a plain pass or failure, shared by checks and reports.

- "not applicable": the check cannot exist on this device (a CUDA-only path on a CPU or a vendor's
  own accelerator, a budget for another hardware class): a skip whose reason starts with it, which
  the report counts as "not_applicable", apart from skips of checks that could run;
- "inconclusive": a statistical verdict (a speed budget) whose confidence interval still straddles
  its limit after the most rounds allowed: a skip (it never fails a run) with its own outcome.
"""

from __future__ import annotations

NOT_APPLICABLE = "not applicable"
PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"  # judge's three verdicts


def not_applicable(reason: str) -> str:
    return reason if reason.startswith(NOT_APPLICABLE) else f"{NOT_APPLICABLE}: {reason}"


def inconclusive(reason: str) -> str:
    return reason if reason.startswith(INCONCLUSIVE) else f"{INCONCLUSIVE}: {reason}"


def skip_outcome(reason: str) -> str:
    """The report's outcome of a skip: not_applicable, inconclusive or skipped, by its reason."""
    if reason.startswith(NOT_APPLICABLE):
        return "not_applicable"
    return INCONCLUSIVE if reason.startswith(INCONCLUSIVE) else "skipped"


def judge(interval: tuple[float, float], limit: float, at_least: bool = True) -> str:
    """A three-way verdict: pass when the interval lies wholly within the budget (>= limit for
    `at_least`, else <= limit), fail when wholly beyond it, inconclusive when it straddles."""
    lo, hi = interval
    if not at_least:
        lo, hi, limit = -hi, -lo, -limit
    if lo >= limit:
        return PASS
    if hi < limit:
        return FAIL
    return INCONCLUSIVE
