"""ONNX Runtime through Optimum (C15): the exported model survives ``save_pretrained`` and a
reload bitwise, and its session runs on the execution provider that was asked for (no silent
CPU fallback when CUDA was requested).

The logits, padding and generation checks apply to the ONNX Runtime variants like to any other
variant (test_logits, test_properties, test_generation); these are the checks only they need.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from conformance.cases import Case
from conformance.checks import load_or_skip, run_proven
from conformance.compat import parse_dtype
from conformance.paths import onnx_runtime
from conformance.running import Loaded, ModelCache
from conformance.strategies import BatchSpec
from conformance.variants import KINDS, Variant

# both padding sides, a length-1 row, lengths off any tile: one batch per side is enough for a
# bitwise comparison (a reload either runs the same graph or it does not)
BATCHES = (BatchSpec((12, 7, 1), "right", seed=15), BatchSpec((12, 7, 1), "left", seed=15))


def _onnx_runtime(variant: Variant) -> bool:
    """The checks below apply to the variants that verify C15 (ONNX Runtime through Optimum)."""
    return "C15" in variant.claims


def _load(cache: ModelCache, case: Case) -> Loaded:
    """The variant from the session's cache; a refusal is a skip, a failure one line."""
    return load_or_skip(lambda: cache.get(case.model, case.variant, case.dtype))


def _requested(case: Case) -> str:
    return str(case.variant.load_kwargs(parse_dtype(case.dtype))["provider"])


def bitwise_difference(expected: Any, found: Any) -> str | None:
    """None when both tensors are bitwise equal (NaN where the other is NaN), else what differs."""
    import torch

    if expected.shape != found.shape:
        return f"shape {tuple(found.shape)}, expected {tuple(expected.shape)}"
    differs = (expected != found) & ~(expected.isnan() & found.isnan())
    if not differs.any():
        return None
    where = differs.nonzero()[0].tolist()
    worst = float(torch.nan_to_num((expected - found).abs(), nan=float("inf"))[differs].max())
    return (f"{int(differs.sum())} of {differs.numel()} values differ, max |after - before| = "
            f"{worst:.3g}, first at row {where[0]}, position {where[1]}")


@pytest.mark.cases(variant_filter=_onnx_runtime, kinds=KINDS)
def test_onnx_save_reload(case: Case, model_cache: ModelCache, metrics: dict[str, Any],
                          tmp_path: Path) -> None:
    """save_pretrained writes the exported graph; from_pretrained on that folder (no export) gives
    bitwise the outputs the exported model gave, on the same provider."""
    loaded = _load(model_cache, case)
    before = [run_proven(loaded, batch, metrics) for batch in BATCHES]
    folder = tmp_path / "saved"
    start = time.perf_counter()
    loaded.model.save_pretrained(folder)
    metrics["save_s"] = round(time.perf_counter() - start, 3)
    files = sorted(p.name for p in folder.iterdir())
    metrics["saved_files"] = files
    metrics["saved_bytes"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert any(name.endswith(".onnx") for name in files) and "config.json" in files, (
        f"{case.id}: save_pretrained wrote {files}: no ONNX graph and config.json to reload from")
    start = time.perf_counter()
    try:
        model = onnx_runtime.reload(folder, case.model.kind, _requested(case), loaded.device)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        pytest.fail(f"{case.id}: reloading the saved folder failed: {type(exc).__name__}: {first}",
                    pytrace=False)
    metrics["reload_s"] = round(time.perf_counter() - start, 3)
    again = Loaded(model, case.model, case.variant, case.dtype, loaded.device)
    metrics["reloaded_providers"] = onnx_runtime.providers(model)
    for batch, expected in zip(BATCHES, before):
        found = run_proven(again, batch, metrics)
        problem = bitwise_difference(expected, found)
        assert problem is None, (
            f"{case.id}: reloaded model is not the saved one, {batch.padding}-padded batch "
            f"{list(batch.lengths)}: {problem}")
    metrics["values_compared"] = sum(int(out.numel()) for out in before)


@pytest.mark.cases(variant_filter=_onnx_runtime, kinds=KINDS)
def test_onnx_provider(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    """The session runs on the provider that was asked for, first in its list: onnxruntime falls
    back to the CPU silently when a GPU provider fails to initialise."""
    loaded = _load(model_cache, case)
    requested = _requested(case)
    ran = onnx_runtime.providers(loaded.model)
    metrics.update(requested_provider=requested, session_providers=ran,
                   available_providers=onnx_runtime.available_providers())
    assert ran and ran[0] == requested, (
        f"{case.id}: asked for {requested}, but the session runs on {ran}: a silent fallback")
    run_proven(loaded, BatchSpec((8, 3), "right", seed=3), metrics)  # and a forward ran there
