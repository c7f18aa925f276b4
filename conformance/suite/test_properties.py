"""Properties that catch the bugs one batch of logits misses (C03, C06, C08-C11 by variant).

Each property compares two runs of the *same* variant that must agree: a sequence alone and
padded, a row among different neighbours, a mask of ones and none, packed and padded, cached and
full decoding, pad tokens and junk under the mask, one run and the next. The difference is judged
in units of the plain same-dtype reference's own rounding error on the same sequences
(tolerances.KERNEL, the kernel-class table); generation is judged with the near-tie rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from conformance import arithmetic, compare, decoding, localize, routing
from conformance.cases import Case
from conformance.checks import (
    attempt,
    golden_per_row,
    keep_worst,
    load_or_fail,
    max_len,
    reference_noise,
    reproduction,
    unrefused,
)
from conformance.options import OPTIONS, Context, call_with
from conformance.running import (
    Loaded,
    ModelCache,
    encoder_decoder_inputs,
    forward,
    forward_ids,
    forward_per_row,
    main_output,
    run_inputs,
)
from conformance.strategies import BatchSpec, batch_specs, encoder_decoder_batches, pad_rows
from conformance.variants import KINDS, REFERENCE, REGISTRY

DECODERS = frozenset({"decoder"})


def _judge(metrics: dict[str, Any], batch: BatchSpec, case: Case, problem: str | None,
           figures: dict[str, Any], where: Callable[[], dict[str, Any]] | None = None) -> None:
    """Keep the worst figures; on a failure of a kernel-class variant, `where()` localizes it
    (conformance/localize.py) and the message names the first layer out of bound."""
    __tracebackhide__ = True
    if problem is not None and where is not None:
        figures["first_divergence"] = found = (where() if case.variant.kernel_class
                                               else {"text": localize.NOT_LOCALIZED})
        problem = f"{problem}; {found['text']}"
    keep_worst(metrics, figures, batch)
    assert problem is None, f"{case.id}: {problem}"


def _located(cache: ModelCache, case: Case, batch: BatchSpec,
             run: Callable[[], Any] | None = None) -> Callable[[], dict[str, Any]]:
    """The localization of a failing example: the variant's call `run` (default: its plain
    padded forward on `batch`) traced against golden and the reference."""
    def where() -> dict[str, Any]:
        variant, reference, golden = load_or_fail(cache, case)
        return localize.localize(variant, reference, golden, batch, case.dtype, run)
    return where


def _between(cache: ModelCache, case: Case, batch: BatchSpec,
             first: tuple[Callable[[], Any], Callable[[Any], Any]],
             second: tuple[Callable[[], Any], Callable[[Any], Any]],
             exact: bool = False) -> Callable[[], dict[str, Any]]:
    """The localization of a failing two-run property: both calls (each with the map of a traced
    [B, W, H] output to `batch`'s real tokens in row order) traced against each other."""
    def where() -> dict[str, Any]:
        variant, reference, golden = load_or_fail(cache, case)
        return localize.two_runs(variant, reference, golden, batch, case.dtype, *first, *second,
                                 exact=exact)
    return where


def _row_order(traced: Any) -> Any:
    """Rows run one by one (or packed): their traced outputs, joined along the sequence, are the
    real tokens in row order already."""
    return traced[0]


# cached decoding costs one forward per chunk: up to 33 covers the 32-wide kernel tile's boundary
# and the zoo's sliding window (mistral: 32) on both sides, drawn as strategies.BOUNDARY_LENGTHS
CACHE_MAX_LEN = 33
PROPERTY_MAX_LEN = 65  # covers the 32- and 64-wide kernel tiles' boundaries (31-33, 63-65)


def fewer_examples() -> settings:
    """Two thirds of the profile's examples (ci: 4, dev: 6, nightly: 40): eight properties per
    case cost more than one logits check, and each already runs several forwards per example."""
    return settings(max_examples=max(3, (2 * settings.default.max_examples + 2) // 3))


def _setup(cache: ModelCache, case: Case) -> tuple[Loaded, int, float, float]:
    """(variant, longest sequence drawn, reference rounding error, max|golden|) for a property."""
    variant, reference, golden = load_or_fail(cache, case)
    longest = max_len(reference, cap=PROPERTY_MAX_LEN)
    noise, scale = reference_noise(cache, reference, golden, longest)
    return variant, longest, noise, scale


def _kept(cache: ModelCache, case: Case, batch: BatchSpec, metrics: dict[str, Any]) -> Any:
    """For a mixture of experts, which of `batch`'s real tokens (row order, as compare.on_real
    gives them) come before their row's first routing near tie (conformance/routing.py): two runs
    of one path may route a tie differently, and both are right. None for a dense model."""
    _, _, golden = load_or_fail(cache, case)
    if routing.experts_per_token(golden.model) is None:
        return None
    return routing.judged(cache, golden, batch, case.dtype, metrics)[batch.mask().bool()]


def _verdict(case: Case, variant: Loaded, got: Any, want: Any, noise: float, scale: float,
             what: str, keep: Any = None) -> tuple[str | None, dict[str, Any]]:
    """Rounding-noise units for paths that must be invariant; the scheme's own bound for a path
    the registry declares batch-dependent by design (LLM.int8's batch-wide outlier columns).
    `keep` ([N] bool, _kept): the tokens judged, where routing near ties set some aside."""
    if keep is not None:
        if not bool(keep.any()):
            return None, {"routing_all_set_aside": True}
        got, want = got[keep], want[keep]
    if case.variant.batch_dependent:
        problem, figures = compare.spread_verdict(got, want, case.variant.tolerance, what)
        figures["batch_dependent"] = case.variant.batch_dependent
        return problem, figures
    # a variant computing in a lower dtype than the run's rounds at that dtype: declared
    # (bnb_nf4_c16: float16 kernels in a float32 model; measured on CI's draws, its cached chunks
    # differ from one full forward by up to 2.4e-3 on mistral, 80x the float32 bound and within
    # float16's floor, 6.7e-3) or measured (bitsandbytes' CPU kernels keep bfloat16 only on
    # AVX512-BF16: conformance/arithmetic.py; test_quantized_compute_dtype judges that gap)
    rounding = arithmetic.effective_compute_dtype(variant, case.variant.compute_dtype or case.dtype)
    problem, figures = compare.invariance_verdict(got, want, noise, scale, rounding, what)
    if rounding != case.dtype:
        figures["rounding_dtype"] = rounding
    return problem, figures


def _alone(variant: Loaded, batch: BatchSpec) -> Any:
    """The variant on each row alone, unpadded: [N, V] over the rows' real tokens."""
    canonical = replace(batch, padding="right")
    return unrefused(variant, lambda: forward_per_row(variant, canonical))[canonical.mask().bool()]


@pytest.mark.cases(kinds=KINDS)
def test_padding_invariance(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    """A sequence's outputs on its real tokens are the same alone, right- and left-padded."""
    variant, longest, noise, scale = _setup(model_cache, case)

    @fewer_examples()
    @given(batch=batch_specs(padding="right", max_len=longest))
    def check(batch: BatchSpec) -> None:
        note(reproduction(case, batch, variant.device))
        alone = _alone(variant, batch)
        for side in _sides(case):
            spec = replace(batch, padding=side)
            out, refused = attempt(variant, lambda spec=spec: forward(variant, spec))
            if refused:  # e.g. BetterTransformer's nested tensors take right padding only
                metrics.setdefault("refused", {})[side] = refused
                continue
            problem, figures = _verdict(
                case, variant, compare.on_real(out, spec.mask()), alone, noise, scale,
                f"{side}-padded batch vs each sequence alone", _kept(model_cache, case, batch, metrics))
            _judge(metrics, spec, case, problem, figures, _located(model_cache, case, spec))

    check()
    routing.skip_if_nothing_judged(metrics, case.dtype, case.model.name)
    if len(metrics.get("refused", {})) == len(_sides(case)):
        pytest.skip(f"every padding side refused: {metrics['refused']}")


def _sides(case: Case) -> tuple[str, ...]:
    """Decoders get position ids that skip left padding (as generate does), so both sides must
    agree; encoders' absolute positions move with left padding by design (their tokenizers pad
    on the right), so for them only right padding is an invariance."""
    return ("right", "left") if case.model.kind == "decoder" else ("right",)


@pytest.mark.cases(kinds=KINDS)
def test_batch_invariance(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    """A row's outputs do not depend on the other rows: their order, lengths and number."""
    variant, longest, noise, scale = _setup(model_cache, case)

    @fewer_examples()
    @given(batch=batch_specs(max_len=longest), data=st.data())
    def check(batch: BatchSpec, data: st.DataObject) -> None:
        note(reproduction(case, batch, variant.device))
        rows = batch.rows(variant.vocab_size)
        side = batch.padding
        extra_len = batch.width if side == "none" else data.draw(st.integers(1, batch.width),
                                                                  label="neighbour length")
        extra = BatchSpec((extra_len,), "none", batch.seed + 1).rows(variant.vocab_size)[0]
        others = [*reversed(rows), extra]  # reversed order, one more neighbour, same width
        first = unrefused(variant, lambda: _padded_forward(variant, rows, side, batch.width))
        second = unrefused(variant, lambda: _padded_forward(variant, others, side, batch.width))
        mask_first = pad_rows(rows, side, variant.pad_id, batch.width)[1]
        mask_second = pad_rows(others, side, variant.pad_id, batch.width)[1]
        got = compare.on_real(second[: len(rows)].flip(0), mask_first)
        assert bool((mask_second[: len(rows)].flip(0) == mask_first).all())
        problem, figures = _verdict(
            case, variant, got, compare.on_real(first, mask_first), noise, scale,
            "the same rows reordered among other neighbours", _kept(model_cache, case, batch, metrics))
        _judge(metrics, batch, case, problem, figures, _between(
            model_cache, case, batch,
            (lambda: _padded_forward(variant, rows, side, batch.width),
             lambda t: compare.on_real(t, mask_first)),
            (lambda: _padded_forward(variant, others, side, batch.width),
             lambda t: compare.on_real(t[: len(rows)].flip(0), mask_first))))

    check()
    routing.skip_if_nothing_judged(metrics, case.dtype, case.model.name)


def _padded_forward(loaded: Loaded, rows: list[Any], side: str, width: int, fill: Any = None) -> Any:
    input_ids, mask = pad_rows(rows, side, loaded.pad_id, width, fill)
    return forward_ids(loaded, input_ids, mask)


@pytest.mark.cases(kinds=KINDS)
def test_mask_equivalence(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    """An all-ones attention mask gives the outputs of no mask at all."""
    variant, longest, noise, scale = _setup(model_cache, case)

    @fewer_examples()
    @given(batch=batch_specs(padding="none", max_len=longest))
    def check(batch: BatchSpec) -> None:
        note(reproduction(case, batch, variant.device))
        ids, mask = batch.materialize(variant.vocab_size, variant.pad_id)
        with_mask = unrefused(variant, lambda: forward_ids(variant, ids, mask))
        without = unrefused(variant, lambda: run_inputs(variant, {"input_ids": ids.to(variant.device)}))
        problem, figures = _verdict(
            case, variant, compare.on_real(without, mask), compare.on_real(with_mask, mask), noise, scale,
            "no attention mask vs an all-ones mask", _kept(model_cache, case, batch, metrics))
        _judge(metrics, batch, case, problem, figures, _located(
            model_cache, case, batch, lambda: run_inputs(variant, {"input_ids": ids.to(variant.device)})))

    check()
    routing.skip_if_nothing_judged(metrics, case.dtype, case.model.name)


@pytest.mark.cases(kinds=frozenset({"seq2seq"}))
def test_decoder_padding_invariance(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    """An encoder-decoder's two sides batched on their own: encoder rows and decoder rows of
    independent lengths, padded each on its own, give every pair's outputs alone (both sides
    unpadded). Where the sides' padding differ, a decoder mask used for the encoder's (or the
    encoder's for the cross-attention's keys of another row) shows; in test_padding_invariance
    both sides share one padding, and a speech encoder (Whisper) is never padded at all."""
    import torch

    variant, longest, noise, scale = _setup(model_cache, case)
    vocab, pad = variant.vocab_size, variant.pad_id

    def run(encoder: tuple[Any, Any], decoder: tuple[Any, Any]) -> Any:
        return run_inputs(variant, encoder_decoder_inputs(variant, encoder, decoder))

    @fewer_examples()
    @given(sides=encoder_decoder_batches(max_len=longest))
    def check(sides: tuple[BatchSpec, BatchSpec]) -> None:
        encoder, decoder = sides
        note(f"{reproduction(case, encoder, variant.device)}\n# decoder rows:\n{decoder.reproduction()}")
        decoder_mask = decoder.mask()
        batched = unrefused(variant, lambda: run(encoder.materialize(vocab, pad),
                                                 decoder.materialize(vocab, pad)))
        alone = []
        for source, target in zip(encoder.rows(vocab), decoder.rows(vocab)):
            pair = ((source[None], torch.ones_like(source)[None]),
                    (target[None], torch.ones_like(target)[None]))
            alone.append(unrefused(variant, lambda pair=pair: run(*pair))[0])
        problem, figures = _verdict(
            case, variant, compare.on_real(batched, decoder_mask), torch.cat(alone), noise, scale,
            f"encoder rows {list(encoder.lengths)} ({encoder.padding}) and decoder rows "
            f"{list(decoder.lengths)} (right-padded) in one batch vs each pair alone")
        figures["encoder_batch"] = {"lengths": list(encoder.lengths), "padding": encoder.padding,
                                    "seed": encoder.seed}  # worst_batch names the decoder's rows
        _judge(metrics, decoder, case, problem, figures)

    check()


@pytest.mark.cases(kinds=DECODERS)
def test_packed_equivalence(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    """Padding-free (packed) rows with restarting position_ids give each row's own outputs."""
    variant, longest, noise, scale = _setup(model_cache, case)
    reason = decoding.packed_reason(variant) or _packing_unsupported(model_cache, case, noise, scale)
    if reason:
        pytest.skip(reason)

    @fewer_examples()
    @given(batch=batch_specs(padding="right", max_len=longest))
    def check(batch: BatchSpec) -> None:
        note(reproduction(case, batch, variant.device))
        rows = batch.rows(variant.vocab_size)
        packed = unrefused(variant, lambda: decoding.packed(variant, rows))
        problem, figures = _verdict(
            case, variant, packed, _alone(variant, batch), noise, scale,
            "packed rows (position_ids restarting) vs each row alone",
            _kept(model_cache, case, batch, metrics))
        _judge(metrics, batch, case, problem, figures, _between(
            model_cache, case, batch, (lambda: decoding.packed(variant, rows), _row_order),
            (lambda: forward_per_row(variant, batch), _row_order)))

    check()
    routing.skip_if_nothing_judged(metrics, case.dtype, case.model.name)


def _packing_unsupported(cache: ModelCache, case: Case, noise: float, scale: float) -> str | None:
    """Whether the model honours packed rows at all, measured on its plain eager path: models that
    do not hand position_ids to their mask builder (opt, falcon in transformers 5.x) mix them."""
    reference = cache.get(case.model, REGISTRY[REFERENCE], case.dtype)
    probe = BatchSpec((7, 5), "right", seed=3)
    got = decoding.packed(reference, probe.rows(reference.vocab_size))
    want = _alone(reference, probe)
    problem, figures = compare.invariance_verdict(got, want, noise, scale, case.dtype, "probe")
    if problem is None:
        return None
    return (f"{type(reference.model).__name__} does not honour packed sequences in this "
            f"transformers: its eager path mixes packed rows (max|difference| "
            f"{figures['max_abs_diff']:.3g} > {figures['bound']:.3g})")


def _one_row_chunks(width: int) -> list[int]:
    """The fixed one-row example's chunks: a prefill, a multi-token cached step, then tokens."""
    if width < 4:
        return [1] * width
    return [width - 3, 2, 1]


def _chunks(width: int, data: st.DataObject) -> list[int]:
    """A prefill, then cached chunks of every shape: the first of several tokens (where a dropped
    causal mask shows), the rest drawn from 1 to 8 tokens (single-token decoding among them)."""
    prefill = data.draw(st.integers(1, width), label="prefill length")
    chunks, rest = [prefill], width - prefill
    if rest >= 2:
        first = data.draw(st.integers(2, min(rest, 8)), label="first cached chunk")
        chunks.append(first)
        rest -= first
    while rest > 0:
        size = data.draw(st.integers(1, min(rest, 8)), label="cached chunk")
        chunks.append(size)
        rest -= size
    return chunks


@pytest.mark.parametrize("cache_kind", decoding.CACHE_KINDS)
@pytest.mark.cases(kinds=DECODERS | {"seq2seq"})
def test_cache_consistency(case: Case, cache_kind: str, model_cache: ModelCache,
                           metrics: dict[str, Any]) -> None:
    """Decoding through the KV cache, in a multi-token chunk then token by token, gives the logits
    of one full forward over the same tokens."""
    variant, longest, noise, scale = _setup(model_cache, case)
    if cache_kind == "static" and (reason := decoding.static_cache_reason(variant)):
        pytest.skip(reason)
    metrics["cache"] = cache_kind

    def judge(batch: BatchSpec, chunks: list[int]) -> None:
        ids, mask = batch.materialize(variant.vocab_size, variant.pad_id)
        full = unrefused(variant, lambda: decoding.full_with_cache_off(variant, ids, mask))
        cached = unrefused(variant, lambda: decoding.incremental(variant, ids, mask, chunks, cache_kind))
        problem, figures = _verdict(
            case, variant, compare.on_real(cached, mask), compare.on_real(full, mask), noise, scale,
            f"{cache_kind}-cache decoding in chunks {chunks} vs one full forward",
            _kept(model_cache, case, batch, metrics))
        _judge(metrics, batch, case, problem, figures, _located(
            model_cache, case, batch,
            lambda: decoding.incremental(variant, ids, mask, chunks, cache_kind)))

    # one unpadded row first, always: a path may take another branch for a batch of one (optimum
    # 1.27's BetterTransformer decoders drop the mask and set is_causal=True there, so a cached
    # multi-token step attends top-left aligned: OPT 3.97 off in fp32), and the drawn batches
    # below are mostly several left-padded rows
    judge(BatchSpec((min(9, longest),), "none", seed=11), _one_row_chunks(min(9, longest)))

    @fewer_examples()
    # left padding always (a one-row batch is the unpadded case): with the side drawn, a case could
    # see no padded cached decoding at all in its few examples (measured: a planted use_cache=False
    # mask fault passed the ci profile that way)
    @given(batch=batch_specs(padding="left", max_len=min(CACHE_MAX_LEN, longest)), data=st.data())
    def check(batch: BatchSpec, data: st.DataObject) -> None:
        note(reproduction(case, batch, variant.device))
        chunks = _chunks(batch.width, data)
        note(f"chunks: {chunks}")
        judge(batch, chunks)

    check()
    routing.skip_if_nothing_judged(metrics, case.dtype, case.model.name)


@pytest.mark.cases(kinds=KINDS)
def test_fully_padded_and_tiny(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    """Batch 1 x length 1 runs; a row with every position masked stays finite where the reference
    is, and neither it nor whatever sits under the mask reaches real tokens."""
    variant, longest, noise, scale = _setup(model_cache, case)
    reference = model_cache.get(case.model, REGISTRY[REFERENCE], case.dtype)
    tiny = BatchSpec((1,), "none")
    problem, figures = _verdict(
        case, variant,
        compare.on_real(unrefused(variant, lambda: forward(variant, tiny)), tiny.mask()),
        _alone(variant, tiny), noise, scale, "batch 1 x length 1")
    metrics["tiny"] = figures
    assert problem is None, f"{case.id}: {problem}"

    @fewer_examples()
    @given(batch=batch_specs(padding="right", max_len=longest), data=st.data())
    def check(batch: BatchSpec, data: st.DataObject) -> None:
        import torch

        side = data.draw(st.sampled_from(_sides(case)), label="padding")
        at = data.draw(st.integers(0, len(batch.lengths)), label="row of the fully padded one")
        note(reproduction(case, batch, variant.device) + f"\n# empty row inserted at {at}, {side}")
        rows = batch.rows(variant.vocab_size)
        with_empty = [*rows[:at], rows[0][:0], *rows[at:]]
        ids, mask = pad_rows(with_empty, side, variant.pad_id, batch.width)
        junk = torch.randint(4, variant.vocab_size, ids.shape, generator=torch.Generator().manual_seed(7))
        out = unrefused(variant, lambda: _padded_forward(variant, with_empty, side, batch.width))
        plain = _padded_forward(reference, with_empty, side, batch.width)
        bad = torch.isfinite(plain) & ~torch.isfinite(out)
        assert not bad.any(), (
            f"{case.id}: non-finite output in rows {sorted({int(r) for r in bad.nonzero()[:, 0]})} "
            f"(fully padded row {at}) where the reference is finite")
        problem, figures = _verdict(
            case, variant, compare.on_real(out, mask), _alone(variant, batch), noise, scale,
            f"batch with a fully padded row ({side}) vs each sequence alone",
            _kept(model_cache, case, batch, metrics))
        with_pads = (lambda: _padded_forward(variant, with_empty, side, batch.width),
                     lambda t: compare.on_real(t, mask))
        _judge(metrics, batch, case, problem, figures, _between(
            model_cache, case, batch, with_pads, (lambda: forward_per_row(variant, batch), _row_order)))
        filled = unrefused(variant, lambda: _padded_forward(variant, with_empty, side, batch.width, junk))
        problem, figures = _verdict(
            case, variant, compare.on_real(filled, mask), compare.on_real(out, mask), noise, scale,
            "random tokens vs pad tokens under the mask", _kept(model_cache, case, batch, metrics))
        _judge(metrics, batch, case, problem, figures, _between(
            model_cache, case, batch,
            (lambda: _padded_forward(variant, with_empty, side, batch.width, junk),
             lambda t: compare.on_real(t, mask)), with_pads))

    check()
    routing.skip_if_nothing_judged(metrics, case.dtype, case.model.name)


@pytest.mark.cases(kinds=KINDS)
def test_determinism(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    """The same input twice in one process gives bitwise-equal outputs (no path under test is
    non-deterministic in its forward: fused attention's non-determinism is in its backward)."""
    import torch

    variant, longest, _, _ = _setup(model_cache, case)

    @fewer_examples()
    @given(batch=batch_specs(max_len=longest))
    def check(batch: BatchSpec) -> None:
        note(reproduction(case, batch, variant.device))
        first = unrefused(variant, lambda: forward(variant, batch))
        second = forward(variant, batch)
        real = batch.mask().bool()
        spread = float((first - second)[real].abs().nan_to_num(float("inf")).max())
        metrics["max_run_to_run_diff"] = max(spread, metrics.get("max_run_to_run_diff", 0.0))
        same = torch.equal(first.isnan(), second.isnan()) and torch.equal(
            first.nan_to_num(), second.nan_to_num())
        if not same and case.variant.kernel_class:  # where the runs first part, bitwise
            again = (lambda: forward(variant, batch), lambda t: compare.on_real(t, batch.mask()))
            metrics["first_divergence"] = found = _between(model_cache, case, batch, again, again,
                                                           exact=True)()
            spread_text = f"{spread:.3g} on real tokens; {found['text']}"
        else:
            spread_text = f"{spread:.3g} on real tokens"
        assert same, (f"{case.id}: two runs of the same input differ (max|run1 - run2| = "
                      f"{spread_text}); every path under test is deterministic in its forward")

    check()


def _applicable(variant: Loaded, kind: str) -> tuple[list[str], dict[str, str]]:
    """The options this model and stack take, and the reason for each one they do not."""
    ids, mask = BatchSpec((4,), "none").materialize(variant.vocab_size, variant.pad_id)
    names, reasons = [], {}
    for name, option in OPTIONS.items():
        if kind not in option.kinds:
            reasons[name] = f"not an option for {kind} models"
            continue
        got = option.inputs(variant, ids, mask)
        if isinstance(got, str):
            reasons[name] = got
        else:
            names.append(name)
    return names, reasons




@pytest.mark.cases(kinds=KINDS)
def test_options(case: Case, model_cache: ModelCache, metrics: dict[str, Any],
                 pytestconfig: pytest.Config) -> None:
    """The options and input forms users pass (conformance/options.py) change what is returned,
    never the answer: the logits (encoders: last hidden state) equal the plain call's, bitwise
    where the plain call's kernels run, and an option's extra output is judged too. One option is
    drawn per example; report.json says how many examples each got and why the rest do not apply."""
    _options(case, model_cache, metrics, exclude=ATTENTION_OPTION,
             chosen=pytestconfig.getoption("option"))


@pytest.mark.cases(kinds=KINDS)
def test_output_attentions(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    """output_attentions=True leaves the answer alone; the weights, where the implementation
    returns them, put nothing above the diagonal or on masked keys and match eager float64's;
    whether it returns them, refuses, or returns none is recorded per stack (`output_attentions`).
    Its own check: the path that computes weights is another path (an implementation falls back
    to one), and a bug there must not hide the other options' verdicts."""
    _options(case, model_cache, metrics, only=ATTENTION_OPTION)


ATTENTION_OPTION = "output_attentions"


def _options(case: Case, model_cache: ModelCache, metrics: dict[str, Any], exclude: str = "",
             only: str = "", chosen: list[str] | None = None) -> None:
    __tracebackhide__ = True
    import fnmatch

    variant, longest, noise, scale = _setup(model_cache, case)
    _, reference, golden = load_or_fail(model_cache, case)
    names, reasons = _applicable(variant, case.model.kind)
    names = [n for n in names if n != exclude and (not only or n == only)
             and (not chosen or any(fnmatch.fnmatchcase(n, g) for g in chosen))]
    metrics["options_not_applicable"] = {k: v for k, v in reasons.items()
                                         if k != exclude and (not only or k == only)}
    counts: dict[str, int] = metrics.setdefault("option_examples", {})
    if not names:
        pytest.skip(f"not applicable: {metrics['options_not_applicable']}")
    # output_attentions alone: half the examples (its judge runs golden and eager with weights)
    @settings(max_examples=fewer_examples().max_examples // (2 if only else 1))
    @given(batch=batch_specs(max_len=min(longest, CACHE_MAX_LEN)), name=st.sampled_from(names),
           data=st.data())
    def check(batch: BatchSpec, name: str, data: st.DataObject) -> None:
        option = OPTIONS[name]
        if option.unpadded:
            batch = BatchSpec((batch.width,) * len(batch.lengths), "none", batch.seed)
        note(reproduction(case, batch, variant.device) + f"\n# option: {name}")
        counts[name] = counts.get(name, 0) + 1
        ids, mask = batch.materialize(variant.vocab_size, variant.pad_id)
        out: Any = None
        chunks: list[int] = []
        if option.cached:
            chunks = _chunks(batch.width, data)
            note(f"chunks: {chunks}")
            form = option.inputs(variant, ids, mask)
            assert isinstance(form, dict)
            # the judge is one full forward without a cache, not the plain cached decoding: a model
            # that hands its cache back in the form under test (4.48's gpt_neox returns legacy
            # tuples) would otherwise compare the form with itself
            plain = unrefused(variant, lambda: decoding.full_with_cache_off(variant, ids, mask))
            got = unrefused(variant, lambda: decoding.in_form(variant, ids, mask, chunks, **form))

            def traced() -> Any:
                return decoding.in_form(variant, ids, mask, chunks, **form)
        else:
            extra = option.inputs(variant, ids, mask)
            assert isinstance(extra, dict)
            plain = unrefused(variant, lambda: forward_ids(variant, ids, mask))
            try:
                out = call_with(variant, ids, mask, extra)
            except Exception as exc:  # an implementation may refuse an option: clearly, once
                if name != ATTENTION_OPTION:
                    raise
                metrics[ATTENTION_OPTION] = f"refused: {type(exc).__name__}: {str(exc)[:160]}"
                return
            got = main_output(variant, out)

            def traced() -> Any:
                return call_with(variant, ids, mask, extra)
        what = (f"option {name} (chunks {chunks}) vs one full forward" if option.cached
                else f"option {name} vs the plain call")
        bitwise = option.same_kernels and not case.variant.batch_dependent
        if bitwise:
            real = mask.bool()
            diff = float((got[real] - plain[real]).abs().nan_to_num(float("inf")).max())
            problem = None if bool((got[real] == plain[real]).all()) else (
                f"{what}: not bitwise equal although the plain call's kernels run (max|diff| "
                f"{diff:.3g} on real tokens)")
            figures: dict[str, Any] = {"max_abs_diff": diff, "bitwise": True, "err_over_bound": 0.0}
        else:
            problem, figures = _verdict(case, variant, compare.on_real(got, mask),
                                        compare.on_real(plain, mask), noise, scale, what)
        _judge(metrics, batch, case, problem, figures, _located(model_cache, case, batch, traced))
        if option.extra is not None and out is not None:
            context = Context(variant, reference, golden, ids, mask, batch.padding, case.dtype,
                              kernel_class=case.variant.kernel_class,
                              per_row=golden_per_row(case.model.kind, batch.padding))
            problem, extra_figures = option.extra(out, context)
            for key, value in extra_figures.items():
                metrics.setdefault(f"{name}_figures", {})[key] = value
            if ATTENTION_OPTION in extra_figures:  # what the implementation does, per stack
                metrics[ATTENTION_OPTION] = extra_figures[ATTENTION_OPTION]
            assert problem is None, f"{case.id}: {name}: {problem}"

    check()
