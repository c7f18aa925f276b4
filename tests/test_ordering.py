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


def test_attention_variants_share_the_resident_references_weights(tmp_path: Path) -> None:
    """Where transformers can switch a model's attention (5.x), sdpa and its forced backends are
    copies of the plain reference sharing its weights: no read from disk, no weight memory. Their
    proofs still run; a write to a shared weight fails the forward. Elsewhere they load from disk."""
    import torch

    from conformance.zoo import default_zoo

    llama = next(model for model in default_zoo() if model.name == "llama")
    cache = running.ModelCache(tmp_path, "cpu")
    timing.open_ledger()
    reference = cache.get(llama, REGISTRY["eager"], "fp32")
    sdpa = cache.get(llama, REGISTRY["sdpa_math"], "fp32")
    counts = timing.close_ledger()["counts"]  # type: ignore[index]
    weights = dict(reference.model.named_parameters())
    switchable = hasattr(reference.model, "set_attn_implementation")
    shared = [name for name, p in sdpa.model.named_parameters() if p is weights[name]]
    assert sdpa.model is not reference.model
    assert reference.model.config._attn_implementation == "eager"
    assert sdpa.model.config._attn_implementation == "sdpa"
    if not switchable:  # transformers 4.x: the variant is its own load
        assert (counts["cache_loads"], counts["built"], shared, sdpa.shared) == (2, 0, [], ())
        return
    assert (counts["cache_loads"], counts["built"]) == (1, 1)
    assert shared == list(weights) and sdpa.shared
    ids, mask = torch.tensor([[3, 5, 7, 11]]), torch.ones(1, 4, dtype=torch.long)
    plain = running.forward_ids(reference, ids, mask)
    assert torch.allclose(running.forward_ids(sdpa, ids, mask), plain, atol=1e-5)
    with torch.no_grad():
        weights["model.norm.weight"].mul_(1.0)  # an in-place write, even one that changes no value
    with pytest.raises(pytest.fail.Exception, match="model.norm.weight, a weight sdpa_math shares"):
        running.forward_ids(sdpa, ids, mask)
    buffers = dict(reference.model.named_buffers())
    assert all(b is not buffers[name] for name, b in sdpa.model.named_buffers())  # a forward may write them
    fresh = cache.get(llama, REGISTRY["sdpa_math"], "fp32", from_pretrained=True)  # a refusal check's load
    assert fresh is not sdpa and not fresh.shared
    assert cache.get(llama, REGISTRY["sdpa_math"], "fp32") is fresh
