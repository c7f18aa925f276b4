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
        "-k", f"{fault.caught_by} and {fault.padding}" if fault.padding else fault.caught_by,
        "--conformance-report", str(out),
    )
    results = json.loads((out / "report.json").read_text())["results"]
    by_variant: dict[str, dict] = {}
    for record in results:  # several records per variant (e.g. paddings): the worst outcome decides
        kept = by_variant.get(record["variant"])
        if kept is None or RANK[record["outcome"]] > RANK[kept["outcome"]]:
            by_variant[record["variant"]] = record
    return by_variant


RANK = {"passed": 0, "xfailed": 0, "skipped": 1, "not_applicable": 1, "xpassed": 2, "failed": 3,
        "error": 3}


@pytest.mark.parametrize("fault", FAULTS, ids=[f"{f.variant.id}-{f.caught_by}" for f in FAULTS])
def test_fault_is_caught(pytester: pytest.Pytester, run_suite: Any, fault: Fault) -> None:
    by_variant = _run(pytester, run_suite, fault)
    control, planted = by_variant.get(fault.control), by_variant.get(fault.variant.id)
    assert control is not None and planted is not None, f"run selected nothing: {by_variant}"
    if control["outcome"] in ("skipped", "not_applicable"):
        pytest.skip(f"control {fault.control} cannot run here: {control['reason']}")
    assert control["outcome"] == "passed", (
        f"healthy twin {fault.control} must pass the same selection: {control['reason']}")
    assert planted["outcome"] == "failed", (
        f"{fault.description}: expected check {fault.caught_by} to fail, got {planted['outcome']}")
    assert planted["check"] == fault.caught_by
    assert fault.message in planted["reason"], planted["reason"]
    figure = planted["reason"].split(": ", 1)[-1][:110]
    DETECTIONS.append((fault.variant.id, planted["check"], "caught", figure))


def test_fa2_served_silently_by_sdpa_is_caught(pytester: pytest.Pytester, run_suite: Any) -> None:
    """C02: with the planted FA2 spelling registered, the refusal check fails naming it; the
    healthy registry passes the same selection (the first run)."""
    args = ("--pyargs", "conformance", "-q", "--model", "llama", "--dtype", "fp32",
            "--variant", "eager", "-k", "fa2_refuses")
    healthy = run_suite(*args)
    healthy.assert_outcomes(passed=1)
    planted = run_suite("-p", "faults", *args)
    planted.assert_outcomes(failed=1)
    text = planted.stdout.str()
    assert "fault_fa2_served_by_sdpa: asked for flash_attention_2" in text and "'sdpa'" in text
    DETECTIONS.append(("fault_fa2_served_by_sdpa", "fa2_refuses_what_it_cannot_run", "caught",
                       "asked for flash_attention_2 in fp32 on cpu, got a model silently running 'sdpa'"))
