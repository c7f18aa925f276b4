"""Faults planted in the options users pass (faults_options.py) are caught by the option check
that draws them, the localization names the layer they sit in, and the same selection passes
without the fault."""

from __future__ import annotations

from typing import Any

import pytest
from faults_options import FAULTS, LAYER, OptionFault, unavailable

from conftest import DETECTIONS, results_of


def _run(pytester: pytest.Pytester, run_suite: Any, fault: OptionFault,
         planted: bool) -> list[dict[str, Any]]:
    args = ["-p", "faults_options", "--pyargs", "conformance", "-q", "-p", "no:randomly",
            "--model", fault.model, "--dtype", fault.dtype, "--variant", fault.variant,
            "--option", fault.option, "-k", f"test_{fault.check}"]
    if planted:
        args.append(f"--planted-option-fault={fault.name}")
    return results_of(pytester, run_suite, "planted" if planted else "healthy", *args)


@pytest.mark.parametrize("fault", FAULTS, ids=[f"{f.name}-{f.check}" for f in FAULTS])
def test_option_fault_is_caught_and_located(pytester: pytest.Pytester, run_suite: Any,
                                            fault: OptionFault) -> None:
    reason = unavailable(fault.name)
    if reason:
        pytest.skip(f"{fault.name}: {reason}")
    healthy = _run(pytester, run_suite, fault, planted=False)
    assert healthy and all(r["outcome"] == "passed" for r in healthy), (
        f"without the fault, {fault.check} on {fault.model}/{fault.variant} must pass: "
        f"{[(r.get('nodeid'), r['outcome'], r['reason'][:300]) for r in healthy]}")
    assert all(r["metrics"].get("option_examples", {}).get(fault.option) for r in healthy), healthy
    planted = _run(pytester, run_suite, fault, planted=True)
    failed = [r for r in planted if r["outcome"] == "failed" and r["check"] == fault.check]
    assert failed, (f"{fault.description}: expected {fault.check} to fail, got "
                    f"{[(r['outcome'], r['reason'][:300]) for r in planted]}")
    text = failed[0]["reason"]
    assert fault.message in text, text[:600]
    if fault.layer is not None:
        where = f"first divergence: layer {fault.layer} self_attn"
        assert where in text, text[:800]
        assert "layers 0 clean" in text, text[:800]
        assert fault.layer == LAYER
    DETECTIONS.append((fault.name, fault.check, "caught", text.split("\n")[0][:160]))
