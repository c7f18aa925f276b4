"""Quantization conformance (C10 LLM.int8, C11 4-bit): the memory a scheme saves, computed from
first principles; how far its answers move on real weights; its knobs honoured; misuse refused.

Claims come from each case's variant (C10 for int8, C11 for 4-bit)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from conformance import arithmetic, footprint, quality, tolerances
from conformance.cases import Case
from conformance.checks import load_golden, load_or_skip, unrefused
from conformance.running import Loaded, LoadError, ModelCache, load
from conformance.variants import KINDS, REFERENCE, REGISTRY, Variant


def _quantized(variant: Variant) -> bool:
    return variant.tolerance in tolerances.QUANT


def _four_bit(variant: Variant) -> bool:
    return variant.tolerance in ("nf4", "fp4")


def _trained(model: Any) -> bool:
    return bool(model.trained)


def _get(cache: ModelCache, case: Case, variant: Variant, dtype: str | None = None,
         device: str | None = None) -> Loaded:
    return load_or_skip(lambda: cache.get(case.model, variant, dtype or case.dtype, device=device))


def _fresh(cache: ModelCache, case: Case) -> Loaded:
    """A load of its own, untouched by any forward: a 4-bit layer repacks its state on its first
    forward on CPU and LLM.int8 drops SCB, so the cached (used) copy no longer shows the load."""
    return load_or_skip(lambda: load(case.model, case.variant, case.dtype, cache.device, cache.workdir))


def _scheme(case: Case) -> footprint.Scheme:
    from conformance.compat import parse_dtype

    scheme = footprint.scheme_of(case.variant.load_kwargs(parse_dtype(case.dtype)))
    assert scheme is not None, f"{case.variant.id} asks for no bitsandbytes quantization"
    return scheme


@pytest.mark.cases(variant_filter=_quantized, kinds=KINDS)
def test_quantized_footprint(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    """get_memory_footprint() and the quantization state equal the bytes computed from the
    full-precision model's inventory; at least one layer is quantized, so memory shrinks."""
    import torch

    full = _get(model_cache, case, REGISTRY[REFERENCE])
    want = footprint.expected(full.model, _scheme(case))
    cuda = model_cache.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(model_cache.device)
    loaded = _fresh(model_cache, case)
    model = loaded.model
    got_layers = footprint.quantized_layers(model)
    got, got_state = int(model.get_memory_footprint()), footprint.measured_state_bytes(model)
    metrics.update({
        "footprint_bytes": got, "expected_footprint_bytes": want["footprint"],
        "state_bytes": got_state, "expected_state_bytes": want["state_bytes"],
        "full_precision_bytes": want["full_footprint"],
        "footprint_ratio": got / want["full_footprint"],
        "total_ratio": (got + got_state) / want["full_footprint"],
        "quantized_layers": len(got_layers), "expected_quantized_layers": len(want["quantized_layers"]),
        "tolerance_bytes": tolerances.FOOTPRINT_BYTES,
    })
    if cuda:
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated(model_cache.device) - before
        metrics["cuda_allocated_bytes"] = allocated
        assert allocated < want["full_footprint"], (
            f"{case.id}: {allocated} bytes allocated on {model_cache.device} after load, not less "
            f"than the full-precision model's {want['full_footprint']}")
    del loaded, model
    missing = sorted(set(want["quantized_layers"]) - set(got_layers))
    extra = sorted(set(got_layers) - set(want["quantized_layers"]))
    assert not missing and not extra, (
        f"{case.id}: layers left in full precision: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        f"; layers quantized that should not be: {extra[:5]} "
        f"({len(got_layers)} quantized, {len(want['quantized_layers'])} expected)")
    assert got_layers, (f"{case.id}: no layer quantized, footprint {got} bytes = the full-precision "
                        "model's: the scheme saves nothing")
    diff = got - want["footprint"]
    assert abs(diff) <= tolerances.FOOTPRINT_BYTES, (
        f"{case.id}: get_memory_footprint() = {got} bytes, expected {want['footprint']} from first "
        f"principles (difference {diff:+d} bytes)")
    diff = got_state - want["state_bytes"]
    assert abs(diff) <= tolerances.FOOTPRINT_BYTES, (
        f"{case.id}: quantization state holds {got_state} bytes, expected {want['state_bytes']} "
        f"(difference {diff:+d} bytes)")


_GOLDEN: dict[tuple[str, str], Any] = {}


@pytest.mark.cases(variant_filter=_quantized, model_filter=_trained, kinds=KINDS)
def test_quantized_quality(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    """On real weights and shipped text: KL, top-1 agreement and perplexity ratio (decoders) or
    embedding cosine (encoders) against the golden run, within the scheme's measured bounds."""
    scheme = case.variant.tolerance
    bound = tolerances.quality(scheme, case.variant.id)
    golden = load_golden(model_cache, case.model, "fp64")  # eager float64 on CPU, any device
    variant = _get(model_cache, case, case.variant)
    location = case.model.location
    if case.model.kind == "decoder":
        ids = quality.decoder_inputs(location)
        inputs = {"input_ids": ids}
    elif case.model.kind == "seq2seq":
        inputs = quality.seq2seq_inputs(location)
        ids = inputs["decoder_input_ids"]
    else:
        inputs = quality.encoder_inputs(location)
    key = (case.model.name, case.model.location)
    if key not in _GOLDEN:  # one golden run per model, shared by every scheme and dtype
        _GOLDEN.clear()
        _GOLDEN[key] = quality.run(golden, inputs)
    want = _GOLDEN[key]
    got = unrefused(variant, lambda: quality.run(variant, inputs))
    if case.model.kind in ("decoder", "seq2seq"):
        figures = quality.decoder_figures(got, want, ids)
        limits = {"mean_kl": (bound.max_mean_kl, "<="), "top1_agreement": (bound.min_top1, ">="),
                  "perplexity_ratio": (bound.max_perplexity_ratio, "<=")}
    else:
        figures = quality.encoder_figures(got, want, inputs["attention_mask"])
        limits = {"min_cosine": (bound.min_cosine, ">="),
                  "mean_cosine": (bound.min_mean_cosine, ">=")}
    metrics.update(figures)
    metrics["bounds"] = {name: limit for name, (limit, _) in limits.items()}
    unmeasured = [name for name, (limit, _) in limits.items() if limit is None]
    if unmeasured:
        pytest.skip(f"no measured {scheme} bound for {case.model.kind}s ({', '.join(unmeasured)}): "
                    "figures recorded, not judged (conformance/tolerances.py QUALITY)")
    broken = [f"{name} {figures[name]:.4g} (bound {op} {limit})" for name, (limit, op) in limits.items()
              if (figures[name] > limit if op == "<=" else figures[name] < limit)]
    assert not broken, f"{case.id}: {scheme} quality out of bounds vs the golden run: {'; '.join(broken)}"


class _Bnb4bitInputs:
    """Records the dtype of the activation each bitsandbytes 4-bit op receives."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        seen: Counter[str] = Counter()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                name = func._schema.name if hasattr(func, "_schema") else str(func)
                if name.startswith("bitsandbytes::") and "4bit" in name and args:
                    seen[str(args[0].dtype).removeprefix("torch.")] += 1
                return func(*args, **(kwargs or {}))

        self.seen = seen
        self.mode = Mode()


@pytest.mark.cases(variant_filter=_four_bit, kinds=KINDS)
def test_quantized_compute_dtype(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    """bnb_4bit_compute_dtype is honoured: every Linear4bit holds it, the 4-bit ops receive
    their activations in it (not silently in the run dtype), and the layers' arithmetic keeps
    its precision (an input step only it resolves moves the output: conformance/arithmetic.py),
    not a coarser dtype's cast inside the kernel."""
    import torch

    from conformance.compat import parse_dtype, short_name
    from conformance.running import forward
    from conformance.strategies import BatchSpec

    config = case.variant.load_kwargs(parse_dtype(case.dtype)).get("quantization_config")
    if config is None:
        pytest.skip(f"{case.variant.id} sets no quantization config: no compute dtype requested")
    requested = str(config.bnb_4bit_compute_dtype or torch.float32).removeprefix("torch.")
    variant = _get(model_cache, case, case.variant)
    if not footprint.quantized_layers(variant.model):
        pytest.skip(f"{case.id}: the load quantized nothing (test_quantized_footprint judges that)")
    held = Counter(str(m.compute_dtype).removeprefix("torch.") for m in variant.model.modules()
                   if type(m).__name__ == "Linear4bit")
    probe = _Bnb4bitInputs()
    unrefused(variant, lambda: forward(variant, BatchSpec((8,), "none"), probe.mode))
    metrics.update({"requested_compute_dtype": requested, "layers_compute_dtype": dict(held),
                    "op_input_dtypes": dict(probe.seen)})
    assert set(held) <= {requested}, (
        f"{case.id}: compute dtype {requested} requested, Linear4bit layers hold {dict(held)}")
    assert probe.seen, f"{case.id}: no bitsandbytes 4-bit op ran"
    assert set(probe.seen) == {requested}, (
        f"{case.id}: compute dtype {requested} requested, bitsandbytes 4-bit ops received "
        f"activations in {dict(probe.seen)}")
    measured = arithmetic.four_bit_precision(variant.model)
    assert measured is not None
    kept, layer = measured
    metrics.update({"kept_precision": kept, "kept_precision_layer": layer})
    want = short_name(config.bnb_4bit_compute_dtype or torch.float32)
    assert arithmetic.keeps(kept, want), (
        f"{case.id}: compute dtype {requested} requested, but {layer}'s arithmetic keeps only "
        f"{kept}'s precision (an input step of {arithmetic.step(want):g} at 1.0 does not move its "
        f"output, at {' and '.join(map(str, arithmetic.ROWS))} rows)")


CASTS = {
    "half()": lambda model: model.half(),
    "to(float16)": lambda model: model.to(__import__("torch").float16),
}
# transformers' documented refusal to cast a bitsandbytes model (modeling_utils.py): ValueError
CAST_REFUSALS = ("is not supported for quantized model", "You cannot cast a bitsandbytes model")


@pytest.mark.cases(variant_filter=_quantized, model_filter=_trained, kinds=KINDS)  # a library rule
def test_quantized_cast_refused(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    """Casting a quantized model (.half(), .to(float16)) raises transformers' documented
    ValueError instead of silently dequantizing or corrupting the packed weights."""
    loaded = _fresh(model_cache, case)  # a failed refusal would change the model: not the cache's
    if not footprint.quantized_layers(loaded.model):
        pytest.skip(f"{case.id}: the load quantized nothing (test_quantized_footprint judges that)")
    for cast, apply in CASTS.items():
        with pytest.raises(ValueError) as raised:
            apply(loaded.model)
        message = str(raised.value).splitlines()[0]
        metrics[f"error_{cast}"] = f"ValueError: {message}"
        assert any(marker in message for marker in CAST_REFUSALS), (
            f"{case.id}: .{cast} raised ValueError without the documented message: {message}")


# transformers' documented refusal (its bitsandbytes quantizer) when device_map="auto" plans part
# of a quantized model off the main device: a ValueError naming llm_int8_enable_fp32_cpu_offload
SPILL_REFUSAL = "Some modules are dispatched on the CPU or the disk"
CAP_SCHEMES = frozenset({"bnb_int8", "bnb_nf4"})  # one per bitsandbytes format: the rule is shared


# transformers' bitsandbytes quantizers (4-bit and 8-bit, 4.36 to 5.24) hand the device-map
# planner 90% of each max_memory entry (`adjust_max_memory`)
BNB_PLANNED_SHARE = 0.90


@pytest.mark.C12
@pytest.mark.cases(variant_filter=lambda variant: variant.id in CAP_SCHEMES, kinds=KINDS)
def test_quantized_memory_cap(case: Case, model_cache: ModelCache, metrics: dict[str, Any],
                              tmp_path: Any) -> None:
    """C12 on one device: device_map="auto" with a max_memory cap the quantized model fits and
    the full-precision one does not. The planner must count quantized sizes, so every module
    stays on the device, within the cap; a cap below the quantized size must not spill silently
    (transformers refuses with its documented error, or what it loads stays within the cap)."""
    import torch

    from conformance import placement
    from conformance.zoo import materialize

    full = _get(model_cache, case, REGISTRY[REFERENCE])
    want = footprint.expected(full.model, _scheme(case))
    quantized, whole = want["footprint"] + want["state_bytes"], want["full_footprint"]
    if quantized >= whole:
        pytest.skip(f"{case.id}: the scheme quantizes no layer of {case.model.name}, so no cap tells "
                    "quantized from full-precision sizes (test_quantized_footprint reports it)")
    main = torch.device(model_cache.device).index or 0 if model_cache.device.startswith("cuda") else "cpu"
    source = materialize(case.model, model_cache.workdir)

    def resident(model: Any, before: dict[str, int]) -> int:
        if main == "cpu":
            return placement.resident_bytes(model, "cpu") + footprint.measured_state_bytes(model)
        key = placement.device_key(main)
        return placement.gpu_allocated().get(key, 0) - before.get(key, 0)

    # bitsandbytes' quantizers plan with 90% of max_memory (adjust_max_memory: room for the
    # buffers quantizing creates), so the quantized model fits a cap of quantized / 0.9
    needed = int(quantized / BNB_PLANNED_SHARE) + 1
    if needed >= whole:
        pytest.skip(f"{case.id}: the quantized model ({quantized} bytes) needs a cap of {needed} "
                    f"(bitsandbytes plans with {BNB_PLANNED_SHARE:.0%} of max_memory), which the "
                    f"full-precision one ({whole}) fits too: {case.model.name} has too little "
                    "quantizable weight for a cap to tell them apart")
    fits = (needed + whole) // 2
    metrics.update(quantized_bytes=quantized, full_precision_bytes=whole, cap_fits=fits)

    def load_capped(cap: int, folder: str) -> tuple[Loaded | None, str]:
        try:
            return placement.load_placed(case.model, case.variant, case.dtype, source,
                                         model_cache.device, device_map="auto", max_memory={main: cap},
                                         offload_folder=str(tmp_path / folder))[0], ""
        except LoadError as exc:
            return None, str(exc)

    before = placement.gpu_allocated()
    loaded, error = load_capped(fits, "fits")
    if loaded is None:
        pytest.fail(f"{case.id}: a cap of {fits} bytes holds the quantized model ({quantized} bytes) "
                    f"but not the full-precision one ({whole}); the load failed: {error}", pytrace=False)
    where = getattr(loaded.model, "hf_device_map", {"": main})
    home = placement.device_key(main)
    elsewhere = {name: dev for name, dev in where.items() if placement.device_key(dev) != home}
    used = resident(loaded.model, before)
    metrics.update(placement={k: placement.device_key(v) for k, v in where.items()}, resident_bytes=used)
    del loaded
    placement.free_accelerator_memory()
    assert not elsewhere, (
        f"{case.id}: max_memory={{{main!r}: {fits}}} holds the quantized model ({quantized} bytes), yet "
        f"modules were planned elsewhere: {dict(list(elsewhere.items())[:4])} (sizes counted at full "
        f"precision, {whole} bytes?)")
    assert used <= fits, f"{case.id}: {used} bytes resident on {main} after load, over the cap {fits}"

    tight = quantized // 3
    metrics["cap_tight"] = tight
    before = placement.gpu_allocated()
    loaded, error = load_capped(tight, "tight")
    if loaded is None:
        metrics["tight_cap_error"] = error[error.find("ValueError"):] if "ValueError" in error else error
        assert SPILL_REFUSAL in error, (
            f"{case.id}: a cap below the quantized size failed without transformers' documented "
            f"refusal: {error}")
        return
    used = resident(loaded.model, before)
    metrics["tight_resident_bytes"] = used
    assert used <= tight, (
        f"{case.id}: max_memory={{{main!r}: {tight}}} loaded with {used} bytes resident on {main}")
