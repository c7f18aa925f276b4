"""Agreement between attention implementations in float64 (REF, and each variant's claims).

Every attention implementation the stack can run in float64 on the device (eager on a padded
batch, SDPA and each CPU backend forced, BetterTransformer where it takes float64) must give the
golden run's answer on real tokens within a measured float64 envelope. There is no noise to hide
in: a wrong mask, cache or option integration shows as 1e-1 against 1e-12, and the judge (eager,
each row alone, unpadded) shares none of that integration. Both sides run with float64 kept
float64 (conformance/float64.py): the float32 islands transformers writes for half precision
(RMSNorm, RoPE, eager's softmax) would otherwise round differently for a row alone and in a batch.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, note, settings

from conformance import compare, float64, routing, tolerances
from conformance.cases import Case
from conformance.checks import (
    golden_outputs,
    keep_worst,
    load_or_fail_in,
    max_len,
    reproduction,
    run_proven,
)
from conformance.running import ModelCache
from conformance.strategies import BatchSpec, batch_specs
from conformance.variants import KINDS


def runs_in_float64(variant: Any) -> bool:
    """Kernel-class paths with the ordinary loading: quantized weights, exported graphs and
    compiled code are other numerics, judged by their own checks."""
    return variant.kernel_class and variant.loader is None and "EXT" not in variant.claims


# transformers < 4.50's mask builders allocate with the default dtype and then fill float64's
# minimum into it (gpt2, opt): the release cannot run that path in float64 at all, which is its
# documented limit, not a wrong answer. Measured on 4.48.3 for gpt2 and opt, every SDPA variant.
FLOAT64_REFUSALS = ("value cannot be converted to type float without overflow",)


def _refused_float64(exc: Exception) -> str | None:
    text = str(exc)
    return next((marker for marker in FLOAT64_REFUSALS if marker in text), None)


def fewer_examples() -> settings:
    """Half the profile's examples: one float64 forward per example, and no noise to average."""
    return settings(max_examples=max(2, settings.default.max_examples // 2))


@pytest.mark.cases(paddings=("right", "left"), dtypes=("fp64",), variant_filter=runs_in_float64,
                   kinds=KINDS)
def test_float64_agreement(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    variant, golden = load_or_fail_in(model_cache, case, "fp64")
    ulps = tolerances.float64_agreement_ulps(case.variant.id, case.model.kind)

    @fewer_examples()
    @given(batch=batch_specs(padding=case.padding, max_len=max_len(variant, cap=65)))
    def check(batch: BatchSpec) -> None:
        note(reproduction(case, batch, variant.device, float64_kept=True))
        expected = golden_outputs(model_cache, golden, batch)
        try:
            with float64.kept():
                out = run_proven(variant, batch, metrics)
        except RuntimeError as exc:
            marker = _refused_float64(exc)
            if marker is None:
                raise
            pytest.skip(f"{case.variant.id} cannot run {case.model.name} in float64 on this "
                        f"transformers: {type(exc).__name__}: {marker}")
        real = batch.mask().bool()
        problem = compare.golden_defined(expected, real)
        assert problem is None, f"{case.id}: {problem}"
        real = routing.judged(model_cache, golden, batch, "fp64", metrics)
        if not real.any():  # a mixture of experts' rows all open on a routing near tie
            return
        problem, figures = compare.agreement_verdict(
            out, expected, real, ulps, f"{case.variant.id} in float64 vs eager float64, each row alone")
        keep_worst(metrics, figures, batch)
        metrics["max_ulps"] = max(metrics.get("max_ulps", 0.0), figures.get("ulps", 0.0))
        assert problem is None, f"{case.id}: {problem}"

    check()
    routing.skip_if_nothing_judged(metrics, "fp64", case.model.name)
