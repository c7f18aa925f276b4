"""Steps every check shares: load or fail in one line, run with proof, reproduce a failure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from conformance.cases import Case
from conformance.compare import noise_unit
from conformance.probes import OpCounter
from conformance.running import Loaded, LoadError, ModelCache, forward
from conformance.strategies import BatchSpec
from conformance.variants import REFERENCE, REGISTRY
from conformance.zoo import ZooModel

KERNEL_REFUSALS = ("No available kernel", "No viable backend")

T = TypeVar("T")


def load_or_skip(load_one: Callable[[], T], failure: str = "{}", refusal: str = "{}") -> T:
    """`load_one()` (a cached get, a fresh load, a reload): the library's documented refusal
    (`LoadError.refused`) is a skip quoting it, any other load failure one line, never a
    traceback. `failure`/`refusal` frame the message ("{}" is the LoadError's one line)."""
    __tracebackhide__ = True
    try:
        return load_one()
    except LoadError as exc:
        if exc.refused:
            pytest.skip(refusal.format(exc))
        pytest.fail(failure.format(exc), pytrace=False)


def load_golden(cache: ModelCache, model: Any, dtype: str) -> Loaded:
    """The golden run's model for `dtype` (ModelCache.golden); never a fallback to a path under
    test: a load that fails is one failure line naming the model."""
    try:
        return cache.golden(model, dtype)
    except LoadError as exc:
        pytest.fail(f"the golden run (eager) cannot load {model.name}: {exc}", pytrace=False)


def load_or_fail(cache: ModelCache, case: Case) -> tuple[Loaded, Loaded, Loaded]:
    """(variant, same-dtype eager reference, golden); a load failure is one line, not a traceback."""
    golden = load_golden(cache, case.model, case.dtype)
    reference = load_or_skip(lambda: cache.get(case.model, REGISTRY[REFERENCE], case.dtype))
    return load_or_skip(lambda: cache.get(case.model, case.variant, case.dtype)), reference, golden


def load_or_fail_in(cache: ModelCache, case: Case, dtype: str) -> tuple[Loaded, Loaded]:
    """(variant loaded in `dtype`, golden) for a check that runs in a dtype of its own."""
    golden = load_golden(cache, case.model, dtype)
    return load_or_skip(lambda: cache.get(case.model, case.variant, dtype)), golden


def golden_per_row(kind: str, padding: str) -> bool:
    """Whether the golden output of a batch is each row alone, unpadded: always, except an
    encoder's or an encoder-decoder's left-padded batch, whose absolute positions (BERT's, BART's
    on both sides) move with the padding by design (then the golden run is eager float64 on the
    padded batch itself)."""
    return not (kind in ("encoder", "seq2seq") and padding == "left")


def golden_outputs(cache: ModelCache, golden: Loaded, batch: BatchSpec) -> Any:
    """The golden outputs of a batch, memoized per batch and model; a golden forward that raises
    is one failure line naming the model and the cause, never a traceback."""
    __tracebackhide__ = True
    try:
        return cache.outputs(golden, batch, per_row=golden_per_row(golden.zoo.kind, batch.padding))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        pytest.fail(f"the golden run (eager, {golden.dtype}) failed on {golden.zoo.name}: "
                    f"{type(exc).__name__}: {first}", pytrace=False)


def dtype_honoured(loaded: Loaded) -> None:
    """A variant asked for bf16 must not silently run in float32 (it would look *more* accurate)."""
    import torch

    from conformance.compat import parse_dtype

    want = parse_dtype(loaded.dtype)
    found: dict[torch.dtype, int] = {}
    for dtype in _weight_dtypes(loaded.model):
        if dtype.is_floating_point and dtype != want:
            found[dtype] = found.get(dtype, 0) + 1
    if found:
        listing = ", ".join(f"{n} in {dt}" for dt, n in found.items())
        pytest.fail(f"{loaded.variant.id} on {loaded.zoo.name}: asked for {loaded.dtype}, but "
                    f"floating-point parameters are not: {listing}", pytrace=False)


def _weight_dtypes(model: Any) -> list[Any]:
    """The dtypes of a model's weights: its parameters, or, for an exported ONNX Runtime model
    (no torch parameters), the initializers of the graph its session runs."""
    if hasattr(model, "parameters"):
        return [param.dtype for param in model.parameters()]
    from conformance.paths.onnx_runtime import initializer_dtypes

    return initializer_dtypes(model)


def max_len(loaded: Loaded, cap: int = 129) -> int:
    positions = getattr(loaded.model.config, "max_position_embeddings", None) or cap
    return max(2, min(cap, int(positions) - 2))


def refusal(loaded: Loaded, exc: Exception) -> str | None:
    """The skip reason when `exc` is the path's documented refusal of an input, else None."""
    text = str(exc)
    if any(marker in text for marker in KERNEL_REFUSALS + loaded.variant.input_refusals):
        first = next((ln for ln in text.splitlines() if ln.strip()), text)
        return f"{loaded.variant.id} refused this input: {first.strip()[:200]}"
    return None


def attempt(loaded: Loaded, run: Callable[[], Any]) -> tuple[Any, str | None]:
    """(output, None), or (None, reason) when the path refuses the input (a kernel that cannot
    run it says so; that is its documented behaviour, not a wrong answer)."""
    try:
        return run(), None
    except Exception as exc:  # kernels refuse with RuntimeError; bitsandbytes' CPU 4-bit asserts
        reason = refusal(loaded, exc)
        if reason is None:
            raise
        return None, reason


@dataclass
class Refusals:
    """The Hypothesis examples the path refused in the running check. The plugin resets it before
    each check, records the count, and turns a check whose every example was refused into a skip
    (plugin.pytest_runtest_call)."""

    reasons: list[str] = field(default_factory=list)
    example: Any = None  # the current example's build context
    example_refused: bool = False
    answered: int = 0  # earlier examples answered in full

    def reset(self) -> None:
        self.reasons.clear()
        self.example, self.example_refused, self.answered = None, False, 0

    def note(self, example: Any, reason: str | None) -> None:
        if example is not self.example:  # a new example: the one before was answered unless refused
            self.answered += self.example is not None and not self.example_refused
            self.example, self.example_refused = example, False
        if reason is not None:
            self.example_refused = True
            self.reasons.append(reason)


REFUSALS = Refusals()
# A path that refused this many examples and answered none refuses the check's whole class of
# input (a forced kernel and any mask): skip then, rather than draw Hypothesis' hundreds more
# (measured: 459 examples tried, each with its golden run, before Hypothesis gave up).
REFUSAL_LIMIT = 20


def unrefused(loaded: Loaded, run: Callable[[], Any]) -> Any:
    """`run()`, with a documented refusal of the input set aside with its reason. Inside a
    Hypothesis example only that example is set aside (rejected) and the others are still judged:
    a forced kernel that refuses padded batches still answers for the unpadded ones. Outside one,
    the check is a skip with the reason."""
    __tracebackhide__ = True
    from hypothesis import reject
    from hypothesis.control import current_build_context, currently_in_test_context

    out, reason = attempt(loaded, run)
    if not currently_in_test_context():
        if reason is not None:
            pytest.skip(reason)
        return out
    REFUSALS.note(current_build_context(), reason)
    if reason is None:
        return out
    if len(REFUSALS.reasons) >= REFUSAL_LIMIT and not REFUSALS.answered:
        pytest.skip(f"the first {len(REFUSALS.reasons)} examples were all refused: {reason}")
    reject()


def run_proven(loaded: Loaded, batch: BatchSpec, metrics: dict[str, Any]) -> Any:
    """Forward of the variant with its ops counted; fails if its optimized path did not run.

    A forced kernel that refuses the input ("No available kernel") is a skip with that reason.
    """
    __tracebackhide__ = True
    proof = loaded.variant.proof_for(loaded.zoo.kind)
    # a proof may bring its own probe: compiled code runs eagerly under the op counter's dispatch
    # mode, so torch.compile's proof watches the profiler instead (conformance/paths/compiled.py)
    counter = proof.probe() if hasattr(proof, "probe") else OpCounter()
    out = unrefused(loaded, lambda: forward(loaded, batch, counter))
    if proof is not None:
        problem, figures = proof.verdict(counter, loaded.model)
        metrics.update(figures)
        if problem:
            raise AssertionError(f"{loaded.variant.id} on {loaded.zoo.name}: {problem}")
    return out


def reproduction_spec(model: ZooModel) -> str:
    """What `zoo.resolve` takes back to this model: a zoo model's name (its location is a config
    file, which resolve refuses as a checkpoint), a user's model's path or id."""
    return model.location if model.source == "user" else model.name


def reproduction(case: Case, batch: BatchSpec, device: str, float64_kept: bool = False) -> str:
    """Code that reruns the case's forward on `batch`; `float64_kept`: inside float64.kept(), as
    test_float64_agreement runs it."""
    run = ("from conformance import float64\nwith float64.kept():\n    print(running.forward(loaded, batch))"
           if float64_kept else "print(running.forward(loaded, batch))")
    return (
        "Reproduce:\n"
        "from pathlib import Path\n"
        "from conformance import running, variants, zoo\n"
        f"{batch.reproduction()}\n"
        f"model = zoo.resolve({reproduction_spec(case.model)!r}, zoo.default_zoo())\n"
        f"loaded = running.load(model, variants.REGISTRY[{case.variant.id!r}], {case.dtype!r}, "
        f"{device!r}, Path('/tmp/conformance-zoo'))\n"
        f"{run}"
    )


def keep_worst(metrics: dict[str, Any], figures: dict[str, Any], batch: BatchSpec) -> None:
    """Across Hypothesis examples, report the figures of the example closest to its bound."""
    metrics["examples"] = metrics.get("examples", 0) + 1
    if figures.get("err_over_bound", 0.0) >= metrics.get("err_over_bound", -1.0):
        metrics.update(figures)
        metrics["worst_batch"] = {"lengths": list(batch.lengths), "padding": batch.padding,
                                  "seed": batch.seed}


def reference_noise(
    cache: ModelCache, reference: Loaded, golden: Loaded, longest: int
) -> tuple[float, float]:
    """(max|reference - golden|, max|golden|) on a calibration batch: the plain same-dtype path's
    own rounding error on this model, the unit invariance is judged in.

    Measured once per model and dtype (memoized) on rows spanning the lengths the properties
    draw, up to `longest`, each row alone: a per-example golden run would double their cost.
    """
    lengths = tuple(sorted({longest, max(1, longest // 2), min(longest, 17), min(longest, 5), 1},
                           reverse=True))
    calibration = BatchSpec(lengths, "right", seed=20231120)
    real = calibration.mask().bool()
    gold = golden_outputs(cache, golden, calibration)[real]
    plain = cache.outputs(reference, calibration, per_row=True)[real]
    finite = gold.isfinite() & plain.isfinite()
    noise, scale = float((plain - gold).abs()[finite].max()), float(gold.abs()[finite].max())
    # capped at the reference's envelope: a broken plain path cannot inflate the noise unit
    return noise_unit(noise, scale, reference.dtype), scale
