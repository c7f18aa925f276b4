"""Planted budget faults: variants that compute the right answer too slowly or with too much
memory, registered only for the self-tests (as in faults.py). The budget checks must catch them.

Also `candidate`: a healthy SDPA variant whose behaviour a test switches with the environment
variable CONFORMANCE_PLANT (``slow``, ``error``), so that two runs have the same test ids and
release gating can compare a planted regression with its healthy baseline.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch

from conformance.variants import REGISTRY, Variant

SLOWDOWN = 10  # the slow fault's forward takes this many times as long as the healthy one
SLOWER = 0.3  # the subtle fault's forward takes 30% longer than the healthy one


@dataclass(frozen=True)
class BudgetFault:
    variant: Variant
    control: str  # the healthy variant the fault imitates; it must pass the same budget
    budget: str  # the budget that must fail: "min_speed_ratio", "max_memory_ratio", ...
    message: str  # a fragment the failure message must contain
    description: str
    reference: str = "eager"  # what the budget measures both against
    name: str = ""  # the budget entry's name (a second entry for the same case)

    def budget_id(self, variant: str) -> str:
        """The test id of this fault's budget for `variant` (the fault's or its control's)."""
        padding = "" if self.budget == "max_over_bound" else "nopad"  # footprints have none
        return "-".join(filter(None, ("cpu-llama", variant, "fp32", padding, self.name)))


def _slowed(model: Any) -> Any:
    """Every forward does its work SLOWDOWN times over (repeated work, not a sleep: the CPU
    stays as busy as in a healthy run): SLOWDOWN x slower, unambiguous, outputs unchanged."""
    original = model.forward

    @functools.wraps(original)  # keeps the signature the suite inspects (position_ids)
    def repeated(*args: Any, **kwargs: Any) -> Any:
        for _ in range(SLOWDOWN - 1):
            original(*args, **kwargs)
        return original(*args, **kwargs)

    model.forward = repeated
    return model


def _slowed_by(model: Any, fraction: float = SLOWER) -> Any:
    """Every forward, once done, keeps the CPU busy for `fraction` of its own duration (small
    matmuls, not a sleep): 30% slower however loaded the machine is, outputs unchanged. The
    subtle slowdown a noisy harness would miss or cry wolf about."""
    original = model.forward
    busy = torch.ones(32, 32)

    @functools.wraps(original)
    def slower(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = original(*args, **kwargs)
        deadline = time.perf_counter() + fraction * (time.perf_counter() - start)
        while time.perf_counter() < deadline:
            busy @ busy
        return out

    model.forward = slower
    return model


@contextlib.contextmanager
def _hoarding_scores() -> Iterator[None]:
    """SDPA that also materializes the full attention-score matrix and keeps it alive until its
    output exists: right answers, quadratic memory (what a flash kernel exists to avoid)."""
    original = torch.nn.functional.scaled_dot_product_attention

    def patched(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        keys = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)  # grouped-query heads
        scores = q @ keys.transpose(-2, -1)
        out = original(q, k, v, *args, **kwargs)
        del scores
        return out

    torch.nn.functional.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _mlp_left_unquantized(model: Any) -> Any:
    """A '4-bit' model whose MLP layers are silently back in full precision: outputs still
    close, bitsandbytes ops still run (attention stays quantized), the memory promise broken."""
    import bitsandbytes.functional as bnbf

    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Linear4bit" or ".mlp." not in name:
            continue
        weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
        plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if module.bias is not None:
                plain.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    return model


def _fault(fid: str, base: str = "sdpa", **changes: Any) -> Variant:
    return replace(REGISTRY[base], id=fid, **changes)


BUDGET_FAULTS: list[BudgetFault] = [
    BudgetFault(_fault("fault_slow_sdpa", post_load=_slowed), "sdpa", "min_speed_ratio",
                "speed ratio", f"every forward does its work {SLOWDOWN} times"),
    BudgetFault(_fault("fault_slow30_sdpa", post_load=_slowed_by), "sdpa", "min_speed_ratio",
                "speed ratio", f"every forward takes {SLOWER:.0%} longer (judged against healthy sdpa)",
                reference="sdpa", name="vs_sdpa"),
    BudgetFault(_fault("fault_memory_sdpa", context=_hoarding_scores), "sdpa", "max_memory_exponent",
                "peak memory grows as seq^", "SDPA materializes the full score matrix"),
    BudgetFault(_fault("fault_nf4_mlp_unquantized", "bnb_nf4", post_load=_mlp_left_unquantized),
                "bnb_nf4", "max_over_bound", "x its computed bound",
                "4-bit variant leaves the MLP layers in full precision"),
]


# ---- the gating candidate ------------------------------------------------------------------------

PLANT = "CONFORMANCE_PLANT"


def _candidate_post_load(model: Any) -> Any:
    """CONFORMANCE_PLANT: a comma-separated list of `slow`, `error` (empty: healthy)."""
    plants = set(filter(None, os.environ.get(PLANT, "").split(",")))
    unknown = plants - {"slow", "error"}
    if unknown:
        raise ValueError(f"{PLANT}: unknown plant(s) {sorted(unknown)}")
    if "error" in plants:
        model = _perturb_first_layer(model)
    if "slow" in plants:
        model = _slowed(model)
    return model


def _perturb_first_layer(model: Any) -> Any:
    """Scale the first layer's output by 1 + 1e-6: fp32 logits move by far more than the
    healthy run's error, yet a planted *increase*, not a crash."""
    layer = model.model.layers[0]

    def hook(module: Any, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0] * (1 + 1e-6), *output[1:])
        return output * (1 + 1e-6)

    layer.register_forward_hook(hook)
    return model


CANDIDATE: Variant = _fault("candidate", post_load=_candidate_post_load)


def register() -> None:
    """Add the faults and the candidate to the registry (idempotent)."""
    for fault in BUDGET_FAULTS:
        REGISTRY[fault.variant.id] = fault.variant
    REGISTRY[CANDIDATE.id] = CANDIDATE


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Registered only when loaded as a plugin (-p): importing this module changes nothing."""
    register()
