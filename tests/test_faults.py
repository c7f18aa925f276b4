"""Each planted fault is caught by the check it names, and its healthy twin passes the same run."""

from __future__ import annotations

from typing import Any

import pytest
from faults import FAULTS, Fault

from conftest import DETECTIONS, assert_caught, run_fault


@pytest.mark.parametrize("fault", FAULTS, ids=[f"{f.variant.id}-{f.caught_by}" for f in FAULTS])
def test_fault_is_caught(pytester: pytest.Pytester, run_suite: Any, fault: Fault) -> None:
    assert_caught(fault, run_fault(pytester, run_suite, "faults", fault))


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
