"""An encoder-decoder's two sides drawn as batches of their own (C01, C06, C08-C11 by variant):
the logits stay within the variant's tolerance of golden with each pair alone, as test_logits
requires of one shared batch. A module of its own so that ``-k test_logits`` keeps selecting the
checks of test_logits.py alone."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, note, settings

from conformance import compare
from conformance.cases import Case
from conformance.checks import keep_worst, load_or_fail, max_len, reproduction, run_proven, unrefused
from conformance.running import Loaded, ModelCache, encoder_decoder_inputs, run_inputs
from conformance.strategies import BatchSpec, encoder_decoder_batches


def _pair_outputs(loaded: Loaded, encoder: BatchSpec, decoder: BatchSpec) -> Any:
    """The outputs for two sides batched on their own (decoder rows right-padded)."""
    vocab, pad = loaded.vocab_size, loaded.pad_id
    return run_inputs(loaded, encoder_decoder_inputs(loaded, encoder.materialize(vocab, pad),
                                                     decoder.materialize(vocab, pad)))


def _pairs_key(loaded: Loaded, encoder: BatchSpec, decoder: BatchSpec) -> tuple[Any, ...]:
    """The memo key of a reference's or golden run's outputs on two sides: every variant of the
    model is judged on the same draws, so each is computed once."""
    return (loaded.zoo.name, loaded.variant.id, loaded.dtype, loaded.device, "sides", encoder, decoder)


def _golden_pairs(golden: Loaded, encoder: BatchSpec, decoder: BatchSpec, like: Any) -> Any:
    """Golden laid out like the batch's outputs: each pair run alone, both sides unpadded, its
    outputs at its decoder row's real (leading) positions; pads are NaN and never judged."""
    import torch

    vocab = golden.vocab_size
    expected = torch.full_like(like, float("nan"))
    try:
        for row, (source, target) in enumerate(zip(encoder.rows(vocab), decoder.rows(vocab))):
            inputs = encoder_decoder_inputs(golden, (source[None], torch.ones_like(source)[None]),
                                            (target[None], torch.ones_like(target)[None]))
            expected[row, :len(target)] = run_inputs(golden, inputs)[0]
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        pytest.fail(f"the golden run (eager, {golden.dtype}) failed on {golden.zoo.name}: "
                    f"{type(exc).__name__}: {first}", pytrace=False)
    return expected


@pytest.mark.cases(kinds=frozenset({"seq2seq"}))
def test_sides_drawn_logits(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    """An encoder-decoder's logits with its two sides drawn as batches of their own
    (`strategies.encoder_decoder_batches`: encoder rows unpadded or right-padded, decoder rows
    right-padded, independent lengths and tokens), judged like test_logits against golden with
    each pair alone and unpadded on both sides. test_logits gives the decoder the encoder's
    lengths and mask; here a mask of one side used for the other, or a row's cross-attention
    keyed by another row's length, is off golden."""
    variant, reference, golden = load_or_fail(model_cache, case)
    run_proven(variant, BatchSpec((8,), "none"), metrics)

    @settings(max_examples=max(3, (2 * settings.default.max_examples + 2) // 3))
    @given(sides=encoder_decoder_batches(max_len=max_len(reference)))
    def check(sides: tuple[BatchSpec, BatchSpec]) -> None:
        encoder, decoder = sides
        note(f"{reproduction(case, encoder, variant.device)}\n# decoder rows:\n{decoder.reproduction()}")
        out = unrefused(variant, lambda: _pair_outputs(variant, encoder, decoder))
        plain = model_cache.memoized(_pairs_key(reference, encoder, decoder),
                                     lambda: _pair_outputs(reference, encoder, decoder))
        expected = model_cache.memoized(_pairs_key(golden, encoder, decoder),
                                        lambda: _golden_pairs(golden, encoder, decoder, plain))
        real = decoder.mask().bool()
        problem = compare.finiteness(out, plain, expected, real)
        assert problem is None, f"{case.id}: {problem}"
        if case.variant.reference:
            problem, figures = compare.reference_verdict(out, expected, real, case.dtype,
                                                         case.model.name)
        else:
            problem, figures = compare.variant_verdict(case.variant, out, plain, expected, real,
                                                       case.dtype, case.model.kind)
        figures["encoder_batch"] = {"lengths": list(encoder.lengths), "padding": encoder.padding,
                                    "seed": encoder.seed}  # worst_batch names the decoder's rows
        keep_worst(metrics, figures, decoder)
        assert problem is None, (
            f"{case.id}: encoder rows {list(encoder.lengths)} ({encoder.padding}), decoder rows "
            f"{list(decoder.lengths)} (right-padded): {problem}")

    check()
