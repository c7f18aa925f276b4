"""The order checks run in: by model, then dtype, then variant, so each model is loaded once.

The model cache keeps one model's loads at a time (running.ModelCache), and collection order is
module by module, so a serial run that alternates checks would reload every model once per
module. Grouping the items by (model, dtype, variant) makes each load happen once; under xdist
every test of one model already goes to one worker (gpus.XdistHooks), which then runs them in
this order. The sort is stable: within a group, items keep their collection order, so a check's
cases stay in the order pytest gave them.
"""

from __future__ import annotations

from typing import Any

import pytest


def case_of(item: pytest.Item) -> Any | None:
    """The suite case an item runs (a budget's case for budget checks), or None (a plain test,
    or an empty expansion, which parametrizes NOTSET)."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    case = params.get("case") or getattr(params.get("budget"), "case", None)
    return case if hasattr(case, "variant") else None


def run_order(items: list[pytest.Item], models: tuple[Any, ...], dtypes: tuple[str, ...],
              variants: tuple[Any, ...]) -> list[pytest.Item]:
    """`items` grouped by (model, dtype, variant) in the selection's order; items without a case
    (plain tests) come first, in collection order. A name not in the selection (a check's own
    model, e.g. the distributed MoE config) goes after the selection's, in order of appearance."""
    model_rank = {model.name: i for i, model in enumerate(models)}
    dtype_rank = {dtype: i for i, dtype in enumerate(dtypes)}
    variant_rank = {variant.id: i for i, variant in enumerate(variants)}

    def rank(table: dict[str, int], name: str | None) -> int:
        if name is None:
            return -1
        return table.setdefault(name, len(table))

    def key(item: pytest.Item) -> tuple[int, int, int]:
        case = case_of(item)
        if case is None:
            return (-1, -1, -1)
        return (rank(model_rank, case.model.name), rank(dtype_rank, case.dtype),
                rank(variant_rank, case.variant.id))

    keys = {id(item): key(item) for item in items}  # in collection order: appearance ranks fixed
    return sorted(items, key=lambda item: keys[id(item)])
