"""Speed and memory budgets (C05; the memory promise of C10/C11): measured against eager on the
hardware under test, judged against the budget files (conformance/measure/budgets.py).

Run with ``-m budget`` (the shipped budgets) or ``--budgets FILE``; the quick run leaves them out.
A budget for another hardware class is collected and skipped as not applicable. Every measured
value, its limit and its verdict land in report.json; the human report plots the sweeps.

A speed budget is judged by the confidence interval of the median ratio (conformance/measure/bench.py):
the check fails when an interval lies wholly beyond its budget, and when an interval still
straddles its limit after the most rounds allowed (and nothing failed) the check is skipped with
a reason starting "inconclusive:", which report.json records as the outcome "inconclusive"
(conformance/reporting/report.py): neither a pass nor a failure.
"""

from __future__ import annotations

from typing import Any

import pytest

from conformance.checks import load_or_skip, run_proven
from conformance.measure import bench, budgets
from conformance.measure.budgets import Budget
from conformance.outcomes import inconclusive
from conformance.running import Loaded, ModelCache, load, model_inputs
from conformance.strategies import BatchSpec
from conformance.variants import REGISTRY

pytestmark = pytest.mark.budget
KINDS = {"test_speed_memory_budget": "sweep", "test_footprint_budget": "footprint"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per budget entry of this test's kind, for the models/variants/dtypes selected."""
    if "budget" not in metafunc.fixturenames:
        return
    from conformance.plugin import BUDGETS, selection

    kind = KINDS[metafunc.function.__name__]
    chosen = selection(metafunc.config)
    variants = {v.id for v in chosen.variants}
    models = {m.name for m in chosen.models}
    dtypes = metafunc.config.getoption("dtype")  # only an explicit --dtype filters: a budget
    params = []  # names its own dtype, and another device's budgets must still show as skipped
    for budget in metafunc.config.stash.get(BUDGETS, []):
        case = budget.case
        if budget.kind != kind or case.variant.id not in variants or (dtypes and case.dtype not in dtypes):
            continue
        if metafunc.config.getoption("model") and case.model.name not in models:
            continue
        marks: list[Any] = [getattr(pytest.mark, claim) for claim in _claims(budget)]
        reason = budgets.applicability(budget, chosen)
        if reason:
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(budget, id=budget.id, marks=marks))
    metafunc.parametrize("budget", params)


def _claims(budget: Budget) -> tuple[str, ...]:
    return ("C05",) if budget.kind == "sweep" else budget.case.variant.claims


def _load(cache: ModelCache, budget: Budget) -> tuple[Loaded, Loaded]:
    """(variant, reference) from the session's model cache."""
    case = budget.case
    reference = load_or_skip(lambda: cache.get(case.model, REGISTRY[budget.reference], case.dtype))
    return load_or_skip(lambda: cache.get(case.model, case.variant, case.dtype)), reference


def _forward(loaded: Loaded, inputs: dict[str, Any]) -> Any:
    """The bare forward: no copy of the logits to float64 (that would be measured too)."""
    import torch

    def call() -> None:
        with torch.inference_mode(), loaded.variant.context():
            loaded.model(**inputs)

    return call


def test_speed_memory_budget(budget: Budget, model_cache: ModelCache, metrics: dict[str, Any],
                             conformance_selection: Any) -> None:
    variant, reference = _load(model_cache, budget)
    proof: dict[str, Any] = {}
    run_proven(variant, BatchSpec((16,), "none"), proof)  # a silent fallback measures nothing
    metrics["proof_ops"] = proof.get("proof_ops")
    device = conformance_selection.env.device
    meter, policy = bench.meter_for(device), bench.policy_for(device)
    sweep = []
    speed_limit = budget.limits.get("min_speed_ratio")
    for seq in budget.seqs:
        batch = budget.batch_spec(seq)
        judged = speed_limit if seq >= budget.from_seq else None  # shorter lengths: plotted only
        measured = bench.compare(_forward(variant, model_inputs(variant, batch)),
                                 _forward(reference, model_inputs(reference, batch)), meter, policy,
                                 limit=judged)
        sweep.append({"seq": seq, "lengths": list(batch.lengths), "padding": batch.padding,
                      **measured.as_metrics()})
    problems, figures = budgets.judge_sweep(budget, sweep)
    metrics.update(figures)
    assert not problems, f"{budget.id} ({budget.where}): " + "; ".join(problems)
    if figures["inconclusive"]:
        pytest.skip(inconclusive(f"{budget.id} ({budget.where}): " + "; ".join(figures["inconclusive"])))


def test_footprint_budget(budget: Budget, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    case = budget.case
    reference = load_or_skip(lambda: model_cache.get(case.model, REGISTRY[budget.reference], case.dtype))
    # a fresh copy, as loaded: bitsandbytes' CPU backend repacks 4-bit state on the first forward,
    # so a copy another check already ran would weigh less (and gating would see the order)
    variant = load_or_skip(lambda: load(case.model, case.variant, case.dtype, model_cache.device,
                                   model_cache.workdir))
    bound, detail = budgets.footprint_bound(reference.model, budget.case.variant.tolerance)
    quantized = sum(1 for m in variant.model.modules()
                    if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
    problems, figures = budgets.judge_footprint(
        budget, bench.footprint_bytes(variant.model), bench.footprint_bytes(reference.model),
        bound, quantized, detail)
    metrics.update(figures)
    assert not problems, f"{budget.id} ({budget.where}): " + "; ".join(problems)
    run_proven(variant, BatchSpec((8,), "none"), metrics)  # and the quantized path really runs
