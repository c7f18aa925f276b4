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

from conftest import assert_caught, control_unmet, run_fault

FAULTS = ONNX_FAULTS + COMPILE_FAULTS


@pytest.mark.parametrize("fault", FAULTS, ids=[f"{f.variant.id}-{f.model}-{f.caught_by}" for f in FAULTS])
def test_onnx_fault_is_caught(pytester: pytest.Pytester, run_suite: Any, fault: Fault) -> None:
    reason = control_unmet(fault)
    if reason:
        pytest.skip(f"control {fault.control} cannot run here: {reason}")
    assert_caught(fault, run_fault(pytester, run_suite, "faults_onnx", fault))
