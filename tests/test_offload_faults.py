"""Each planted placement fault is caught by the check it names; the healthy control in the same
run passes (offload faults: the plain "eager" path; planner faults: the other model)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from faults_offload import FAULTS, PlacementFault

from conftest import DETECTIONS


def _run(pytester: pytest.Pytester, run_suite: Any, fault: PlacementFault) -> list[dict[str, Any]]:
    out = pytester.path / "report"
    args = ["-p", "faults_offload", "--pyargs", "conformance", "-q", "--dtype", "fp32",
            "-k", fault.select, "--conformance-report", str(out)]
    for model in fault.models:
        args += ["--model", model]
    if fault.variant is not None:
        args += ["--variant", fault.variant.id, "--variant", "eager"]
    else:
        args += ["--variant", "eager", "--planted-planner-fault", str(fault.planner)]
    run_suite(*args)
    return json.loads((out / "report.json").read_text())["results"]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_placement_fault_is_caught(pytester: pytest.Pytester, run_suite: Any,
                                   fault: PlacementFault) -> None:
    results = _run(pytester, run_suite, fault)
    if fault.variant is not None:
        planted = [r for r in results if r["variant"] == fault.variant.id]
        control = [r for r in results if r["variant"] == "eager"]
    else:
        planted = [r for r in results if r["model"] == fault.models[0]]
        control = [r for r in results if r["model"] != fault.models[0]]
    assert planted and control, f"run selected nothing: {results}"
    for record in control:
        if record["outcome"] != "passed":
            pytest.skip(f"control {record['nodeid']} does not pass here ({record['outcome']}: "
                        f"{record['reason'][:160]}): the fault cannot be told apart")
    for record in planted:
        assert record["outcome"] == "failed", (
            f"{fault.description}: expected {fault.caught_by} to fail, got {record['outcome']}")
        assert record["check"] == fault.caught_by
        assert fault.message in record["reason"], record["reason"]
        assert "\n" not in record["reason"].strip(), f"not one line: {record['reason']!r}"
    figure = planted[0]["reason"].split(": ", 2)[-1][:110]
    DETECTIONS.append((fault.id, planted[0]["check"], "caught", figure))
