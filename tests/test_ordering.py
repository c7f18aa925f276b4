"""Checks run grouped by model, dtype and variant, and the model cache loads each key once and
keeps at most two variants under test beside the golden runs and plain references."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conformance import running, timing
from conformance.ordering import run_order
from conformance.variants import GOLDEN, REGISTRY
from conformance.zoo import ZooModel


def _item(name: str, model: str | None, dtype: str | None = None, variant: str | None = None) -> Any:
    case = None if model is None else SimpleNamespace(
        model=SimpleNamespace(name=model), dtype=dtype, variant=SimpleNamespace(id=variant))
    return SimpleNamespace(name=name, callspec=SimpleNamespace(params={"case": case}))


def test_items_are_grouped_by_model_dtype_variant_and_stable_within() -> None:
    models = (SimpleNamespace(name="llama"), SimpleNamespace(name="bert"))
    variants = (SimpleNamespace(id="eager"), SimpleNamespace(id="sdpa"))
    items = [  # collection order: module by module, models interleaved
        _item("logits-bert-sdpa-fp32", "bert", "fp32", "sdpa"),
        _item("logits-llama-sdpa-bf16", "llama", "bf16", "sdpa"),
        _item("plain", None),
        _item("logits-llama-eager-fp32", "llama", "fp32", "eager"),
        _item("cache-llama-sdpa-fp32", "llama", "fp32", "sdpa"),
        _item("moe-mixtral-tp2-fp32", "mixtral", "fp32", "tp2"),
        _item("logits-llama-sdpa-fp32", "llama", "fp32", "sdpa"),
    ]
    ordered = [i.name for i in run_order(items, models, ("fp32", "bf16"), variants)]
    assert ordered == ["plain", "logits-llama-eager-fp32", "cache-llama-sdpa-fp32",
                       "logits-llama-sdpa-fp32", "logits-llama-sdpa-bf16", "logits-bert-sdpa-fp32",
                       "moe-mixtral-tp2-fp32"]


def test_model_cache_loads_each_key_once_and_bounds_variants(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    made: list[str] = []

    def fake_load(zoo_model: Any, variant: Any, dtype: str, device: str, workdir: Path) -> Any:
        made.append(variant.id)
        return running.Loaded(SimpleNamespace(forward=lambda input_ids: None), zoo_model, variant,
                              dtype, device)

    monkeypatch.setattr(running, "load", fake_load)
    cache = running.ModelCache(tmp_path, "cpu")
    llama = ZooModel("llama", "decoder", "config", "unused")
    timing.open_ledger()
    for name in ("eager", "sdpa", "sdpa", "sdpa_math", "sdpa_math", "sdpa_flash", "eager"):
        cache.get(llama, REGISTRY[name], "fp32")
        cache.golden(llama, "fp32")
    spent = timing.close_ledger()
    assert made == ["eager", "golden", "sdpa", "sdpa_math", "sdpa_flash"]
    resident = {key[1] for key in cache._loaded}
    assert resident == {"eager", GOLDEN.id, "sdpa_math", "sdpa_flash"}
    counts = timing.totals([{"metrics": spent}])["counts"]
    assert (counts["cache_loads"], counts["cache_keys"], counts["cache_reloads"]) == (5, 5, 0)
    cache.get(llama, REGISTRY["sdpa"], "fp32")  # evicted: asked again, it is a reload
    assert made[-1] == "sdpa"
