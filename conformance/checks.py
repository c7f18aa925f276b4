"""Steps every check shares: load or fail in one line, run with proof, reproduce a failure."""

from __future__ import annotations

from typing import Any

import pytest

from conformance.cases import Case
from conformance.probes import OpCounter
from conformance.running import Loaded, LoadError, ModelCache, forward
from conformance.strategies import BatchSpec
from conformance.variants import GOLDEN, GOLDEN_EAGER, REFERENCE, REGISTRY

KERNEL_REFUSALS = ("No available kernel", "No viable backend")


def load_or_fail(cache: ModelCache, case: Case) -> tuple[Loaded, Loaded, Loaded]:
    """(variant, same-dtype eager reference, golden); a load failure is one line, not a traceback."""
    eager = REGISTRY[REFERENCE]
    try:
        try:
            golden = cache.golden(case.model, GOLDEN, case.dtype)
        except LoadError as exc:
            if not exc.refused:  # only a model without SDPA takes the eager golden run
                raise
            golden = cache.golden(case.model, GOLDEN_EAGER, case.dtype)
        reference = cache.get(case.model, eager, case.dtype)
        variant = cache.get(case.model, case.variant, case.dtype)
    except LoadError as exc:
        if exc.refused:
            pytest.skip(str(exc))
        pytest.fail(str(exc), pytrace=False)
    return variant, reference, golden


def dtype_honoured(loaded: Loaded) -> None:
    """A variant asked for bf16 must not silently run in float32 (it would look *more* accurate)."""
    import torch

    from conformance.compat import parse_dtype

    want = parse_dtype(loaded.dtype)
    found: dict[torch.dtype, int] = {}
    for param in loaded.model.parameters():
        if param.is_floating_point() and param.dtype != want:
            found[param.dtype] = found.get(param.dtype, 0) + 1
    if found:
        listing = ", ".join(f"{n} in {dt}" for dt, n in found.items())
        pytest.fail(f"{loaded.variant.id} on {loaded.zoo.name}: asked for {loaded.dtype}, but "
                    f"floating-point parameters are not: {listing}", pytrace=False)


def max_len(loaded: Loaded, cap: int = 129) -> int:
    positions = getattr(loaded.model.config, "max_position_embeddings", None) or cap
    return max(2, min(cap, int(positions) - 2))


def run_proven(loaded: Loaded, batch: BatchSpec, metrics: dict[str, Any]) -> Any:
    """Forward of the variant with its ops counted; fails if its optimized path did not run.

    A forced kernel that refuses the input ("No available kernel") is a skip with that reason.
    """
    __tracebackhide__ = True
    counter = OpCounter()
    try:
        out = forward(loaded, batch, counter)
    except Exception as exc:  # kernels refuse with RuntimeError; bitsandbytes' CPU 4-bit asserts
        text = str(exc)
        if any(marker in text for marker in KERNEL_REFUSALS + loaded.variant.input_refusals):
            first = next((ln for ln in text.splitlines() if ln.strip()), text)
            pytest.skip(f"{loaded.variant.id} refused this input: {first.strip()[:200]}")
        raise
    proof = loaded.variant.proof_for(loaded.zoo.kind)
    if proof is not None:
        problem, figures = proof.verdict(counter, loaded.model)
        metrics.update(figures)
        if problem:
            raise AssertionError(f"{loaded.variant.id} on {loaded.zoo.name}: {problem}")
    return out


def reproduction(case: Case, batch: BatchSpec, device: str) -> str:
    return (
        "Reproduce:\n"
        "from pathlib import Path\n"
        "from conformance import running, variants, zoo\n"
        f"{batch.reproduction()}\n"
        f"model = zoo.resolve({case.model.location!r}, zoo.default_zoo())\n"
        f"loaded = running.load(model, variants.REGISTRY[{case.variant.id!r}], {case.dtype!r}, "
        f"{device!r}, Path('/tmp/conformance-zoo'))\n"
        "print(running.forward(loaded, batch))"
    )


def keep_worst(metrics: dict[str, Any], figures: dict[str, Any], batch: BatchSpec) -> None:
    """Across Hypothesis examples, report the figures of the example closest to its bound."""
    metrics["examples"] = metrics.get("examples", 0) + 1
    if figures.get("err_over_bound", 0.0) >= metrics.get("err_over_bound", -1.0):
        metrics.update(figures)
        metrics["worst_batch"] = {"lengths": list(batch.lengths), "padding": batch.padding,
                                  "seed": batch.seed}
