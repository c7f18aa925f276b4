"""Round-trips (C07, C16): a converted, reversed, saved or reloaded model is the same model.

C07: ``to_bettertransformer()`` then ``reverse_bettertransformer()`` gives back the module tree,
the state_dict and the outputs of a copy that was never converted; the converted model refuses
``save_pretrained`` with optimum's documented error; the reversed one saves and reloads the same.
C16: plain and quantized models survive ``save_pretrained`` / ``from_pretrained`` bitwise
(safetensors, sharded, tied heads, dtype, quantization state, memory footprint), and a damaged
checkpoint fails in one line that names the damage. Every checkpoint lives in a temporary
directory removed when the test ends.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from conformance import compare, roundtrip
from conformance.cases import Case
from conformance.checks import attempt, golden_outputs, load_or_fail, load_or_skip, run_proven
from conformance.running import Loaded, LoadError, ModelCache, forward, load
from conformance.strategies import BatchSpec
from conformance.variants import KINDS, NO_SUCH_IMPLEMENTATION, REFERENCE, REGISTRY, Variant
from conformance.zoo import ZooModel

# one padded batch: every round-trip compares outputs on it (row lengths need no kernel tile)
BATCH = BatchSpec((12, 7), "right", seed=16)
SHARDS = 3  # sharded saves use a max_shard_size small enough for at least this many shards


def _plain(variant: Variant) -> bool:
    """A model save/load applies to as is: a transformers model (not another runtime's), loaded
    by from_pretrained, unquantized, unconverted, run outside any context (variants that only
    force a kernel around the forward save the same checkpoint as `sdpa`)."""
    return (variant.post_load is None and not variant.place_with_device_map
            and getattr(variant, "loader", None) is None
            and variant.context is contextlib.nullcontext)


def _quantized(variant: Variant) -> bool:
    # a quantized model converted after loading (4-bit + BetterTransformer) cannot be saved by
    # design (C07); its quantized base is round-tripped by the plain scheme's cases
    return variant.place_with_device_map and variant.post_load is None


def _reversible(variant: Variant) -> bool:
    return variant.reverse is not None


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A temporary directory for checkpoints, removed when the test ends (pass or fail)."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def _fresh(cache: ModelCache, case: Case, variant: Variant | None = None) -> Loaded:
    """A load of our own (never the shared cache's: round-trips mutate, and a model that already
    ran may hold repacked weights); a refusal is a skip, a failure one line."""
    return load_or_skip(lambda: load(case.model, variant or case.variant, case.dtype, cache.device,
                                     cache.workdir))


def _reload(case: Case, cache: ModelCache, path: Path, variant: Variant | None = None,
            **extra: Any) -> Loaded:
    return load_or_skip(lambda: roundtrip.reload(case.model, variant or case.variant, case.dtype,
                                                 cache.device, path, cache.workdir, extra=extra),
                        failure=f"{case.id}: reload failed: {{}}")


def _outputs(loaded: Loaded) -> tuple[Any, str | None]:
    """Outputs on BATCH, or the path's documented refusal of the input."""
    return attempt(loaded, lambda: forward(loaded, BATCH))


def _check(case: Case, step: str, problem: str | None) -> None:
    __tracebackhide__ = True
    if problem:
        raise AssertionError(f"{case.id}: {step}: {problem}")


def _same_state(case: Case, step: str, expected: dict[str, Any], model: Any,
                metrics: dict[str, Any]) -> None:
    __tracebackhide__ = True
    problem, figures = roundtrip.state_difference(expected, roundtrip.state_snapshot(model))
    metrics.update(figures)
    _check(case, step, problem)


def _same_outputs(case: Case, step: str, expected: Any, found: Any, metrics: dict[str, Any]) -> None:
    __tracebackhide__ = True
    problem, figures = roundtrip.output_difference(expected, found)
    metrics.update({f"{step}_{k}": v for k, v in figures.items()})
    _check(case, step, problem)


# --- C07: BetterTransformer and back ------------------------------------------------------------


@pytest.mark.cases(claims=("C07",), variant_filter=_reversible, kinds=KINDS)
def test_bettertransformer_roundtrip(
    case: Case, model_cache: ModelCache, metrics: dict[str, Any], scratch: Path
) -> None:
    """Convert, refuse to save, reverse, save, reload: each stage against a copy that was never
    converted (conversion is in place, so a model compared with itself would prove nothing)."""
    plain = replace(case.variant, post_load=None)
    original = _fresh(model_cache, case, plain)  # never converted: the reference
    tree, state = roundtrip.module_tree(original.model), roundtrip.state_snapshot(original.model)
    expected, refused = _outputs(original)
    assert refused is None, f"{case.id}: the unconverted model refused the batch: {refused}"

    converted = _fresh(model_cache, case)  # a second copy: conversion works in place
    changed = roundtrip.tree_difference(tree, roundtrip.module_tree(converted.model))
    metrics["conversion"] = changed
    assert changed, f"{case.id}: to_bettertransformer() replaced no module: there is nothing to reverse"

    refusal = _save_refusal(converted.model, scratch / "converted")
    metrics["save_refusal"] = refusal
    assert refusal.startswith("refused"), f"{case.id}: save_pretrained on a converted model {refusal}"

    converted.model = case.variant.reverse(converted.model)
    _check(case, "after reverse, module tree",
           roundtrip.tree_difference(tree, roundtrip.module_tree(converted.model)))
    _same_state(case, "after reverse, state_dict", state, converted.model, metrics)
    _same_outputs(case, "reversed", expected, forward(converted, BATCH), metrics)

    roundtrip.save(case.variant, converted.model, scratch / "reversed")
    files = roundtrip.checkpoint_files(scratch / "reversed")
    metrics["checkpoint_bytes"] = files["checkpoint_bytes"]
    again = _reload(case, model_cache, scratch / "reversed", plain)
    _check(case, "reloaded, module tree", roundtrip.tree_difference(tree, roundtrip.module_tree(again.model)))
    _same_state(case, "reloaded, state_dict", state, again.model, metrics)
    _same_outputs(case, "reloaded", expected, forward(again, BATCH), metrics)


def _save_refusal(model: Any, path: Path) -> str:
    """'refused: <message>' when save_pretrained raises optimum's documented error, else what
    happened instead (saved weights, or another error)."""
    try:
        model.save_pretrained(str(path))
    except Exception as exc:
        text = " ".join(str(exc).split())
        if roundtrip.BT_SAVE_REFUSAL in text:
            written = roundtrip.checkpoint_files(path)["weight_files"] if path.is_dir() else []
            return f"wrote {written} before refusing" if written else f"refused: {text[:160]}"
        return f"failed with another error than the documented one: {type(exc).__name__}: {text[:200]}"
    return (f"succeeded (wrote {roundtrip.checkpoint_files(path)['weight_files']}); the documented "
            f"error ('{roundtrip.BT_SAVE_REFUSAL}') was not raised")


# --- C16: plain save / load ----------------------------------------------------------------------


@pytest.mark.cases(claims=("C16",), variant_filter=_plain, kinds=KINDS)
def test_save_load(case: Case, model_cache: ModelCache, metrics: dict[str, Any], scratch: Path) -> None:
    """safetensors and sharded checkpoints reload bitwise (state, tied head, dtype via
    dtype="auto", outputs); the sharded one, reloaded under another attention implementation,
    stays within that implementation's kernel tolerance of the golden run."""
    variant, reference, golden = load_or_fail(model_cache, case)
    state = roundtrip.state_snapshot(variant.model)
    expected, refused = _outputs(variant)
    if refused:
        pytest.skip(refused)
    metrics["tied"] = bool(roundtrip.tied(variant.model))

    roundtrip.save(case.variant, variant.model, scratch / "single")
    files = roundtrip.checkpoint_files(scratch / "single")
    metrics.update(weight_files=files["weight_files"], checkpoint_bytes=files["checkpoint_bytes"])
    assert files["safetensors"], f"{case.id}: save_pretrained wrote {files['weight_files']}, not safetensors"
    again = _reload(case, model_cache, scratch / "single")
    _check(case, "reloaded", roundtrip.tie_difference(variant.model, again.model))
    _same_state(case, "reloaded, state_dict", state, again.model, metrics)
    # the reload is the user's from_pretrained with the variant's kwargs: its path must run, also
    # where the model cache built the variant from the resident reference (conformance/sharing.py)
    metrics["reloaded_proof"] = {}
    _same_outputs(case, "reloaded", expected, run_proven(again, BATCH, metrics["reloaded_proof"]), metrics)

    shard_bytes = max(1, metrics["state_bytes"] // (SHARDS + 1))
    roundtrip.save(case.variant, variant.model, scratch / "sharded", max_shard_size=shard_bytes)
    shards = roundtrip.checkpoint_files(scratch / "sharded")
    metrics.update(shards=len(shards["shards"]), max_shard_size=shard_bytes)
    assert len(shards["shards"]) >= SHARDS and shards["safetensors"], (
        f"{case.id}: max_shard_size={shard_bytes} gave {shards['weight_files']} (index "
        f"{shards['index']}), not {SHARDS}+ safetensors shards")
    other = _other_attention(case.variant, case.dtype)
    metrics["reloaded_attention"] = other
    try:
        swapped = roundtrip.reload(case.model, case.variant, case.dtype, model_cache.device,
                                   scratch / "sharded", model_cache.workdir,
                                   extra={"attn_implementation": other})
    except LoadError as exc:
        if not any(marker in str(exc) for marker in NO_SUCH_IMPLEMENTATION):
            pytest.fail(f"{case.id}: reload failed: {exc}", pytrace=False)
        # the model has no other implementation (gemma2 on 5.x refuses sdpa): the sharded
        # checkpoint reloads under its own, and the rest of the check stands
        other = f"its own ({other} refused: {str(exc)[:120]})"
        metrics["reloaded_attention"] = other
        swapped = _reload(case, model_cache, scratch / "sharded")
    _check(case, f"sharded, reloaded with {other}", roundtrip.tie_difference(variant.model, swapped.model))
    _same_state(case, f"sharded, reloaded with {other}, state_dict", state, swapped.model, metrics)
    out, refused = _outputs(swapped)
    if refused:
        pytest.skip(f"checkpoints equal; {other} refused the batch: {refused}")
    real = BATCH.mask().bool()
    gold = golden_outputs(model_cache, golden, BATCH)
    plain = model_cache.outputs(reference, BATCH)
    problem = compare.finiteness(out, plain, gold, real)
    if problem is None:
        problem, figures = compare.kernel_verdict(out, plain, gold, real, case.dtype, case.model.kind)
        metrics.update({f"swapped_{k}": v for k, v in figures.items()})
    metrics["swapped_max_abs_diff_to_original"] = float((out - expected)[real].abs().max())
    _check(case, f"sharded, reloaded with {other}", problem)


def _other_attention(variant: Variant, dtype: str) -> str:
    from conformance.compat import parse_dtype

    own = variant.load_kwargs(parse_dtype(dtype)).get("attn_implementation", "sdpa")
    return "sdpa" if own == "eager" else "eager"


@pytest.mark.cases(claims=("C16",), kinds=frozenset({"decoder"}), variant_filter=lambda v: v.reference)
def test_tied_twin_save_load(
    case: Case, model_cache: ModelCache, metrics: dict[str, Any], scratch: Path
) -> None:
    """The case's decoder rebuilt with ``tie_word_embeddings=True`` (a llama that ties, as many
    small checkpoints do): its head stays tied through save/reload, and the reload is bitwise."""
    twin = _tied_twin(case.model, scratch)
    twin_case = replace(case, model=twin)
    loaded = _fresh(model_cache, twin_case)
    pair = roundtrip.tied(loaded.model)
    assert pair, f"{case.id}: the twin built with tie_word_embeddings=True is not tied"
    metrics["tied"] = list(pair)
    state = roundtrip.state_snapshot(loaded.model)
    expected, refused = _outputs(loaded)
    if refused:
        pytest.skip(refused)
    roundtrip.save(case.variant, loaded.model, scratch / "saved")
    again = _reload(twin_case, model_cache, scratch / "saved")
    _check(case, "tied twin reloaded", roundtrip.tie_difference(loaded.model, again.model))
    _same_state(case, "tied twin reloaded, state_dict", state, again.model, metrics)
    _same_outputs(case, "tied_twin", expected, forward(again, BATCH), metrics)


def _tied_twin(model: ZooModel, scratch: Path) -> ZooModel:
    """A zoo entry for the same architecture and size with tied embeddings (seeded weights)."""
    import json

    from transformers import AutoConfig

    from conformance.zoo import materialize

    if model.source == "config":
        raw = json.loads(Path(model.location).read_text())
    else:
        raw = AutoConfig.from_pretrained(materialize(model, scratch)).to_dict()
    raw["tie_word_embeddings"] = True
    raw.pop("_zoo", None)
    path = scratch / f"{model.name}-tied.json"
    path.write_text(json.dumps(raw))
    return ZooModel(f"{model.name}-tied", model.kind, "config", str(path))


# --- C16: quantized save / load ------------------------------------------------------------------


def _quantized_fresh(cache: ModelCache, case: Case) -> tuple[Loaded, dict[str, Any], dict[str, Any]]:
    """A fresh quantized load and its state and quantization state, taken before any forward:
    bitsandbytes' CPU 4-bit path repacks weights in place on the first forward."""
    fresh = _fresh(cache, case)
    quant = roundtrip.quant_states(fresh.model)
    if not quant:
        pytest.skip(f"{case.id}: nothing to round-trip: the load holds no bitsandbytes-quantized "
                    "module (a C10/C11 non-conformance, reported by test_logits)")
    return fresh, roundtrip.state_snapshot(fresh.model), quant


def _same_quantized(case: Case, step: str, fresh: Loaded, state: dict[str, Any],
                    quant: dict[str, Any], again: Loaded, metrics: dict[str, Any]) -> None:
    __tracebackhide__ = True
    problem, figures = roundtrip.quant_difference(quant, roundtrip.quant_states(again.model))
    metrics.update(figures)
    _check(case, f"{step}, quantization state", problem)
    _check(case, step, roundtrip.tie_difference(fresh.model, again.model))
    _same_state(case, f"{step}, state_dict", state, again.model, metrics)
    footprint = (fresh.model.get_memory_footprint(), again.model.get_memory_footprint())
    metrics["memory_footprint"] = footprint[0]
    _check(case, f"{step}, memory footprint", None if footprint[0] == footprint[1] else
           f"{footprint[1]} bytes (expected {footprint[0]})")


@pytest.mark.cases(claims=("C16",), variant_filter=_quantized, kinds=KINDS)
def test_quantized_save_load(
    case: Case, model_cache: ModelCache, metrics: dict[str, Any], scratch: Path
) -> None:
    """A quantized model saved right after loading reloads with every parameter, every
    quantization-state field and the memory footprint bitwise equal, and gives bitwise-equal
    outputs."""
    fresh, state, quant = _quantized_fresh(model_cache, case)
    roundtrip.save(case.variant, fresh.model, scratch / "saved")
    metrics["checkpoint_bytes"] = roundtrip.checkpoint_files(scratch / "saved")["checkpoint_bytes"]
    again = _reload(case, model_cache, scratch / "saved")
    _same_quantized(case, "reloaded", fresh, state, quant, again, metrics)
    expected, refused = _outputs(fresh)
    if refused:
        pytest.skip(f"checkpoint and quantization state equal; outputs not compared: {refused}")
    _same_outputs(case, "reloaded", expected, forward(again, BATCH), metrics)


@pytest.mark.cases(claims=("C16",), variant_filter=_quantized, kinds=KINDS)
def test_quantized_save_after_use(
    case: Case, model_cache: ModelCache, metrics: dict[str, Any], scratch: Path
) -> None:
    """A quantized model that has already run, then saved, reloads to the model as loaded and
    to the outputs it gave: using a model must not change what it saves."""
    fresh, state, quant = _quantized_fresh(model_cache, case)
    expected, refused = _outputs(fresh)
    if refused:
        pytest.skip(refused)
    roundtrip.save(case.variant, fresh.model, scratch / "used")
    again = _reload(case, model_cache, scratch / "used")
    state_problem, figures = roundtrip.state_difference(state, roundtrip.state_snapshot(again.model))
    metrics.update(figures)
    out_problem, figures = roundtrip.output_difference(expected, forward(again, BATCH))
    metrics.update(figures)
    problems = [p for p in (state_problem and f"checkpoint differs from the model as loaded: "
                            f"{state_problem}", out_problem) if p]
    _check(case, "saved after a forward, reloaded", "; ".join(problems) or None)


def _offloading(device: str, footprint: int, folder: Path) -> dict[str, Any]:
    """device_map="auto" under a max_memory of half the footprint: the rest goes to the CPU
    from a GPU, to disk from the CPU."""
    budget = max(1, footprint // 2)
    if device == "cpu":
        max_memory: dict[Any, int] = {"cpu": budget}
    else:
        max_memory = {int(device.partition(":")[2] or 0): budget, "cpu": 10 * budget}
    return {"device_map": "auto", "max_memory": max_memory, "offload_folder": str(folder)}


@pytest.mark.cases(claims=("C16",), variant_filter=_quantized, kinds=KINDS)
def test_quantized_reload_offloaded(
    case: Case, model_cache: ModelCache, metrics: dict[str, Any], scratch: Path
) -> None:
    """The saved quantized model reloaded under another device_map, with part of it offloaded,
    is the same model. Where the library refuses to offload a bitsandbytes model at all (it
    checks the device_map before reading any weight), the check is a skip quoting it."""
    probe = replace(case.variant, refusals=roundtrip.OFFLOAD_REFUSALS, load_kwargs=lambda dt: {
        **case.variant.load_kwargs(dt), **_offloading(model_cache.device, 2, scratch / "probe")})
    try:  # quantize-on-load with (nearly) everything offloaded: the library's answer, in ms
        load(case.model, probe, case.dtype, model_cache.device, model_cache.workdir)
    except LoadError as exc:
        if exc.refused:
            pytest.skip(f"offloading refused by the library: {exc}")
    fresh, state, quant = _quantized_fresh(model_cache, case)
    offload = _offloading(model_cache.device, fresh.model.get_memory_footprint(), scratch / "offload")
    metrics["max_memory"] = {str(k): v for k, v in offload["max_memory"].items()}
    roundtrip.save(case.variant, fresh.model, scratch / "saved")
    again = load_or_skip(lambda: roundtrip.reload(case.model, case.variant, case.dtype, model_cache.device,
                                                  scratch / "saved", model_cache.workdir, extra=offload,
                                                  refusals=roundtrip.OFFLOAD_REFUSALS),
                         failure=f"{case.id}: offloaded reload failed: {{}}",
                         refusal="offloading refused by the library: {}")
    metrics["device_map"] = sorted({str(v) for v in getattr(again.model, "hf_device_map", {}).values()})
    _same_quantized(case, "reloaded offloaded", fresh, state, quant, again, metrics)
    expected, refused = _outputs(fresh)
    if refused:
        pytest.skip(f"checkpoint and quantization state equal; outputs not compared: {refused}")
    _same_outputs(case, "offloaded", expected, forward(again, BATCH), metrics)


# --- C16: damaged checkpoints fail in one line that names the damage -----------------------------


@pytest.mark.C16
@pytest.mark.parametrize("damage", list(roundtrip.DAMAGES))
def test_damaged_checkpoint(
    damage: str, conformance_selection: Any, model_cache: ModelCache, metrics: dict[str, Any],
    scratch: Path,
) -> None:
    """The first model of the run, saved sharded and then damaged, must fail to load with one
    line naming the damage: never load silently, never surface as a traceback."""
    plant, names = roundtrip.DAMAGES[damage]
    model = conformance_selection.models[0]
    try:
        healthy = model_cache.get(model, REGISTRY[REFERENCE], "fp32")
    except LoadError as exc:
        pytest.fail(f"{damage}: the undamaged model does not load: {exc}", pytrace=False)
    path = scratch / f"{model.name}-{damage}"
    total = sum(t.numel() * t.element_size() for t in healthy.model.state_dict().values())
    roundtrip.save(REGISTRY[REFERENCE], healthy.model, path, max_shard_size=max(1, total // (SHARDS + 1)))
    metrics.update(model=model.name, planted=plant(path))
    damaged = ZooModel(path.name, model.kind, "user", str(path))
    try:
        with roundtrip.heap_frozen():
            load(damaged, REGISTRY[REFERENCE], "fp32", model_cache.device, model_cache.workdir)
    except LoadError as exc:
        message = str(exc)
    else:
        pytest.fail(f"{damage}: the damaged checkpoint ({metrics['planted']}) loaded without error",
                    pytrace=False)
    metrics["message"] = message
    assert "\n" not in message, f"{damage}: the failure is not one line: {message!r}"
    assert names in message, f"{damage}: the failure does not name the damage ({names!r}): {message}"
