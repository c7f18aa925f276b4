"""Logits conformance (C01, C06, C08-C11 by variant): every variant's outputs on real tokens
stay within its tolerance of a higher-precision golden run, finite wherever golden is finite,
and the variant's optimized path provably ran."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, note

from conformance import compare, localize, routing
from conformance.cases import Case
from conformance.checks import (
    dtype_honoured,
    golden_outputs,
    keep_worst,
    load_or_fail,
    max_len,
    reproduction,
    run_proven,
)
from conformance.running import ModelCache
from conformance.strategies import BatchSpec, batch_specs
from conformance.variants import KINDS


@pytest.mark.cases(paddings=("none", "right", "left"), kinds=KINDS)
def test_logits(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    variant, reference, golden = load_or_fail(model_cache, case)
    dtype_honoured(variant)
    run_proven(variant, BatchSpec((8,), "none"), metrics)  # a silent fallback fails fast, unshrunk
    scheme = "" if case.variant.kernel_class else case.variant.tolerance  # its routing near ties

    @given(batch=batch_specs(padding=case.padding, max_len=max_len(reference)))
    def check(batch: BatchSpec) -> None:
        note(reproduction(case, batch, variant.device))
        expected = golden_outputs(model_cache, golden, batch)
        plain = model_cache.outputs(reference, batch)
        out = run_proven(variant, batch, metrics)
        real = batch.mask().bool()
        problem = compare.finiteness(out, plain, expected, real)
        assert problem is None, f"{case.id}: {problem}"
        real = routing.judged(model_cache, golden, batch, case.dtype, metrics, scheme)
        if not real.any():  # a mixture of experts' rows all open on a routing near tie
            return
        if case.variant.reference:  # REF: the plain path itself, within its envelope of golden
            problem, figures = compare.reference_verdict(out, expected, real, case.dtype,
                                                         case.model.name)
            metrics["max_ref_ulps"] = max(metrics.get("max_ref_ulps", 0.0), figures["ref_ulps"])
        else:
            problem, figures = compare.variant_verdict(case.variant, out, plain, expected, real,
                                                       case.dtype, case.model.kind)
            if problem is not None:  # where it starts: the first layer out of its bound
                figures["first_divergence"] = (
                    localize.localize(variant, reference, golden, batch, case.dtype)
                    if case.variant.kernel_class else {"text": localize.NOT_LOCALIZED})
                problem = f"{problem}; {figures['first_divergence']['text']}"
        keep_worst(metrics, figures, batch)
        assert problem is None, f"{case.id}: {problem}"

    check()
    routing.skip_if_nothing_judged(metrics, case.dtype, case.model.name, scheme)
