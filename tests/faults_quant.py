"""Planted quantization faults (C10, C11), registered only for the self-tests (``-p faults_quant``).
Same catalogue format as tests/faults.py: each names the check that must catch it, the message
that check must give, and its healthy twin (which must pass the same selection).
"""

from __future__ import annotations

from typing import Any

import pytest
from faults import Fault, _fault

from conformance.footprint import quantized_layers
from conformance.variants import REGISTRY


def _largest_quantized(model: Any) -> str:
    """The quantized layer with the most weights (the first among equals)."""
    return max(quantized_layers(model), key=lambda n: model.get_submodule(n).weight.numel())


def _absmax_doubled(model: Any) -> Any:
    """One 4-bit layer's absmax scales twice what they should be (a wrong scale written at load)."""
    model.get_submodule(_largest_quantized(model)).weight.quant_state.absmax.mul_(2.0)
    return model


def _one_layer_left_full(model: Any) -> Any:
    """One Linear8bitLt swapped back for a plain nn.Linear holding its dequantized weights, in
    the run dtype: answers stay close, the layer silently keeps its full-precision bytes."""
    import torch

    name = _largest_quantized(model)
    layer = model.get_submodule(name)
    weight = layer.weight
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            dtype=dtype, device=weight.device)
    with torch.no_grad():
        plain.weight.copy_(weight.data.float() * weight.SCB.float()[:, None] / 127.0)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, plain)
    return model


def _compute_dtype_replaced(model: Any) -> Any:
    """bnb_4bit_compute_dtype (bfloat16, the run dtype here) silently replaced by float32 in every
    Linear4bit. (The twin was bnb_nf4_c32 at bf16, float32 replaced by the run dtype; on a CPU
    with AVX512-BF16 that twin fails itself: bitsandbytes computes in bfloat16 there, see
    fixtures/expectations/current-cpu.txt.)"""
    import torch

    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.compute_dtype = torch.float32
    return model


QUANT_FAULTS: list[Fault] = [
    Fault(_fault("bnb_nf4", "fault_absmax_doubled", post_load=_absmax_doubled),
          "bnb_nf4", "minilm", "fp32", "", "quantized_quality", "quality out of bounds",
          "the absmax of one 4-bit layer (MiniLM's largest, layer 0's MLP) is twice its value"),
    Fault(_fault("bnb_nf4", "fault_absmax_doubled_decoder", post_load=_absmax_doubled),
          "bnb_nf4", "tiny-llama-trained", "fp32", "", "quantized_quality", "quality out of bounds",
          "the absmax of one 4-bit layer of the trained decoder (layer 0's MLP gate) is twice its value"),
    Fault(_fault("bnb_int8", "fault_layer_left_full_precision", post_load=_one_layer_left_full),
          "bnb_int8", "llama", "fp32", "", "quantized_footprint", "layers left in full precision",
          "one int8 layer silently stays an fp32 nn.Linear (dequantized weights)"),
    Fault(_fault("bnb_nf4", "fault_compute_dtype_replaced", post_load=_compute_dtype_replaced),
          "bnb_nf4", "llama", "bf16", "", "quantized_compute_dtype", "compute dtype bfloat16 requested",
          "bnb_4bit_compute_dtype=bfloat16 silently replaced by float32"),
]


def register() -> None:
    """Add the faults to the registry (idempotent)."""
    for fault in QUANT_FAULTS:
        REGISTRY[fault.variant.id] = fault.variant


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Registered only when loaded as a plugin (-p): importing this module changes nothing."""
    register()
