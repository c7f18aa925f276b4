"""Variants built from the resident plain reference, sharing its weights (issue 20).

A variant whose load differs from the reference's only in ``attn_implementation`` (sdpa and
each forced backend, the device golden, a fault that swaps the implementation) needs no read
from disk: a copy of the reference's modules that shares every parameter, switched with
transformers' own ``set_attn_implementation``, is that variant. It costs no weight memory,
which is what lets a user's large checkpoint hold a reference and its variants at once.
Buffers are copied, not shared: a model may write its own in a forward (phi3's long-RoPE
rewrites ``rotary_emb.inv_freq`` in place for long inputs, measured on transformers 5.24), and
they are small (rotary frequencies, position ids).

Only where the library allows it: transformers 5.x switches a model whose attention goes
through its AttentionInterface (``_can_set_attn_implementation``); anywhere else (4.x, a model
with per-implementation attention classes) the variant is loaded from disk as before. Every
variant still proves its path ran (its op proof), so a switch that silently did nothing fails.

Shared weights must stay the reference's: a path that wrote to them in place would change the
reference it is judged against. Each shared parameter's version counter is kept at build time and
checked after every forward of the copy (`changed`), so such a write is a failure naming the
tensor, never a silently moved judge. (A write through ``tensor.data`` bumps no counter; no
transformers forward writes to its weights at all.)
"""

from __future__ import annotations

import copy
from typing import Any

SharedVersions = tuple[tuple[str, Any, int], ...]


def attention_only(load_kwargs: dict[str, Any]) -> str | None:
    """The implementation a variant asks for when that is all its ``from_pretrained`` kwargs say."""
    if set(load_kwargs) == {"attn_implementation"} and isinstance(load_kwargs["attn_implementation"], str):
        return str(load_kwargs["attn_implementation"])
    return None


def switched_copy(model: Any, implementation: str) -> Any | None:
    """A copy of `model` sharing its parameters (its buffers copied), with `implementation` set; None where
    this transformers cannot switch the model's attention (then the variant is loaded from disk).
    The library's refusal of the implementation (e.g. a model without SDPA) is raised as it is."""
    setter = getattr(model, "set_attn_implementation", None)
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if setter is None or can_set is None or not can_set():
        return None
    clone = copy.deepcopy(model, {id(weight): weight for weight in model.parameters()})
    clone.set_attn_implementation(implementation)
    if getattr(clone.config, "_attn_implementation", None) != implementation:
        return None  # the library declined (it warns and keeps the old one)
    return clone


def versions(model: Any) -> SharedVersions:
    """Each shared parameter with its version counter now (in-place writes bump it)."""
    return tuple((name, weight, weight._version) for name, weight in model.named_parameters())


def changed(shared: SharedVersions) -> str | None:
    """The first shared parameter written to in place since `versions`, or None."""
    for name, tensor, version in shared:
        if tensor._version != version:
            return name
    return None
