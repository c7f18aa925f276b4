"""The cases a check expands over: model x variant x dtype (x padding), with human ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conformance.environment import Environment
from conformance.variants import DEFAULT_KINDS, Variant
from conformance.zoo import ZooModel

PAD_IDS = {"none": "nopad", "right": "pad_right", "left": "pad_left"}


@dataclass(frozen=True)
class Case:
    model: ZooModel
    variant: Variant
    dtype: str
    padding: str | None = None

    @property
    def id(self) -> str:
        parts = [self.model.name, self.variant.id, self.dtype]
        if self.padding is not None:
            parts.append(PAD_IDS[self.padding])
        return "-".join(parts)

    @property
    def claims(self) -> tuple[str, ...]:
        return self.variant.claims


@dataclass(frozen=True)
class Selection:
    """What this run covers, decided once from the command line."""

    models: tuple[ZooModel, ...]
    variants: tuple[Variant, ...]
    dtypes: tuple[str, ...]
    env: Environment
    # --dtype given or the nightly profile: every model in every dtype (else a model's own
    # default_dtypes, e.g. the families in fp32 only, keep the default run's time)
    every_dtype: bool = False

    def model_dtypes(self, model: ZooModel, dtypes: tuple[str, ...] | None = None) -> tuple[str, ...]:
        chosen = dtypes or self.dtypes
        if self.every_dtype or not model.default_dtypes or dtypes is not None:
            return chosen
        return tuple(d for d in chosen if d in model.default_dtypes)


def expand(
    selection: Selection,
    paddings: tuple[str, ...] | None = None,
    kinds: frozenset[str] | None = None,
    variant_filter: Any = None,
    model_filter: Any = None,
    dtypes: tuple[str, ...] | None = None,
    distributed: bool = False,
    model_source: Any = None,
) -> list[tuple[Case, str | None]]:
    """(case, skip reason or None) for every applicable combination, in a stable order; `dtypes`
    replaces the run's dtypes for a check that runs in its own (float64 agreement). Distributed
    variants (sharded over several processes) expand only for checks that ask for them
    (`distributed=True`, test_distributed.py), and such a check gets only them; `model_source`
    (selection -> models) replaces the run's models (the distributed checks add their MoE model)."""
    out = []
    kinds = kinds if kinds is not None else DEFAULT_KINDS  # a check takes seq2seq models by name
    for model in (model_source(selection) if model_source is not None else selection.models):
        if model.kind not in kinds:
            continue
        if model_filter is not None and not model_filter(model):
            continue
        model_reason = model.unmet()  # the stack lacks its architecture: every case skips
        for variant in selection.variants:
            if model.kind not in variant.kinds:
                continue
            if (variant.distributed is not None) != distributed:
                continue
            if variant_filter is not None and not variant_filter(variant):
                continue
            for dtype in selection.model_dtypes(model, dtypes):
                reason = model_reason or variant.needs.unmet(selection.env, dtype)
                for padding in paddings or (None,):
                    out.append((Case(model, variant, dtype, padding), reason))
    return out
