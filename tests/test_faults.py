"""Each planted fault is caught by the check it names, and its healthy twin passes the same run."""

from __future__ import annotations

import json
from typing import Any

import pytest
from faults import FAULTS, Fault

from conftest import DETECTIONS


def _run(pytester: pytest.Pytester, run_suite: Any, fault: Fault) -> dict[str, dict]:
    out = pytester.path / "report"
    run_suite(
        "-p", "faults", "--pyargs", "conformance", "-q",
        "--model", fault.model, "--dtype", fault.dtype,
        "--variant", fault.variant.id, "--variant", fault.control,
        "-k", f"{fault.caught_by} and {fault.padding}", "--conformance-report", str(out),
    )
    results = json.loads((out / "report.json").read_text())["results"]
    return {r["variant"]: r for r in results}


@pytest.mark.parametrize("fault", FAULTS, ids=[f.variant.id for f in FAULTS])
def test_fault_is_caught(pytester: pytest.Pytester, run_suite: Any, fault: Fault) -> None:
    by_variant = _run(pytester, run_suite, fault)
    control, planted = by_variant.get(fault.control), by_variant.get(fault.variant.id)
    assert control is not None and planted is not None, f"run selected nothing: {by_variant}"
    if control["outcome"] == "skipped":
        pytest.skip(f"control {fault.control} cannot run here: {control['reason']}")
    assert control["outcome"] == "passed", (
        f"healthy twin {fault.control} must pass the same selection: {control['reason']}")
    assert planted["outcome"] == "failed", (
        f"{fault.description}: expected check {fault.caught_by} to fail, got {planted['outcome']}")
    assert planted["check"] == fault.caught_by
    assert fault.message in planted["reason"], planted["reason"]
    figure = planted["reason"].split(": ", 1)[-1][:110]
    DETECTIONS.append((fault.variant.id, planted["check"], "caught", figure))
