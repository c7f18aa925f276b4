"""Faults planted in transformers' own integration code (faults_integration.py) are caught by the
check each names, and the same selection passes without the fault."""

from __future__ import annotations

from typing import Any

import pytest
from faults_integration import FAULTS, IntegrationFault, unavailable

from conftest import DETECTIONS, results_of


def _run(pytester: pytest.Pytester, run_suite: Any, fault: IntegrationFault,
         planted: bool) -> list[dict[str, Any]]:
    selection = f"test_{fault.check} and {fault.selection}" if fault.selection else f"test_{fault.check}"
    args = ["-p", "faults_integration", "--pyargs", "conformance", "-q", "-p", "no:randomly",
            "--model", fault.model, "--dtype", fault.dtype, "--variant", fault.variant, "-k", selection]
    if planted:
        args.append(f"--planted-integration-fault={fault.name}")
    return results_of(pytester, run_suite, "planted" if planted else "healthy", *args)


@pytest.mark.parametrize("fault", FAULTS, ids=[f"{f.name}-{f.check}" for f in FAULTS])
def test_integration_fault_is_caught(pytester: pytest.Pytester, run_suite: Any,
                                     fault: IntegrationFault) -> None:
    reason = unavailable(fault.name)
    if reason:
        pytest.skip(f"{fault.name}: {reason}")
    healthy = _run(pytester, run_suite, fault, planted=False)
    assert healthy and all(r["outcome"] == "passed" for r in healthy), (
        f"without the fault, {fault.check} on {fault.model}/{fault.variant} must pass: "
        f"{[(r.get('nodeid'), r['outcome'], r['reason'][:200]) for r in healthy]}")
    planted = _run(pytester, run_suite, fault, planted=True)
    failed = [r for r in planted if r["outcome"] == "failed" and r["check"] == fault.check]
    assert failed, (f"{fault.description}: expected {fault.check} to fail, got "
                    f"{[(r['outcome'], r['reason'][:200]) for r in planted]}")
    assert any(fault.message in r["reason"] for r in failed), [r["reason"] for r in failed]
    figure = next(r["reason"] for r in failed if fault.message in r["reason"])
    DETECTIONS.append((f"integration:{fault.name}", fault.check, "caught",
                       figure.split(": ", 1)[-1][:110]))
