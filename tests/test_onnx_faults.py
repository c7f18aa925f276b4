"""The ONNX Runtime and torch.compile planted faults are caught by the checks they name, and their
healthy twins pass the same run (the pattern of test_faults.py, with ``-p faults_onnx``).

A fault whose healthy twin cannot run on this stack (ONNX Runtime needs the legacy stack;
torch.compile is opt-in, CONFORMANCE_COMPILE=1) is skipped before a subprocess is spent on it.
"""

from __future__ import annotations

from typing import Any

import pytest
from faults import Fault
from faults_onnx import COMPILE_FAULTS, ONNX_FAULTS

from conftest import DETECTIONS, run_fault

FAULTS = ONNX_FAULTS + COMPILE_FAULTS


def _unmet(fault: Fault) -> str | None:
    """Why the healthy twin cannot run here, or None (asked without starting a subprocess)."""
    from conformance.environment import probe
    from conformance.variants import REGISTRY

    return REGISTRY[fault.control].needs.unmet(probe("cpu"), fault.dtype)


@pytest.mark.parametrize("fault", FAULTS, ids=[f"{f.variant.id}-{f.model}-{f.caught_by}" for f in FAULTS])
def test_onnx_fault_is_caught(pytester: pytest.Pytester, run_suite: Any, fault: Fault) -> None:
    reason = _unmet(fault)
    if reason:
        pytest.skip(f"control {fault.control} cannot run here: {reason}")
    by_variant = run_fault(pytester, run_suite, "faults_onnx", fault)
    control, planted = by_variant.get(fault.control), by_variant.get(fault.variant.id)
    assert control is not None and planted is not None, f"run selected nothing: {by_variant}"
    assert control["outcome"] == "passed", (
        f"healthy twin {fault.control} must pass the same selection: {control['reason']}")
    assert planted["outcome"] == "failed", (
        f"{fault.description}: expected check {fault.caught_by} to fail, got {planted['outcome']}")
    assert planted["check"] == fault.caught_by
    assert fault.message in planted["reason"], planted["reason"]
    figure = planted["reason"].split(": ", 1)[-1][:110]
    DETECTIONS.append((fault.variant.id, planted["check"], "caught", figure))
