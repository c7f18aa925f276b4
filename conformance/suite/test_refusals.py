"""C02: FlashAttention-2 (and FlashAttention-4, the same promise) runs only fp16/bf16 weights on
supported GPUs; anything else must fail clearly (an exception that names flash attention), never
load or compute another path silently.

Runs everywhere: on a CPU machine (flash-attn absent or no GPU) and on a GPU in float32, the
request must be refused; where FA2 can run (a supported GPU in half precision) the case does not
apply, and the logits checks of `fa2` cover it.
"""

from __future__ import annotations

from typing import Any

import pytest

from conformance.cases import Case
from conformance.needs import missing_packages
from conformance.running import LoadError, ModelCache, forward
from conformance.strategies import BatchSpec
from conformance.variants import REGISTRY

FLASH_WORDS = ("flash", "Flash", "FLASH")


def _requests(env: Any, dtype: str) -> list[Any]:
    """The registry's FlashAttention-2 spellings (claim C01) this stack has (flash-attn itself
    aside), that cannot run here: each must be refused."""
    out = []
    for variant in REGISTRY.values():
        if "C01" not in variant.claims:
            continue
        api = {k: v for k, v in variant.needs.packages.items() if k != "flash-attn"}
        if missing_packages(api) or variant.needs.unmet(env, dtype) is None:
            continue
        out.append(variant)
    return out


@pytest.mark.cases(variant_filter=lambda variant: variant.id == "eager", kinds=frozenset({"decoder"}),
                   claims=("C02",))
def test_fa2_refuses_what_it_cannot_run(case: Case, model_cache: ModelCache, conformance_selection: Any,
                                        metrics: dict[str, Any]) -> None:
    requests = _requests(conformance_selection.env, case.dtype)
    if not requests:
        pytest.skip("not applicable: FlashAttention-2 can run this dtype on this device, or this "
                    "stack has no spelling for it (test_logits[...-fa2-...] covers where it runs)")
    problems = []
    for request in requests:
        problem, figures = _refused_clearly(model_cache, case, request)
        metrics[request.id] = figures
        if problem:
            problems.append(problem)
    assert not problems, f"{case.id}: " + "; ".join(problems)


def _refused_clearly(cache: ModelCache, case: Case, request: Any) -> tuple[str | None, dict[str, Any]]:
    try:
        # from_pretrained's own refusal (C02), never a switch of the resident reference
        loaded = cache.get(case.model, request, case.dtype, from_pretrained=True)
    except LoadError as exc:
        message = str(exc)
        if not any(word in message for word in FLASH_WORDS):
            return f"{request.id}: the refusal does not say it is about flash attention: {message}", {}
        return None, {"refused_at": "load", "message": message}
    implementation = getattr(loaded.model.config, "_attn_implementation", None)
    asked = _asked_implementation(request)
    if implementation != asked:
        return (f"{request.id}: asked for {asked} in {case.dtype} on {loaded.device}, got a "
                f"model silently running {implementation!r}"), {"silently": implementation}
    try:
        forward(loaded, BatchSpec((8,), "none"))
    except Exception as exc:  # the kernel's own refusal (e.g. "only supports fp16 and bf16")
        return None, {"refused_at": "forward",
                      "message": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return (f"{request.id}: {asked} loaded and computed in {case.dtype} on {loaded.device} "
            "without any error (C02 promises a clear failure)"), {"refused_at": None}


def _asked_implementation(request: Any) -> str:
    """The implementation a flash request asks for, from what the record needs: flash-attn-4 is
    FlashAttention-4's package, everything else in C01 is FlashAttention-2 (a record's load
    kwargs are what it does, not what it promises)."""
    return "flash_attention_4" if "flash-attn-4" in request.needs.packages else "flash_attention_2"


# bitsandbytes requests, one per format and spelling: C10/C11's misuse case
QUANTIZED_REQUESTS = ("bnb_int8", "bnb_nf4", "load_in_8bit", "load_in_4bit")
# what a clear refusal names: the device or backend the library cannot serve
DEVICE_WORDS = ("GPU", "CUDA", "cuda", "device", "backend", "CPU", "cpu")
# exception types that are the library's own words; the rest (AttributeError, TypeError, ...) are
# an internal error escaping, which tells the user nothing about what to change
CLEAR_TYPES = (ImportError, RuntimeError, ValueError, NotImplementedError, OSError)


def _unserved(env: Any) -> list[Any]:
    """The bitsandbytes requests this stack spells, whose bitsandbytes/transformers pair cannot
    quantize on this device (the record's device-specific needs are unmet)."""
    out = []
    for vid in QUANTIZED_REQUESTS:
        variant = REGISTRY[vid]
        if missing_packages(variant.needs.packages):
            continue  # another stack's spelling
        if missing_packages(variant.needs.packages_on.get(env.kind, {})):
            out.append(variant)
    return out


@pytest.mark.cases(variant_filter=lambda variant: variant.id == "eager", kinds=frozenset({"decoder"}),
                   model_filter=lambda model: model.trained, claims=("C10", "C11"))
def test_quantization_refuses_unserved_device(case: Case, model_cache: ModelCache,
                                              conformance_selection: Any, metrics: dict[str, Any]) -> None:
    """Quantizing on a device the installed transformers + bitsandbytes cannot serve fails with a
    clear error (the library's own exception, naming the device or backend), recorded in
    report.json, rather than an internal error or a silently unquantized model."""
    requests = _unserved(conformance_selection.env)
    if not requests:
        pytest.skip("not applicable: this stack's bitsandbytes quantizes on this device (the "
                    "quantization checks cover it)")
    problems = []
    for request in requests:
        try:
            cache_loaded = model_cache.get(case.model, request, case.dtype)
        except LoadError as exc:
            cause = exc.__cause__
            message = str(exc)
            metrics[request.id] = {"error": f"{type(cause).__name__}: {message.split(': ', 2)[-1]}"}
            if not isinstance(cause, CLEAR_TYPES) or not any(w in message for w in DEVICE_WORDS):
                problems.append(f"{request.id}: an unclear error, not a refusal naming the device: "
                                f"{message}")
            continue
        layers = sum("bit" in type(m).__name__ for m in cache_loaded.model.modules())
        metrics[request.id] = {"loaded": True, "bitsandbytes_layers": layers}
        problems.append(f"{request.id}: loaded on {cache_loaded.device} although this stack's needs for "
                        f"bitsandbytes there are unmet ({layers} bitsandbytes layers): check the registry")
    assert not problems, f"{case.id}: " + "; ".join(problems)
