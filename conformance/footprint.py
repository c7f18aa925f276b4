"""A quantized model's footprint from first principles (C10, C11).

From the full-precision model's own parameter inventory and the quantization config, compute
which linear layers bitsandbytes should hold and how many bytes each part takes:

- ``get_memory_footprint()`` counts parameters and buffers: a quantized weight is 1 byte per
  element (LLM.int8) or half a byte (4-bit, two codes packed per uint8); everything else keeps
  its loaded size.
- The quantization state beside each weight, which ``get_memory_footprint()`` does not count:
  int8 keeps one fp32 scale per output row (``SCB``); 4-bit keeps one absmax per block of
  ``blocksize`` weights (fp32) and its 16-entry fp32 code table; with double quantization the
  absmax is uint8, plus one fp32 absmax per 256 blocks, a 256-entry fp32 code table and an fp32
  offset.

Which layers are quantized follows transformers' documented rule (5.x quantizers/base.py,
``get_keys_to_not_convert``), re-derived here rather than called: every ``nn.Linear`` (and GPT-2's
``Conv1D``) except the output embeddings, tied weights, the module holding the model's last
parameter, the model class's ``_keep_in_fp32_modules``; an explicit ``llm_int8_skip_modules``
replaces the first three defaults.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

FP32 = 4
NF4_CODE = 16  # entries in the 4-bit code table (fp32 each)
NESTED_CODE = 256  # entries in the dynamic 8-bit code table of double quantization
NESTED_BLOCK = 256  # blocks of first-level absmax per nested absmax


@dataclass(frozen=True)
class Scheme:
    bits: int  # 8 or 4
    blocksize: int = 64
    double_quant: bool = False
    skip_modules: tuple[str, ...] | None = None  # None: transformers' defaults


def scheme_of(load_kwargs: dict[str, Any]) -> Scheme | None:
    """The quantization a variant's from_pretrained kwargs ask for (None: not quantized)."""
    config = load_kwargs.get("quantization_config")
    if config is None:
        if load_kwargs.get("load_in_8bit"):
            return Scheme(8)
        if load_kwargs.get("load_in_4bit"):
            return Scheme(4)
        return None
    skip = getattr(config, "llm_int8_skip_modules", None)
    skip = tuple(skip) if skip is not None else None
    if getattr(config, "load_in_8bit", False):
        return Scheme(8, skip_modules=skip)
    # transformers 5.x exposes no 4-bit blocksize: bitsandbytes' default (64) applies; a config
    # that carries one (bnb_4bit_blocksize) is honoured
    return Scheme(4, blocksize=int(getattr(config, "bnb_4bit_blocksize", None) or 64),
                  double_quant=bool(config.bnb_4bit_use_double_quant), skip_modules=skip)


def _matches(name: str, pattern: str) -> bool:
    """transformers' module-name match: a prefix or regex up to a module boundary, or a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return bool(re.match(rf"(?:{pattern}){boundary}", name)) or name.endswith(pattern)


def _linear_kinds() -> tuple[type, ...]:
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def expected_quantized(model: Any, scheme: Scheme) -> dict[str, tuple[int, int]]:
    """name -> (weight elements, output rows) of every layer the scheme must quantize."""
    import torch

    skip: list[str] = []
    if scheme.skip_modules is None:
        head = model.get_output_embeddings()
        skip += [n for n, m in model.named_modules() if head is not None and m is head]
        by_param: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            by_param.setdefault(id(param), []).append(name)
        skip += [n.removesuffix(".weight") for names in by_param.values() if len(names) > 1
                 for n in names]
        last = list(model.named_parameters())[-1][0]
        if last.endswith(".weight"):
            skip.append(last.removesuffix(".weight"))
    else:
        skip += list(scheme.skip_modules)
    skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    out = {}
    for name, module in model.named_modules():
        linear, conv1d = _linear_kinds()
        # exactly nn.Linear (a subclass, e.g. a LoRA layer, is not replaced) or GPT-2's Conv1D
        if not (type(module) is linear or isinstance(module, conv1d)):
            continue
        if any(_matches(name, p) for p in skip):
            continue
        rows = module.weight.shape[0] if isinstance(module, torch.nn.Linear) else module.weight.shape[1]
        out[name] = (module.weight.numel(), int(rows))
    return out


def state_bytes(numel: int, rows: int, scheme: Scheme) -> int:
    """Bytes of quantization state bitsandbytes keeps beside one quantized weight."""
    if scheme.bits == 8:
        return FP32 * rows  # SCB: one fp32 absmax per output row
    blocks = -(-numel // scheme.blocksize)
    if not scheme.double_quant:
        return FP32 * blocks + FP32 * NF4_CODE
    nested = -(-blocks // NESTED_BLOCK)
    return blocks + FP32 * nested + FP32 * NESTED_CODE + FP32 + FP32 * NF4_CODE


def expected(model: Any, scheme: Scheme) -> dict[str, Any]:
    """The figures a correct quantized load of `model` (full precision, run dtype) must show."""
    quantized = expected_quantized(model, scheme)
    full = int(model.get_memory_footprint())
    weights = {n: m.weight for n, m in model.named_modules() if n in quantized}
    full_weight_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    per_weight = (lambda n: n) if scheme.bits == 8 else (lambda n: -(-n // 2))
    quant_weight_bytes = sum(per_weight(numel) for numel, _ in quantized.values())
    return {
        "quantized_layers": sorted(quantized),
        "full_footprint": full,
        "footprint": full - full_weight_bytes + quant_weight_bytes,
        "state_bytes": sum(state_bytes(numel, rows, scheme) for numel, rows in quantized.values()),
    }


def quantized_layers(model: Any) -> list[str]:
    """Names of the bitsandbytes layers a loaded model holds."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    kinds = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    return sorted(n for n, m in model.named_modules() if isinstance(m, kinds))


def measured_state_bytes(model: Any) -> int:
    """Bytes of the quantization state the loaded layers hold (each layer's own tensors)."""
    import torch

    total = 0

    def add(tensor: Any) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor):
            total += tensor.numel() * tensor.element_size()

    for name in quantized_layers(model):
        weight = model.get_submodule(name).weight
        add(getattr(weight, "SCB", None))
        state = getattr(weight, "quant_state", None)
        if state is not None:
            add(state.absmax)
            add(state.code)
            if getattr(state, "nested", False):
                add(state.offset)
                add(state.state2.absmax)
                add(state.state2.code)
    return total
