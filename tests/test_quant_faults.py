"""The quantization checks catch their planted faults (tests/faults_quant.py), and the healthy
twins pass the same run (the pattern of test_faults.py, with ``-p faults_quant``)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from faults import Fault
from faults_quant import QUANT_FAULTS

from conftest import DETECTIONS


def _unmet(fault: Fault) -> str | None:
    """Why the healthy twin cannot run here, or None (asked without starting a subprocess)."""
    from conformance import zoo
    from conformance.environment import probe
    from conformance.variants import REGISTRY

    if fault.model not in {m.name for m in zoo.default_zoo()}:
        return f"model {fault.model} is not installed"
    return REGISTRY[fault.control].needs.unmet(probe("cpu"), fault.dtype)


@pytest.mark.parametrize("fault", QUANT_FAULTS,
                         ids=[f"{f.variant.id}-{f.model}-{f.caught_by}" for f in QUANT_FAULTS])
def test_quant_fault_is_caught(pytester: pytest.Pytester, run_suite: Any, fault: Fault) -> None:
    reason = _unmet(fault)
    if reason:
        pytest.skip(f"control {fault.control} cannot run here: {reason}")
    out = pytester.path / "report"
    run_suite("-p", "faults_quant", "--pyargs", "conformance.suite.test_quantization", "-q",
              "--model", fault.model, "--dtype", fault.dtype,
              "--variant", fault.variant.id, "--variant", fault.control,
              "-k", f"test_{fault.caught_by}", "--conformance-report", str(out))
    results = json.loads((out / "report.json").read_text())["results"]
    by_variant = {r["variant"]: r for r in results if r["check"] == fault.caught_by}
    control, planted = by_variant.get(fault.control), by_variant.get(fault.variant.id)
    assert control is not None and planted is not None, f"run selected nothing: {results}"
    assert control["outcome"] == "passed", (
        f"healthy twin {fault.control} must pass the same selection: {control['reason']}")
    assert planted["outcome"] == "failed", (
        f"{fault.description}: expected check {fault.caught_by} to fail, got {planted['outcome']}")
    assert fault.message in planted["reason"], planted["reason"]
    DETECTIONS.append((fault.variant.id, planted["check"], "caught",
                       planted["reason"].split(": ", 1)[-1][:110]))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("shape", [(64, 64), (344, 128), (7, 33)], ids=lambda s: "x".join(map(str, s)))
def test_state_bytes_match_bitsandbytes(shape: tuple[int, int], double_quant: bool) -> None:
    """The footprint's 4-bit state formula against bitsandbytes' own quantizer, including
    shapes whose size is no multiple of the block (the zoo only has multiples of 64)."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    from conformance.footprint import Scheme, state_bytes

    weight = torch.randn(shape)
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
                                                 quant_type="nf4")
    tensors = [state.absmax, state.code]
    if double_quant:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    measured = sum(t.numel() * t.element_size() for t in tensors)
    assert packed.numel() * packed.element_size() == -(-weight.numel() // 2)
    assert measured == state_bytes(weight.numel(), shape[0], Scheme(4, double_quant=double_quant))
