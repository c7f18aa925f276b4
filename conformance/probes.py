"""Proof that an optimized path actually ran: count the ops a forward dispatches.

Matching outputs are not enough: a variant that silently falls back to the plain path passes
every comparison. Each variant names the ops its path must call (and those it must not), and
the count is asserted on the very forward whose outputs are compared.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

# Composite ops the counter counts but does not decompose: dense products, whose decompositions
# (mm, bmm, addmm, views) no proof reads, while decomposing them costs a Python decomposition per
# call (torch._decomp's matmul). Measured (llama, 3 left-padded rows, one CPU thread): a counted
# forward took 15.6 ms against 3.2 ms plain; without decomposing these and with the per-op
# lookups memoized, 9.5 ms. Attention and softmax composites are still decomposed: that is where
# the kernel the dispatcher picks shows.
NOT_DECOMPOSED = frozenset({"aten::matmul", "aten::linear"})
# A mixture of experts' router takes a softmax over expert scores in every layer: that is routing,
# not attention, and an SDPA proof that forbids the plain path's softmax must not read it as a
# fallback. Softmaxes dispatched inside these modules (Mixtral's and Qwen2-MoE's sparse block, 5.x's
# router) are counted as ``routing::<op>``; measured on the zoo's mixtral (2 layers): 2 such calls
# per forward on transformers 4.48.3 and 5.24.0, none elsewhere.
ROUTING_MODULES = ("*SparseMoeBlock", "*MoeBlock", "*TopKRouter")
ROUTING_SOFTMAX = frozenset({"aten::softmax", "aten::_softmax", "aten::_safe_softmax"})
_OPS: dict[Any, tuple[str, bool]] = {}  # op -> (its name, whether the counter decomposes it)


def _op(func: Any) -> tuple[str, bool]:
    found = _OPS.get(func)
    if found is None:
        import torch

        schema = getattr(func, "_schema", None)
        name = schema.name if schema is not None else str(func)
        composite = schema is not None and name not in NOT_DECOMPOSED and bool(
            torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"))
        found = _OPS[func] = (name, composite)
    return found


class OpCounter(TorchDispatchMode):
    """Counts every aten / custom op by schema name (``aten::_softmax``, ``bitsandbytes::...``).

    Under ``torch.inference_mode`` composite ops (``scaled_dot_product_attention``, ``softmax``)
    reach the mode whole, hiding which kernel runs; the counter decomposes them itself so the
    kernel the dispatcher picks (flash, math's ``_safe_softmax``, ...) is counted too (all but
    NOT_DECOMPOSED's dense products).
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.routing = 0  # > 0 while a mixture of experts' router runs (routing_watched)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name, composite = _op(func)
        self.counts[f"routing::{name}" if self.routing and name in ROUTING_SOFTMAX else name] += 1
        if composite:
            with self:
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return func(*args, **kwargs)

    def matching(self, patterns: tuple[str, ...]) -> dict[str, int]:
        return {
            name: n for name, n in self.counts.items()
            if any(fnmatch.fnmatchcase(name, p) for p in patterns)
        }


def routing_modules(model: Any) -> list[Any]:
    """The model's mixture-of-experts routing modules (ROUTING_MODULES, by class name); none
    searched for where the config routes no experts (every dense model: no walk per forward)."""
    from conformance.routing import experts_per_token

    modules = getattr(model, "modules", None)  # an ONNX Runtime model has no torch modules
    if modules is None or experts_per_token(model) is None:
        return []
    return [m for m in modules()
            if any(fnmatch.fnmatchcase(type(m).__name__, p) for p in ROUTING_MODULES)]


@contextmanager
def routing_watched(counter: Any, model: Any) -> Iterator[None]:
    """While `model` runs, softmaxes inside its routers count as routing (ROUTING_MODULES)."""
    if not isinstance(counter, OpCounter):
        yield
        return
    handles = []
    for module in routing_modules(model):
        handles.append(module.register_forward_pre_hook(lambda *_: _shift(counter, 1)))
        handles.append(module.register_forward_hook(lambda *_: _shift(counter, -1)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        counter.routing = 0


def _shift(counter: OpCounter, by: int) -> None:
    counter.routing += by


@dataclass(frozen=True)
class Proof:
    """The ops a path must show: at least `minimum` calls matching `expect`, none matching `forbid`.

    `minimum` is "layers" (one per attention layer), "quantized" (one per quantized linear)
    or an int.
    """

    expect: tuple[str, ...]
    forbid: tuple[str, ...] = ()
    minimum: str | int = "layers"
    what: str = ""

    def required(self, model: Any) -> int:
        if isinstance(self.minimum, int):
            return self.minimum
        if self.minimum == "layers":
            return int(model.config.num_hidden_layers)
        if self.minimum == "quantized":  # a quantized variant with no quantized layer is a fault
            return max(1, count_quantized_linears(model))
        raise ValueError(f"unknown proof minimum {self.minimum!r}")

    def verdict(self, counter: OpCounter, model: Any) -> tuple[str | None, dict[str, Any]]:
        """(failure message or None, figures for the report)."""
        seen = counter.matching(self.expect)
        forbidden = counter.matching(self.forbid) if self.forbid else {}
        need = self.required(model)
        figures = {"proof_ops": seen, "proof_required": need, "proof_forbidden_seen": forbidden}
        total = sum(seen.values())
        if total < need:
            others = ", ".join(f"{k}x{v}" for k, v in _attention_like(counter).items()) or "none"
            return (
                f"optimized path did not run: expected >= {need} calls of {' | '.join(self.expect)}"
                f" ({self.what}), saw {total}; attention-like ops seen: {others}",
                figures,
            )
        if forbidden:
            return (
                f"plain path ran alongside the optimized one: {forbidden} ({self.what})",
                figures,
            )
        return None, figures


def _attention_like(counter: OpCounter) -> dict[str, int]:
    return counter.matching(
        ("aten::_softmax", "aten::_safe_softmax", "aten::*scaled_dot_product*", "aten::_transformer*",
         "aten::_native_multi_head_attention", "flash_attn::*", "bitsandbytes::*")
    )


def count_quantized_linears(model: Any) -> int:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    kinds = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    return sum(isinstance(m, kinds) for m in model.modules())
