"""The quantization checks catch their planted faults (tests/faults_quant.py), and the healthy
twins pass the same run (the pattern of test_faults.py, with ``-p faults_quant``)."""

from __future__ import annotations

from typing import Any

import pytest
from faults import Fault
from faults_quant import QUANT_FAULTS

from conftest import assert_caught, control_unmet, run_fault


@pytest.mark.parametrize("fault", QUANT_FAULTS,
                         ids=[f"{f.variant.id}-{f.model}-{f.caught_by}" for f in QUANT_FAULTS])
def test_quant_fault_is_caught(pytester: pytest.Pytester, run_suite: Any, fault: Fault) -> None:
    reason = control_unmet(fault)
    if reason:
        pytest.skip(f"control {fault.control} cannot run here: {reason}")
    assert_caught(fault, run_fault(pytester, run_suite, "faults_quant", fault,
                                   target="conformance.suite.test_quantization"))


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
