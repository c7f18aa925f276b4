"""The precision a quantized layer's arithmetic actually keeps, measured, not read from its config.

bitsandbytes 0.50.2's CPU backend, on a CPU with AVX512-BF16, runs every 4-bit product in
bfloat16 whatever `bnb_4bit_compute_dtype` says: its fused kernel casts the activations and the
scales to bfloat16 ("cpu fused op only support bf16 for now", backends/cpu/ops.py) and casts the
result back. The op still receives float32 activations, so a check that reads the op's inputs
(test_quantized_compute_dtype's first half) cannot see it. This probe can: it feeds one layer
inputs that differ only below a dtype's resolution and looks whether the output moved.

Measured on this CPU (tiny-llama-trained, nf4, compute dtype float32): the layers' outputs differ
from float64 products of the same dequantized weights by up to 4.2e-3 relative, at every batch
size, where float32 arithmetic gives 3e-7; cached decoding in chunks then differs from one full
forward by up to 0.089 on logits of max 16 (the float32 model: 1.6e-5).
"""

from __future__ import annotations

from typing import Any

# (dtype, the smallest step it keeps at 1.0): an input 1 + step that the output cannot tell from
# 1.0 was rounded to a coarser dtype than this one (float32's eps is 2^-23; float16's 2^-10;
# bfloat16's 2^-7)
STEPS = (("fp32", 2.0 ** -14), ("fp16", 2.0 ** -10), ("bf16", 2.0 ** -7))
ROWS = (1, 8)  # one-token decoding and a batch: the CPU kernels differ by the number of rows
ORDER = tuple(name for name, _ in STEPS) + ("below bf16",)  # finest first


def step(dtype: str) -> float:
    """The input step at 1.0 that only `dtype` and finer ones resolve."""
    return dict(STEPS)[dtype]


def keeps(kept: str, wanted: str) -> bool:
    """Whether arithmetic that keeps `kept`'s precision keeps `wanted`'s."""
    return ORDER.index(kept) <= ORDER.index(wanted)


def kept_precision(layer: Any, in_features: int) -> str:
    """The finest dtype of STEPS whose step still moves `layer`'s output, at every row count in
    ROWS ("below bf16" when none does). Runs the layer in inference mode, as a forward would."""
    import torch

    weight = getattr(layer, "weight", None)
    device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
    found = []
    for rows in ROWS:
        kept = "below bf16"
        base = torch.zeros(rows, in_features, device=device)
        base[:, 0] = 1.0
        with torch.inference_mode():
            at_one = layer(base[None])
        for name, step in STEPS:
            moved = base.clone()
            moved[:, 0] = 1.0 + step
            with torch.inference_mode():
                delta = (layer(moved[None]) - at_one).abs().max()
            if float(delta) > 0:
                kept = name
                break
        found.append(kept)
    return max(found, key=ORDER.index)


def four_bit_precision(model: Any) -> tuple[str, str] | None:
    """(kept precision, layer name) of the model's first bitsandbytes 4-bit layer; None without one.
    One layer speaks for all: the kernel is chosen per device and dtype, not per layer. A model
    that is no torch module (an ONNX Runtime session) has none."""
    named_modules = getattr(model, "named_modules", None)
    if named_modules is None:
        return None
    for name, module in named_modules():
        if type(module).__name__ == "Linear4bit":
            return kept_precision(module, int(module.in_features)), name
    return None


def effective_compute_dtype(loaded: Any, declared: str) -> str:
    """The dtype a variant's invariance checks must round at: the declared compute dtype, or the
    coarser one its 4-bit layers measurably keep (test_quantized_compute_dtype judges the gap).
    Memoized on the loaded model: the probe is one layer, four inputs, per load."""
    if loaded.kept_precision is None:
        measured = four_bit_precision(loaded.model)
        loaded.kept_precision = measured[0] if measured else ""
    kept = loaded.kept_precision
    if not kept or keeps(kept, declared):
        return declared
    return "bf16" if kept == "below bf16" else kept
