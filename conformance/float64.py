"""Float64 kept float64: the judge's runs, and the float64 agreement check's, hold no float32 island.

transformers writes its numerics for half-precision models: RMSNorm upcasts to float32
(``hidden_states.to(torch.float32)``), rotary embeddings compute in ``.float()``, eager attention
asks its softmax for ``dtype=torch.float32``. In a float64 model each of these rounds to float32
and back, and that rounding depends on the batch's shape: a row alone and the same row in a batch
of two differed by 1.37e-07 after LlamaRMSNorm (4.48.3, tiny-llama-trained), against 1.33e-14
with the norm in float64. A float64 judge that keeps such islands is not a float64 judge.

While ``kept()`` is active, a float64 tensor asked to become float32, float16 or bfloat16 (``.to``,
``.type``, ``.type_as``, ``.float()``, ``.half()``, ``.bfloat16()``, a softmax's ``dtype``) stays
float64. Nothing else changes: casts to other dtypes, tensors created in float32, and every op's
arithmetic are untouched, so attention, mask and cache integration run as written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

LOWER = frozenset({torch.float32, torch.float16, torch.bfloat16})
TO_SELF = frozenset({torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16})
DTYPE_ARGUMENT = frozenset({
    torch.Tensor.to, torch.Tensor.type,
    torch.softmax, torch.log_softmax, torch.Tensor.softmax, torch.Tensor.log_softmax,
    torch.nn.functional.softmax, torch.nn.functional.log_softmax,
})


def _kept(value: Any) -> Any:
    if isinstance(value, torch.dtype) and value in LOWER:
        return torch.float64
    if isinstance(value, torch.Tensor) and value.dtype in LOWER:  # .to(other_tensor)
        return value.to(dtype=torch.float64)
    return value


class _KeepFloat64(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.dtype == torch.float64:
            if func in TO_SELF:
                return first
            if func is torch.Tensor.type_as and args[1].dtype in LOWER:
                return first.to(device=args[1].device)
            if func in DTYPE_ARGUMENT:
                args = (first, *(_kept(a) for a in args[1:]))
                kwargs = {k: _kept(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def kept() -> Iterator[None]:
    """Float64 tensors stay float64 where model code casts them down for precision's sake."""
    with _KeepFloat64():
        yield
