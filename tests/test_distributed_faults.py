"""Planted faults in sharded execution (faults_distributed.py) are caught by the check each names,
the healthy tp2 passes the same selection, and a crashed or hung rank is one failure line naming
the rank and the cause."""

from __future__ import annotations

from typing import Any

import pytest
from faults_distributed import FAULTS, LAUNCH_FAULTS, DistFault

from conftest import DETECTIONS, results_of


def _distributed_unmet() -> str | None:
    """The distributed variants' own needs on this stack (the legacy stack has no tp_plan)."""
    from conformance.environment import probe
    from conformance.variants import REGISTRY

    return REGISTRY["tp2"].needs.unmet(probe("cpu"), "fp32")


@pytest.fixture(autouse=True)
def _needs_the_engine() -> None:
    reason = _distributed_unmet()
    if reason:
        pytest.skip(f"tp2 does not run on this stack: {reason}")


def _run(pytester: pytest.Pytester, run_suite: Any, variant: str, check: str, name: str,
         selection: str = "") -> list[dict[str, Any]]:
    keyword = f"test_{check} and {selection}" if selection else f"test_{check}"
    return results_of(pytester, run_suite, name, "-p", "faults_distributed", "--pyargs",
                      "conformance.suite.test_distributed", "-q", "-p", "no:randomly", "--model",
                      "llama", "--dtype", "fp32", "--variant", variant, "-k", keyword)


def _caught(results: list[dict[str, Any]], fault: DistFault) -> str:
    failed = [r for r in results if r["outcome"] == "failed" and r["check"] == fault.check]
    assert failed, f"{fault.description}: expected {fault.check} to fail, got " \
                   f"{[(r['outcome'], r['reason'][:200]) for r in results]}"
    hit = [r["reason"] for r in failed if fault.message in r["reason"]]
    assert hit, [r["reason"] for r in failed]
    return hit[0]


_ONE_LAUNCH: dict[str, list[dict[str, Any]]] = {}


def _one_launch(pytester: pytest.Pytester, run_suite: Any) -> list[dict[str, Any]]:
    """The healthy tp2 and every planted fault in one run: one launch of the ranks (each fault
    touches only its own model), made once per self-test process."""
    if "results" not in _ONE_LAUNCH:
        variants = [arg for fault in FAULTS for arg in ("--variant", fault.name)]
        checks = " or ".join(sorted({f"test_{fault.check}" for fault in FAULTS}))
        _ONE_LAUNCH["results"] = results_of(
            pytester, run_suite, "one-launch", "-p", "faults_distributed", "--pyargs",
            "conformance.suite.test_distributed", "-q", "-p", "no:randomly", "--model", "llama",
            "--dtype", "fp32", "--variant", "tp2", *variants, "-k", checks)
    return _ONE_LAUNCH["results"]


def _of(results: list[dict[str, Any]], variant: str, fault: DistFault) -> list[dict[str, Any]]:
    return [r for r in results if r["variant"] == variant and r["check"] == fault.check
            and (not fault.selection or fault.selection in r["nodeid"])]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_distributed_fault_is_caught(pytester: pytest.Pytester, run_suite: Any, fault: DistFault) -> None:
    results = _one_launch(pytester, run_suite)
    healthy = _of(results, "tp2", fault)
    assert healthy and all(r["outcome"] == "passed" for r in healthy), healthy
    figure = _caught(_of(results, fault.name, fault), fault)
    DETECTIONS.append((f"distributed:{fault.name}", fault.check, "caught", figure.split(": ", 1)[-1][:110]))


@pytest.mark.parametrize("fault", LAUNCH_FAULTS, ids=[f.name for f in LAUNCH_FAULTS])
def test_failed_rank_is_one_line(pytester: pytest.Pytester, run_suite: Any, monkeypatch: pytest.MonkeyPatch,
                                 fault: DistFault) -> None:
    monkeypatch.setenv("CONFORMANCE_DIST_TIMEOUT", "25")
    results = _run(pytester, run_suite, fault.name, fault.check, "planted")
    reason = _caught(results, fault)
    assert "\n" not in reason.strip() and "rank 1" in reason, reason
